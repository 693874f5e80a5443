-- Lets an export copy the lines of the last export for the rows that did not change since.
-- Append-only: never edit a migration that has shipped; add 0004_*.sql instead.

-- Every change to what a row's exported record holds (and every row added or deleted)
-- moves a counter, and the row keeps the counter's value from its last change as its
-- stamp. The export remembers the counter's value when it read the rows: a row stamped
-- at or below it is exactly as it was when its line was written. Triggers keep both, so
-- no write path (state.py, an import, a hand-made sqlite3 edit) can forget to.
ALTER TABLE files ADD COLUMN stamp INTEGER NOT NULL DEFAULT 0;
INSERT INTO meta (key, value) VALUES ('record_stamp', '0');

CREATE TRIGGER files_stamp_insert AFTER INSERT ON files
BEGIN
    UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'record_stamp';
    UPDATE files SET stamp = (SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'record_stamp')
    WHERE id = NEW.id;
END;

-- The columns of the record: its vector, path, file name, size, times, size in pixels and
-- EXIF, and the status and model that decide whether it is exported at all.
CREATE TRIGGER files_stamp_update
AFTER UPDATE OF path, size, mtime_ns, ctime_ns, status, width, height, model, dim, exif, embedding ON files
BEGIN
    UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'record_stamp';
    UPDATE files SET stamp = (SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'record_stamp')
    WHERE id = NEW.id;
END;

CREATE TRIGGER files_stamp_delete AFTER DELETE ON files
BEGIN
    UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'record_stamp';
END;

-- The export walks the exported rows in path order reading (path, status, model, stamp):
-- with the stamp in the scan's covering index it reads them from there, never from the
-- rows with their vectors.
DROP INDEX files_scan;
CREATE INDEX files_scan ON files (path, size, mtime_ns, ctime_ns, status, model, build, stamp);
