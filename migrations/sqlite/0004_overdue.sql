-- One row per Task and due date whose passing has been reported, so the overdue event fires
-- once per due date, across restarts.
CREATE TABLE task_overdue (
    task_id TEXT NOT NULL,
    due_at  TEXT NOT NULL,
    PRIMARY KEY (task_id, due_at)
);
