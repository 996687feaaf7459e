-- Subscriptions, their durable event log, and the outbox cursor of the matcher.

-- One row per subscription. The row is also its delivery queue: events numbered above
-- `delivered_through` are waiting, in order; `failures`, `failing_since` and
-- `next_attempt_at` are the retry state. `status` is authoritative over the stored resource.
CREATE TABLE subscription (
    id                 TEXT PRIMARY KEY,
    version            INTEGER NOT NULL,
    last_updated       TEXT NOT NULL,
    status             TEXT NOT NULL,
    topic_url          TEXT NOT NULL,
    channel_type       TEXT NOT NULL,
    endpoint           TEXT,
    author             TEXT NOT NULL,
    resource           TEXT NOT NULL,
    created_after_seq  INTEGER NOT NULL,
    events_since_start INTEGER NOT NULL DEFAULT 0,
    delivered_through  INTEGER NOT NULL DEFAULT 0,
    handshake_pending  INTEGER NOT NULL DEFAULT 0,
    failures           INTEGER NOT NULL DEFAULT 0,
    failing_since      TEXT,
    next_attempt_at    TEXT,
    last_error         TEXT,
    last_sent_at       TEXT
);
CREATE INDEX subscription_by_status ON subscription (status);

-- The event log: what each subscription was told (or will be told), by event number.
CREATE TABLE subscription_event (
    subscription_id TEXT NOT NULL,
    event_number    INTEGER NOT NULL,
    change_seq      INTEGER NOT NULL,
    task_id         TEXT NOT NULL,
    version         INTEGER NOT NULL,
    interaction     TEXT NOT NULL,
    occurred_at     TEXT NOT NULL,
    PRIMARY KEY (subscription_id, event_number)
);
CREATE INDEX subscription_event_by_time ON subscription_event (occurred_at);

-- How far each outbox consumer has read.
CREATE TABLE outbox_cursor (
    consumer TEXT PRIMARY KEY,
    seq      INTEGER NOT NULL
);
