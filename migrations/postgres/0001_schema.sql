-- The shared store of a cluster: the same tables as the SQLite schema (migrations/sqlite), plus
-- what several nodes need to share one database: a `matched` flag on the outbox (sequence
-- values commit out of order here), leases, delivery claims and a subscription generation.
--
-- Resources are kept as TEXT holding the JSON exactly as written (jsonb would reorder keys).
-- Text that is compared or sorted is declared COLLATE "C", so that it orders byte-wise, as in
-- SQLite, whatever the database's default collation. Instants are TEXT in Baton's fixed
-- format (`fhir::datetime::format_instant`), which sorts chronologically; only leases and
-- claims, compared with the database's `now()` by every node, are timestamptz.

-- Tasks: the current version of each Task, every version, the search index and the outbox.

CREATE TABLE task (
    id            text COLLATE "C" PRIMARY KEY,
    version       bigint NOT NULL,
    last_updated  text COLLATE "C" NOT NULL,
    deleted       integer NOT NULL DEFAULT 0,
    priority_rank bigint NOT NULL,
    resource      text NOT NULL
);
-- Unfiltered pages in `_lastUpdated` order walk this index instead of sorting the table.
CREATE INDEX task_by_last_updated ON task (last_updated, id);

-- One row per version; a delete is a version without a resource.
CREATE TABLE task_version (
    id           text COLLATE "C" NOT NULL,
    version      bigint NOT NULL,
    last_updated text COLLATE "C" NOT NULL,
    interaction  text NOT NULL,
    resource     text,
    PRIMARY KEY (id, version)
);

-- Token and reference search values of the current version (see fhir::search::index_task).
CREATE TABLE task_token (
    task_id text COLLATE "C" NOT NULL,
    param   text COLLATE "C" NOT NULL,
    system  text COLLATE "C",
    value   text COLLATE "C" NOT NULL
);
CREATE INDEX task_token_lookup ON task_token (param, value, task_id);
CREATE INDEX task_token_task ON task_token (task_id);

-- Date search values of the current version, as half-open UTC ranges.
CREATE TABLE task_date (
    task_id  text COLLATE "C" NOT NULL,
    param    text COLLATE "C" NOT NULL,
    start_at text COLLATE "C" NOT NULL,
    end_at   text COLLATE "C" NOT NULL
);
CREATE INDEX task_date_lookup ON task_date (param, start_at, task_id);
-- Date comparisons on the end of a range (ge, gt, eb) use this one.
CREATE INDEX task_date_by_end ON task_date (param, end_at, task_id);
CREATE INDEX task_date_task ON task_date (task_id);

-- The transactional outbox: one row per Task write, committed with it. Concurrent
-- transactions commit out of `seq` order, so a position cannot say what was consumed: each
-- row is marked `matched` in the transaction that records its matches, and the matcher reads
-- the unmatched rows, which the partial index keeps cheap to find.
CREATE TABLE change_event (
    seq              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    resource_type    text NOT NULL,
    resource_id      text COLLATE "C" NOT NULL,
    version          bigint NOT NULL,
    previous_version bigint,
    interaction      text NOT NULL,
    recorded_at      text COLLATE "C" NOT NULL,
    matched          boolean NOT NULL DEFAULT false
);
CREATE INDEX change_event_unmatched ON change_event (seq) WHERE NOT matched;

-- One row per Task and due date whose passing has been reported, so the overdue event fires
-- once per due date, across restarts and across nodes.
CREATE TABLE task_overdue (
    task_id text COLLATE "C" NOT NULL,
    due_at  text COLLATE "C" NOT NULL,
    PRIMARY KEY (task_id, due_at)
);

-- Subscriptions, their durable event log, the matcher's position and the work-sharing state.

-- One row per subscription. The row is also its delivery queue: events numbered above
-- `delivered_through` are waiting, in order; `failures`, `failing_since` and
-- `next_attempt_at` are the retry state. `status` is authoritative over the stored resource.
-- `generation` is the subscription generation of its last create or replace;
-- `lease_holder`/`lease_until` are a node's claim on its delivery.
CREATE TABLE subscription (
    id                 text COLLATE "C" PRIMARY KEY,
    version            bigint NOT NULL,
    last_updated       text COLLATE "C" NOT NULL,
    status             text COLLATE "C" NOT NULL,
    topic_url          text NOT NULL,
    channel_type       text NOT NULL,
    endpoint           text COLLATE "C",
    author             text NOT NULL,
    resource           text NOT NULL,
    created_after_seq  bigint NOT NULL,
    events_since_start bigint NOT NULL DEFAULT 0,
    delivered_through  bigint NOT NULL DEFAULT 0,
    handshake_pending  integer NOT NULL DEFAULT 0,
    failures           bigint NOT NULL DEFAULT 0,
    failing_since      text COLLATE "C",
    next_attempt_at    text COLLATE "C",
    last_error         text,
    last_sent_at       text COLLATE "C",
    generation         bigint NOT NULL,
    lease_holder       text,
    lease_until        timestamptz
);
CREATE INDEX subscription_by_status ON subscription (status);
CREATE INDEX subscription_by_generation ON subscription (generation);

-- The event log: what each subscription was told (or will be told), by event number.
CREATE TABLE subscription_event (
    subscription_id text COLLATE "C" NOT NULL,
    event_number    bigint NOT NULL,
    change_seq      bigint NOT NULL,
    task_id         text COLLATE "C" NOT NULL,
    version         bigint NOT NULL,
    interaction     text NOT NULL,
    occurred_at     text COLLATE "C" NOT NULL,
    PRIMARY KEY (subscription_id, event_number)
);
CREATE INDEX subscription_event_by_time ON subscription_event (occurred_at);

-- The highest outbox `seq` each consumer has recorded.
CREATE TABLE outbox_cursor (
    consumer text PRIMARY KEY,
    seq      bigint NOT NULL
);

-- The generation of the subscription table: every create, replace and delete of a
-- subscription takes the next one while holding this row's lock, so generations commit in
-- order and a node that read generation g can ask what changed after it.
CREATE TABLE subscription_generation (
    only_row   boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    generation bigint NOT NULL
);
INSERT INTO subscription_generation (only_row, generation) VALUES (true, 0);

-- Deleted subscriptions, with the generation of their delete.
CREATE TABLE subscription_tombstone (
    id         text COLLATE "C" PRIMARY KEY,
    generation bigint NOT NULL
);
CREATE INDEX subscription_tombstone_by_generation ON subscription_tombstone (generation);

-- Named leases (the matcher's), held by one node until they expire or are released.
CREATE TABLE lease (
    name       text PRIMARY KEY,
    holder     text NOT NULL,
    expires_at timestamptz NOT NULL
);
