-- The event log in runs, for fan-out at tens of thousands of events a second: a row is a run
-- of `events` consecutive event numbers from `event_number`, told of the changes
-- `change_seq`, `change_seq + 1`, … in that order. The change itself (Task id, version,
-- interaction, time) is read from `change_event`, which is never pruned, instead of being
-- copied into every row. A catch-all subscription that hears every change of a chunk gets
-- one row for the chunk; an owner subscription a run of one. `occurred_at` is the time of
-- the run's latest change, for pruning.
--
-- Each existing event becomes a run of one: its Task id, version, interaction and time were
-- copied from its change, so replaying it from `change_event` gives the same event.
ALTER TABLE subscription_event
    ADD COLUMN events bigint NOT NULL DEFAULT 1 CHECK (events >= 1),
    DROP COLUMN task_id,
    DROP COLUMN version,
    DROP COLUMN interaction;
ALTER TABLE subscription_event ALTER COLUMN events DROP DEFAULT;

-- Progress inside one change whose matches are recorded in several chunks
-- (`hub.fanout_chunk`): the matches of change `partial_seq` to subscriptions with ids up to
-- `partial_through` are recorded; both NULL at a change boundary.
ALTER TABLE outbox_cursor
    ADD COLUMN partial_seq bigint,
    ADD COLUMN partial_through text COLLATE "C";
