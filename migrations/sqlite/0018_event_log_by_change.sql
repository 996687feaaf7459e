-- The event log keyed by change, so that recording a chunk of matches appends its rows at
-- one end of one B-tree (a few pages) instead of one row on each matched subscription's own
-- leaf page (one page per catch-all per chunk, BENCHMARKS.md, issue 15). A row is still a run
-- of `events` consecutive event numbers from `event_number` of subscription
-- `subscription_id`, told of the changes `change_seq`, `change_seq + 1`, …; a subscription
-- has at most one run starting at a change.
--
-- Reading one subscription's log goes through its *marked* runs, the only ones in the
-- partial index `subscription_event_marks`: a subscription's first run is marked, and so is
-- every run that starts `hub::MARK_SPAN` changes or more after its latest mark
-- (`subscription.mark_seq`). Every unmarked run therefore starts less than `MARK_SPAN`
-- changes after the latest mark before it: a read seeks the mark and scans at most that many
-- changes of the log. A subscription that hears every change is marked about once per
-- `MARK_SPAN` changes; one that hears rarely has every run marked (one index entry each, as
-- the old layout had one row each).
CREATE TABLE subscription_event_by_change (
    change_seq      INTEGER NOT NULL,
    subscription_id TEXT NOT NULL,
    event_number    INTEGER NOT NULL,
    events          INTEGER NOT NULL CHECK (events >= 1),
    occurred_at     TEXT NOT NULL,
    marked          INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (change_seq, subscription_id)
) WITHOUT ROWID;

-- Every existing run is marked: each stays findable by one seek, as before.
INSERT INTO subscription_event_by_change
    (change_seq, subscription_id, event_number, events, occurred_at, marked)
SELECT change_seq, subscription_id, event_number, events, occurred_at, 1 FROM subscription_event;

DROP TABLE subscription_event;
ALTER TABLE subscription_event_by_change RENAME TO subscription_event;
CREATE INDEX subscription_event_by_time ON subscription_event (occurred_at);
CREATE INDEX subscription_event_marks ON subscription_event (subscription_id, event_number)
    WHERE marked <> 0;

-- The `change_seq` of the subscription's latest marked run; NULL before its first (or for a
-- subscription whose runs were written before this migration: its next run is marked).
ALTER TABLE subscription ADD COLUMN mark_seq INTEGER;
