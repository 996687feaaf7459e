-- The event log in runs, for fan-out at tens of thousands of events a second: a row is a run
-- of `events` consecutive event numbers from `event_number`, told of the changes
-- `change_seq`, `change_seq + 1`, … in that order. The change itself (Task id, version,
-- interaction, time) is read from `change_event`, which is never pruned, instead of being
-- copied into every row. A catch-all subscription that hears every change of a chunk gets
-- one row for the chunk; an owner subscription a run of one. `occurred_at` is the time of
-- the run's latest change, for pruning. Without a rowid, a row is one entry in one B-tree.
CREATE TABLE subscription_event_run (
    subscription_id TEXT NOT NULL,
    event_number    INTEGER NOT NULL,
    change_seq      INTEGER NOT NULL,
    events          INTEGER NOT NULL CHECK (events >= 1),
    occurred_at     TEXT NOT NULL,
    PRIMARY KEY (subscription_id, event_number)
) WITHOUT ROWID;

-- Each existing event becomes a run of one: its Task id, version, interaction and time were
-- copied from its change, so replaying it from `change_event` gives the same event.
INSERT INTO subscription_event_run (subscription_id, event_number, change_seq, events, occurred_at)
SELECT subscription_id, event_number, change_seq, 1, occurred_at FROM subscription_event;

DROP TABLE subscription_event;
ALTER TABLE subscription_event_run RENAME TO subscription_event;
CREATE INDEX subscription_event_by_time ON subscription_event (occurred_at);

-- Progress inside one change whose matches are recorded in several chunks
-- (`hub.fanout_chunk`): the matches of change `partial_seq` to subscriptions with ids up to
-- `partial_through` are recorded; both NULL at a change boundary.
ALTER TABLE outbox_cursor ADD COLUMN partial_seq INTEGER;
ALTER TABLE outbox_cursor ADD COLUMN partial_through TEXT;
