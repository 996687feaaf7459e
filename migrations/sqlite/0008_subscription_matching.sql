-- The matching form of each subscription: what the matcher needs of it (topic, filter
-- criteria, heartbeat, what its channel asks of the configuration), pre-parsed by the hub and
-- written with the resource at every create and replace, so that start-up reads this small
-- text instead of parsing every Subscription resource again. NULL for rows written before
-- this migration: start-up derives their form from the resource once and writes it back.
ALTER TABLE subscription ADD COLUMN matching TEXT;
