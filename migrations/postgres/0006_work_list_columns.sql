-- Work lists (issue 16): the search values task-queue applications filter and sort by all
-- day live on the Task row as well as in the index tables (see fhir::search::TaskColumns),
-- so that one index on the row serves a whole work-list search instead of intersecting
-- lists of ids from task_token and task_date. The index tables stay the source for every
-- other parameter and for Tasks with several performer types (`performer` = '').
ALTER TABLE task
    ADD COLUMN status text COLLATE "C",
    ADD COLUMN owner text COLLATE "C",
    ADD COLUMN performer text COLLATE "C",
    ADD COLUMN performer_system text COLLATE "C",
    ADD COLUMN due_start text COLLATE "C",
    ADD COLUMN due_end text COLLATE "C",
    ADD COLUMN authored_on text COLLATE "C";

-- Tasks written before this migration get their columns from their index rows.
UPDATE task SET
    status = (SELECT value FROM task_token k WHERE k.task_id = task.id AND k.param = 'status'),
    owner = (SELECT value FROM task_token k WHERE k.task_id = task.id AND k.param = 'owner'),
    performer = (SELECT CASE WHEN count(*) = 1 THEN max(value) WHEN count(*) > 1 THEN '' END
                 FROM task_token k WHERE k.task_id = task.id AND k.param = 'performer'),
    performer_system = (SELECT CASE WHEN count(*) = 1 THEN max(system) END
                 FROM task_token k WHERE k.task_id = task.id AND k.param = 'performer'),
    due_start = (SELECT start_at FROM task_date d WHERE d.task_id = task.id AND d.param = 'due-date'),
    due_end = (SELECT end_at FROM task_date d WHERE d.task_id = task.id AND d.param = 'due-date'),
    authored_on = (SELECT start_at FROM task_date d WHERE d.task_id = task.id AND d.param = 'authored-on')
WHERE deleted = 0;

-- Every index is partial on live Tasks and ends in (last_updated, id), the tie-break of every
-- sort, so that a search walks it in the order it answers in and stops at `_count`.
CREATE INDEX task_by_status ON task (status, last_updated, id) WHERE deleted = 0;
CREATE INDEX task_by_owner ON task (owner, status, priority_rank)
    WHERE deleted = 0 AND owner IS NOT NULL;
CREATE INDEX task_queue ON task (performer, status, last_updated, id)
    WHERE deleted = 0 AND owner IS NULL;
CREATE INDEX task_by_due ON task (due_start, last_updated, id, status) WHERE deleted = 0;
CREATE INDEX task_by_authored ON task (authored_on, last_updated, id) WHERE deleted = 0;
CREATE INDEX task_token_system ON task_token (param, value, system, task_id);
DROP INDEX task_token_lookup;
-- Fresh statistics for the planner, which otherwise knows nothing of the new columns until
-- autovacuum's next analyze.
ANALYZE task;
