-- Support for the query commands (search, similar, duplicates, status).
-- Append-only: never edit a migration that has shipped; add 0003_*.sql instead.

-- A persistent change counter for the vectors a search can see. The query commands keep
-- the vectors of a model as one float32 matrix in a cache folder beside the database and
-- reuse it for as long as this counter has not moved. Triggers keep it, so no write path
-- (state.py, an import, a hand-made sqlite3 edit) can forget to. PRAGMA data_version is no
-- substitute: it only counts the changes one connection has seen.
-- database_id tells this database from another that reaches the same count (a database
-- deleted and built again at the same path).
INSERT INTO meta (key, value) VALUES ('database_id', lower(hex(randomblob(16))));
INSERT INTO meta (key, value) VALUES ('vectors_version', '0');

-- A row counts when it is, or was, 'ok': pending and failed rows hold no vector. The
-- columns are those a search reads (the vector and what the filters look at). A no-change
-- re-index writes none of them, so the counter, and the cache, stay as they are.
CREATE TRIGGER files_vectors_insert AFTER INSERT ON files
WHEN NEW.status = 'ok'
BEGIN
    UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'vectors_version';
END;

CREATE TRIGGER files_vectors_update AFTER UPDATE OF path, status, model, dim, embedding, exif, mtime_ns ON files
WHEN OLD.status = 'ok' OR NEW.status = 'ok'
BEGIN
    UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'vectors_version';
END;

CREATE TRIGGER files_vectors_delete AFTER DELETE ON files
WHEN OLD.status = 'ok'
BEGIN
    UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'vectors_version';
END;

-- Images per state and vectors per model (status, and the choice of the model to search)
-- are counted from this small index, never from the rows with their vectors. It starts
-- with status, so it also serves every query files_status (status) served, and replaces it.
DROP INDEX files_status;
CREATE INDEX files_status_model ON files (status, model, dim);
