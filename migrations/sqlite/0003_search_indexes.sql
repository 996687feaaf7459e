-- Unfiltered pages in `_lastUpdated` order walk this index instead of sorting the table.
CREATE INDEX task_by_last_updated ON task (last_updated, id);
-- Date comparisons on the end of a range (ge, gt, eb) use this one; (param, start_at) serves
-- the others.
CREATE INDEX task_date_by_end ON task_date (param, end_at, task_id);
