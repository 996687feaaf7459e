-- `_id` and `_lastUpdated` are answered from the Task row's own `id` and `last_updated`
-- (fhir::search::ON_THE_ROW, store::search_sql), so their index rows, which repeated those
-- two values for every Task, are no longer written: a Task write puts seven B-tree entries
-- fewer (a `task_token` row's three, a `task_date` row's four). The rows written before
-- this migration go; both lookups walk an index on `param` to find them.
DELETE FROM task_token WHERE param = '_id';
DELETE FROM task_date WHERE param = '_lastUpdated';
