-- The audit trail: one FHIR AuditEvent per row, with the columns its search parameters read.
-- `seq` orders rows written at the same instant and keys the `next` links of a search.
-- A Task write's AuditEvent is inserted by the same statement as its change event.
CREATE TABLE audit_event (
    seq bigserial PRIMARY KEY,
    id text NOT NULL UNIQUE,
    recorded text NOT NULL,
    type_code text NOT NULL,
    subtype text NOT NULL,
    outcome text NOT NULL,
    -- The agent's fhirUser reference, or the sub of a token without one.
    agent text,
    -- The entity's reference without its version (`Task/1`); NULL for searches.
    entity text,
    resource text NOT NULL
);
CREATE INDEX audit_event_recorded ON audit_event (recorded, seq);
CREATE INDEX audit_event_entity ON audit_event (entity, recorded, seq) WHERE entity IS NOT NULL;
CREATE INDEX audit_event_agent ON audit_event (agent, recorded, seq) WHERE agent IS NOT NULL;
