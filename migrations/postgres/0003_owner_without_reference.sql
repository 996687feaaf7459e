-- A Task whose `owner` names someone only by display or identifier is owned, not queued:
-- fhir::search::index_task now files it under `owner` with a value no search can name
-- (fhir::task::OWNER_WITHOUT_REFERENCE), so `owner:missing=true` leaves it out. Tasks
-- written before this migration get that index row here.
INSERT INTO task_token (task_id, param, system, value)
SELECT id, 'owner', NULL, '(owner without reference)'
FROM task
WHERE deleted = 0
  AND json_typeof(resource::json -> 'owner') IS NOT NULL
  AND json_typeof(resource::json -> 'owner') <> 'null'
  AND (resource::json -> 'owner' ->> 'reference') IS NULL;
