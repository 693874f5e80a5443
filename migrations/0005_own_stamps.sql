-- Writers of many rows at once may stamp them themselves.
-- Append-only: never edit a migration that has shipped; add 0006_*.sql instead.

-- The triggers of 0002 and 0003 run two statements for every row a statement changes; a
-- re-index that moves 10,000 renamed rows spends most of its UPDATE in them. A writer that
-- changes many rows in one transaction (content.move_renamed, content.adopt) now moves
-- record_stamp (and vectors_version, where it writes vectors a search sees) once itself,
-- and sets each row's stamp to the new value of record_stamp: a row whose stamp a
-- statement sets to the counter's current value is left to that statement (for an insert,
-- only a pending row: move_renamed's). Every other write (state.py's others, an import, a
-- hand-made sqlite3 edit, which does not set the stamp, an INSERT ... SELECT that copies a
-- row with its stamp) is stamped and counted by the triggers, as before; a statement that
-- sets a stamp to the current counter's value on purpose takes the writers' duty on itself.
-- Many rows may share a stamp: the export and the caches only ask whether a stamp is above
-- one they saw.

DROP TRIGGER files_stamp_insert;
CREATE TRIGGER files_stamp_insert AFTER INSERT ON files
WHEN NEW.stamp = 0 OR NEW.status IS NOT 'pending'
    OR NEW.stamp IS NOT (SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'record_stamp')
BEGIN
    UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'record_stamp';
    UPDATE files SET stamp = (SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'record_stamp')
    WHERE id = NEW.id;
END;

DROP TRIGGER files_stamp_update;
CREATE TRIGGER files_stamp_update
AFTER UPDATE OF path, size, mtime_ns, ctime_ns, status, width, height, model, dim, exif, embedding ON files
WHEN NEW.stamp IS OLD.stamp
    OR NEW.stamp IS NOT (SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'record_stamp')
BEGIN
    UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'record_stamp';
    UPDATE files SET stamp = (SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'record_stamp')
    WHERE id = NEW.id;
END;

DROP TRIGGER files_vectors_update;
CREATE TRIGGER files_vectors_update AFTER UPDATE OF path, status, model, dim, embedding, exif, mtime_ns ON files
WHEN (OLD.status = 'ok' OR NEW.status = 'ok') AND (NEW.stamp IS OLD.stamp
    OR NEW.stamp IS NOT (SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'record_stamp'))
BEGIN
    UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'vectors_version';
END;
