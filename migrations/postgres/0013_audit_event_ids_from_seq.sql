-- An AuditEvent's id is derived from its `seq` (`store::audit_sql::event_id`) and spliced
-- into the resource when it is read, so a write no longer fills a UNIQUE index on a random
-- id (BENCHMARKS.md, "The audit trail's cost"). The AuditEvents written before this
-- migration keep their ids in `legacy_id`, behind a partial index new rows (NULL) never enter.
ALTER TABLE audit_event RENAME COLUMN id TO legacy_id;
ALTER TABLE audit_event ALTER COLUMN legacy_id DROP NOT NULL;
ALTER TABLE audit_event DROP CONSTRAINT audit_event_id_key;
CREATE UNIQUE INDEX audit_event_legacy_id ON audit_event (legacy_id) WHERE legacy_id IS NOT NULL;
