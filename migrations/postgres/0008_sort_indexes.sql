-- A role queue's count (`_total=estimate`: up to 1 001 matches) checks each Task's
-- performer system: with it at the end of the queue's index the count can be answered from
-- the index (an index-only scan where the visibility map allows), and the page still walks
-- the queue oldest first (issue 16).
DROP INDEX task_queue;
CREATE INDEX task_queue ON task (performer, status, last_updated, id, performer_system)
    WHERE deleted = 0 AND owner IS NULL;
-- A client's sort is broken by the id alone (`search_sql::sort_terms`): a tie-break on the
-- last change let a Task updated while a client paged come back on a later page. The date
-- orders are walked on indexes in that order.
DROP INDEX task_by_due;
CREATE INDEX task_by_due ON task (due_start, id, status) WHERE deleted = 0;
DROP INDEX task_by_authored;
CREATE INDEX task_by_authored ON task (authored_on, id) WHERE deleted = 0;
