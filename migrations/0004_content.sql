-- Content identity: a photo that moves, is copied or is only touched keeps its vector.
-- Append-only: never edit a migration that has shipped; add 0005_*.sql instead.

-- content: BLAKE3 (32 bytes) of the file's whole content that the row's vector, EXIF and
-- size in pixels were made from (NULL: not known, e.g. a row made before this migration;
-- it gets one the next time the file is read). While a modified row is pending it keeps
-- its old vector and content, so that a file whose bytes did not change (only touched)
-- can take them back; a pending row's vector is never read as the file's.
-- dev, ino: the file's device and inode as last scanned; a new path with the device,
-- inode, size and mtime of a row whose path disappeared is that file renamed.
ALTER TABLE files ADD COLUMN content BLOB;
ALTER TABLE files ADD COLUMN dev INTEGER;
ALTER TABLE files ADD COLUMN ino INTEGER;

ALTER TABLE runs ADD COLUMN reused INTEGER NOT NULL DEFAULT 0;        -- vectors taken from a row of the same content
ALTER TABLE runs ADD COLUMN renamed INTEGER NOT NULL DEFAULT 0;       -- of them: renamed files, matched without reading
ALTER TABLE runs ADD COLUMN hashed_bytes INTEGER NOT NULL DEFAULT 0;  -- bytes this run read to fingerprint them

-- The scan compares (path, size, mtime_ns, ctime_ns, dev, ino) with the walk, from this
-- covering index alone. Rows of an older database have no dev and ino: the first scan
-- after this migration records them (one write per row, nothing embedded).
DROP INDEX files_scan;
CREATE INDEX files_scan ON files (path, size, mtime_ns, ctime_ns, dev, ino, status, model, build, stamp);

-- Finds the rows a new file may share its content with: same size first (only then is
-- the file read to hash it), then the same fingerprint; also groups byte-identical files
-- (duplicates --exact) without reading a row.
CREATE INDEX files_content ON files (size, content) WHERE status = 'ok';
