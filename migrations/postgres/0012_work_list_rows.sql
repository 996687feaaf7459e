-- The work-list values live on the Task row only (issue 16): `status`, `owner`, `due-date`,
-- and `performer` of a Task with at most one performer type are no longer written as
-- task_token / task_date rows as well (see fhir::search::TaskColumns::rows_beside), so a
-- create writes the row's index entries instead of index rows beside them. Every search on
-- them is answered from the columns (store::search_sql), the overdue timer too.
-- `authored-on` keeps its rows: its column holds only its sort key, and a column for the end
-- of its range would have to be filled by rewriting every stored Task.

-- The rows the columns now hold. A Task with several performer types (`performer` = '')
-- keeps its performer rows: the column cannot say them.
DELETE FROM task_token WHERE param IN ('status', 'owner');
DELETE FROM task_token WHERE param = 'performer'
    AND task_id NOT IN (SELECT id FROM task WHERE performer = '');
DELETE FROM task_date WHERE param = 'due-date';

-- "My open tasks, most urgent first" (`owner=X&status:not=completed&_sort=-priority`): the
-- owner's Tasks in that order (priority descending, then id, the tie-break of every client
-- sort), with the status at the end, so the search walks the index in order, checks the
-- status from it and reads the Task rows of the page only (issue 16).
DROP INDEX task_by_owner;
CREATE INDEX task_by_owner ON task (owner, priority_rank DESC, id, status)
    WHERE deleted = 0 AND owner IS NOT NULL;

-- The overdue timer's walk by due date (it read task_date's `(param, end_at)` index before).
CREATE INDEX task_due_end ON task (due_end, status) WHERE deleted = 0 AND due_end IS NOT NULL;
