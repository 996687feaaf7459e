-- The audit trail: one FHIR AuditEvent per row, with the columns its search parameters read.
-- `seq` orders rows written at the same instant and keys the `next` links of a search.
-- A Task write's AuditEvent is inserted in the same transaction as its change event.
CREATE TABLE audit_event (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    recorded TEXT NOT NULL,
    type_code TEXT NOT NULL,
    subtype TEXT NOT NULL,
    outcome TEXT NOT NULL,
    -- The agent's fhirUser reference, or the sub of a token without one.
    agent TEXT,
    -- The entity's reference without its version (`Task/1`); NULL for searches.
    entity TEXT,
    resource TEXT NOT NULL
);
CREATE INDEX audit_event_recorded ON audit_event (recorded, seq);
CREATE INDEX audit_event_entity ON audit_event (entity, recorded, seq) WHERE entity IS NOT NULL;
CREATE INDEX audit_event_agent ON audit_event (agent, recorded, seq) WHERE agent IS NOT NULL;
