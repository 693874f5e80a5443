-- Working state of image-indexer. One row per image file under the inputs.
-- Append-only: never edit a migration that has shipped; add 0002_*.sql instead.

CREATE TABLE files (
    id          INTEGER PRIMARY KEY,
    path        TEXT    NOT NULL UNIQUE,   -- absolute, normalised
    size        INTEGER NOT NULL,          -- bytes, as last scanned
    mtime_ns    INTEGER NOT NULL,          -- st_mtime_ns, as last scanned
    ctime_ns    INTEGER NOT NULL,          -- st_ctime_ns, as last scanned
    status      TEXT    NOT NULL DEFAULT 'pending'
                CHECK (status IN ('pending', 'ok', 'failed')),
    error       TEXT,                      -- why status = 'failed'
    width       INTEGER,                   -- as displayed, after EXIF orientation
    height      INTEGER,
    model       TEXT,                      -- model that produced embedding
    dim         INTEGER,                   -- length of embedding in float32s
    build       INTEGER,                   -- full-build generation that last processed the row
    changed_run INTEGER,                   -- last run that added or changed the row
    -- The large values last: a row's leading columns are then read without them.
    exif        TEXT,                      -- JSON object
    embedding   BLOB                       -- little-endian float32, L2-normalised
);

-- Covers the scan's change detection: one index lookup per batch of paths, without
-- touching the rows (which hold kilobytes of vector each).
CREATE INDEX files_scan ON files (path, size, mtime_ns, ctime_ns, status, model, build);
CREATE INDEX files_status ON files (status);
CREATE INDEX files_changed_run ON files (changed_run);

CREATE TABLE runs (
    id           INTEGER PRIMARY KEY,
    started_at   TEXT    NOT NULL,         -- ISO 8601, UTC
    finished_at  TEXT,
    status       TEXT    NOT NULL DEFAULT 'running'
                 CHECK (status IN ('running', 'completed', 'interrupted', 'failed')),
    mode         TEXT    NOT NULL CHECK (mode IN ('full', 'reindex')),
    build        INTEGER NOT NULL,         -- generation this run fills (a resumed full build keeps its own)
    model        TEXT    NOT NULL,
    pid          INTEGER,
    config       TEXT    NOT NULL,         -- JSON of the effective configuration
    error        TEXT,
    scanned      INTEGER NOT NULL DEFAULT 0,
    new          INTEGER NOT NULL DEFAULT 0,
    modified     INTEGER NOT NULL DEFAULT 0,
    unchanged    INTEGER NOT NULL DEFAULT 0,
    deleted      INTEGER NOT NULL DEFAULT 0,
    imported     INTEGER NOT NULL DEFAULT 0,   -- vectors taken from --source-index
    embedded     INTEGER NOT NULL DEFAULT 0,
    failed       INTEGER NOT NULL DEFAULT 0,
    decoded      INTEGER NOT NULL DEFAULT 0,   -- files opened and decoded by this run
    exported     INTEGER NOT NULL DEFAULT 0
);

-- Small key/value facts, e.g. the last export written (to skip re-importing our own output).
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
