-- The type-level history (`GET /fhir/Task/_history`, issue 17) pages through every version
-- newest first, from `_since` or after a `next` link's key: this index walks it backwards.
CREATE INDEX task_version_by_time ON task_version (last_updated, id, version);
