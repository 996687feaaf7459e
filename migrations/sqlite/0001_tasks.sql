-- Tasks: the current version of each Task, every version, the search index and the outbox.

CREATE TABLE task (
    id            TEXT PRIMARY KEY,
    version       INTEGER NOT NULL,
    last_updated  TEXT NOT NULL,
    deleted       INTEGER NOT NULL DEFAULT 0,
    priority_rank INTEGER NOT NULL,
    resource      TEXT NOT NULL
);

-- One row per version; a delete is a version without a resource.
CREATE TABLE task_version (
    id           TEXT NOT NULL,
    version      INTEGER NOT NULL,
    last_updated TEXT NOT NULL,
    interaction  TEXT NOT NULL,
    resource     TEXT,
    PRIMARY KEY (id, version)
);

-- Token and reference search values of the current version (see fhir::search::index_task).
CREATE TABLE task_token (
    task_id TEXT NOT NULL,
    param   TEXT NOT NULL,
    system  TEXT,
    value   TEXT NOT NULL
);
CREATE INDEX task_token_lookup ON task_token (param, value, task_id);
CREATE INDEX task_token_task ON task_token (task_id);

-- Date search values of the current version, as half-open UTC ranges.
CREATE TABLE task_date (
    task_id  TEXT NOT NULL,
    param    TEXT NOT NULL,
    start_at TEXT NOT NULL,
    end_at   TEXT NOT NULL
);
CREATE INDEX task_date_lookup ON task_date (param, start_at, task_id);
CREATE INDEX task_date_task ON task_date (task_id);

-- The transactional outbox: one row per Task write, committed with it, consumed in `seq` order.
CREATE TABLE change_event (
    seq              INTEGER PRIMARY KEY AUTOINCREMENT,
    resource_type    TEXT NOT NULL,
    resource_id      TEXT NOT NULL,
    version          INTEGER NOT NULL,
    previous_version INTEGER,
    interaction      TEXT NOT NULL,
    recorded_at      TEXT NOT NULL
);
