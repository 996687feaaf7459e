-- The audit trail, rebuilt so that an AuditEvent costs the Task write that carries it fewer
-- B-tree writes (BENCHMARKS.md, "The audit trail's cost"):
-- * `seq` is the rowid without AUTOINCREMENT: no `sqlite_sequence` write per row. Rowids
--   still only grow while rows are appended; an AuditEvent's id is `{seq}-{digits of
--   recorded}` (`store::audit_sql::event_id`), so a `seq` handed out again after every row
--   was pruned never names an earlier AuditEvent.
-- * No random-key UNIQUE index: the id is derived from `seq` and spliced into the resource
--   when it is read, and a read by id is a primary-key lookup. The AuditEvents written
--   before this migration keep their ids in `legacy_id`, behind a partial index that new
--   rows (NULL) never enter.
-- * The date, entity and agent indexes end at `recorded`: every index entry ends with the
--   rowid, so `(recorded)` already orders by `(recorded, seq)`.
CREATE TABLE audit_event_by_seq (
    seq INTEGER PRIMARY KEY,
    recorded TEXT NOT NULL,
    type_code TEXT NOT NULL,
    subtype TEXT NOT NULL,
    outcome TEXT NOT NULL,
    -- The agent's fhirUser reference, or the sub of a token without one.
    agent TEXT,
    -- The entity's reference without its version (`Task/1`); NULL for searches.
    entity TEXT,
    -- The AuditEvent as compact JSON; without its `id` unless `legacy_id` is set.
    resource TEXT NOT NULL,
    -- The id of an AuditEvent written before this migration (already in its `resource`).
    legacy_id TEXT
);
INSERT INTO audit_event_by_seq (seq, recorded, type_code, subtype, outcome, agent, entity, resource, legacy_id)
    SELECT seq, recorded, type_code, subtype, outcome, agent, entity, resource, id FROM audit_event;
DROP TABLE audit_event;
ALTER TABLE audit_event_by_seq RENAME TO audit_event;
CREATE UNIQUE INDEX audit_event_legacy_id ON audit_event (legacy_id) WHERE legacy_id IS NOT NULL;
CREATE INDEX audit_event_recorded ON audit_event (recorded);
CREATE INDEX audit_event_entity ON audit_event (entity, recorded) WHERE entity IS NOT NULL;
CREATE INDEX audit_event_agent ON audit_event (agent, recorded) WHERE agent IS NOT NULL;
