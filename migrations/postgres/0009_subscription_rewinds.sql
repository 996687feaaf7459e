-- How many times an admin has restarted a subscription's delivery from an earlier event
-- (`$resend`). A delivery report moves `delivered_through` only if no restart happened since
-- its attempt read the row, so an attempt in flight cannot undo a restart.
ALTER TABLE subscription ADD COLUMN rewinds bigint NOT NULL DEFAULT 0;
