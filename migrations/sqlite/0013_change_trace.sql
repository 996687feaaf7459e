-- The W3C trace context (`traceparent`) of the request that made the change, so that every
-- notification about it continues that trace. NULL for changes made by Baton's own timers and
-- for changes recorded before this column existed.
ALTER TABLE change_event ADD COLUMN traceparent TEXT;
