-- The work-list data set of `baton-load search` (tools/src/bin/baton-load/search/data.rs),
-- generated in SQL straight into a Baton PostgreSQL database that `baton serve` has migrated
-- (and that holds no Tasks yet), with the rows main writes today for each Task: the `task` row
-- with its work-list columns, one `task_version`, its `task_token` and `task_date` rows as
-- `fhir::search::index_task` files them. No change events (nothing to match), no audit rows.
--
-- The same shape as the tool's, drawn with `random()` (seeded) instead of the tool's hash, so
-- the Tasks are not the tool's Task by Task; the identifiers are (`{rng_seed}-{n}`, rng_seed 1),
-- so `baton-load search --skip-seed --seed N` recognises the set.
--
-- The rows are those main writes as of 44a01fb (BENCHMARKS.md, "PostgreSQL at 1 000 000 Tasks",
-- checked against Tasks written through the API); a change to which index rows a Task gets
-- must change this file with it.
--
-- createdb bench_wl; BATON_DATABASE_URL=postgres://…/bench_wl baton serve (migrates; stop it)
-- psql -d bench_wl -v n=1000000 -f examples/seed_work_lists_postgres.sql
\set ON_ERROR_STOP on
\timing on
SET synchronous_commit = off;
SET max_parallel_workers_per_gather = 0;
SET maintenance_work_mem = '1GB';
SET work_mem = '256MB';
SELECT setseed(0.16);

-- The index definitions, kept to be rebuilt after the load (a bulk load into indexed tables
-- is several times slower than building the indexes once).
CREATE TEMP TABLE kept_index AS
  SELECT indexname, indexdef FROM pg_indexes
  WHERE schemaname = 'public' AND tablename IN ('task', 'task_version', 'task_token', 'task_date')
    AND indexname NOT IN ('task_pkey', 'task_version_pkey');
DO $$ DECLARE r record; BEGIN
  FOR r IN SELECT indexname FROM kept_index LOOP EXECUTE 'DROP INDEX ' || quote_ident(r.indexname); END LOOP;
END $$;
ALTER TABLE task DROP CONSTRAINT task_pkey;
ALTER TABLE task_version DROP CONSTRAINT task_version_pkey;

CREATE UNLOGGED TABLE gen AS
WITH draw AS (
  SELECT n, random() AS s, random() AS p, random() AS o, random() AS ok, random() AS q,
         random() AS pt, random() AS d, random() AS h, random() AS rq
  FROM generate_series(0, :n - 1) AS n
)
SELECT n,
  -- A UUIDv7-shaped id, time-ordered as the server's are: the millisecond then random bits.
  substr(t, 1, 8) || '-' || substr(t, 9, 4) || '-7' || substr(m, 1, 3) || '-8' || substr(m, 4, 3)
    || '-' || substr(m, 7, 12) AS id,
  CASE WHEN s < 0.60 THEN 'completed' WHEN s < 0.72 THEN 'requested' WHEN s < 0.80 THEN 'accepted'
       WHEN s < 0.90 THEN 'in-progress' WHEN s < 0.94 THEN 'on-hold' WHEN s < 0.97 THEN 'ready'
       ELSE 'cancelled' END AS status,
  CASE WHEN p < 0.70 THEN 'routine' WHEN p < 0.90 THEN 'urgent' WHEN p < 0.97 THEN 'asap'
       ELSE 'stat' END AS priority,
  CASE WHEN ok >= 0.30 THEN 'Practitioner/p' || floor(o * 1000)::int END AS owner,
  (ARRAY['triage','pharmacy','radiology','laboratory','discharge','bed-management','wound-care',
         'physiotherapy','dietetics','social-work','cardiology','oncology','transport','scheduling',
         'clinical-coding','billing','infection-control','pain-team','respiratory',
         'palliative-care'])[1 + floor(q * 20)::int] AS queue,
  'Patient/pt' || floor(pt * 20000)::int AS patient,
  date '2027-01-01' + floor(d * 365)::int AS due_day,
  8 + floor(h * 10)::int AS due_hour,
  'Practitioner/p' || floor(rq * 1000)::int AS requester,
  to_char(timestamp '2026-12-01 00:00:00' + n * interval '1 millisecond',
          'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"') AS last_updated
FROM draw,
  LATERAL (SELECT lpad(to_hex(1796083200000 + n), 12, '0') AS t, md5(n::text) AS m) AS x;

CREATE UNLOGGED TABLE gen_json AS
SELECT g.*,
  to_char(due_day, 'YYYY-MM-DD') || 'T' || lpad(due_hour::text, 2, '0') || ':00:00Z' AS due_text,
  to_char(due_day - 7, 'YYYY-MM-DD') || 'T08:00:00Z' AS authored_text
FROM gen g;

-- The Task as the server stores it: compact JSON, in the tool's key order, then id and meta
-- (checked against a Task written through the API; every value here is plain ASCII).
CREATE UNLOGGED TABLE gen_resource AS
SELECT j.n, j.id,
  '{"resourceType":"Task","identifier":[{"system":"urn:baton-load:search","value":"1-' || j.n
  || '"}],"status":"' || j.status || '","intent":"order","priority":"' || j.priority
  || '","code":{"coding":[{"system":"http://hl7.org/fhir/CodeSystem/task-code","code":"fulfill"}]}'
  || ',"description":"Work-list Task ' || j.n || '","focus":{"reference":"ServiceRequest/sr' || j.n
  || '"},"for":{"reference":"' || j.patient || '"},"authoredOn":"' || j.authored_text
  || '","requester":{"reference":"' || j.requester || '"},"performerType":[{"coding":[{"system":'
  || '"http://baton.example/CodeSystem/work-queue","code":"' || j.queue || '"}]}],'
  || '"restriction":{"period":{"end":"' || j.due_text || '"}}'
  || CASE WHEN j.owner IS NOT NULL THEN ',"owner":{"reference":"' || j.owner || '"}' ELSE '' END
  || ',"id":"' || j.id || '","meta":{"versionId":"1","lastUpdated":"' || j.last_updated || '"}}'
  AS resource
FROM gen_json j;

INSERT INTO task (id, version, last_updated, deleted, priority_rank, resource,
                  status, owner, performer, performer_system, due_start, due_end, authored_on)
SELECT j.id, 1, j.last_updated, 0,
  CASE j.priority WHEN 'urgent' THEN 2 WHEN 'asap' THEN 3 WHEN 'stat' THEN 4 ELSE 1 END,
  r.resource,
  j.status, j.owner, j.queue, 'http://baton.example/CodeSystem/work-queue',
  to_char(j.due_day, 'YYYY-MM-DD') || 'T' || lpad(j.due_hour::text, 2, '0') || ':00:00.000Z',
  to_char(j.due_day, 'YYYY-MM-DD') || 'T' || lpad(j.due_hour::text, 2, '0') || ':00:01.000Z',
  to_char(j.due_day - 7, 'YYYY-MM-DD') || 'T08:00:00.000Z'
FROM gen_json j JOIN gen_resource r USING (n);

INSERT INTO task_version (id, version, last_updated, interaction, resource)
SELECT id, 1, last_updated, 'create', resource FROM task;

INSERT INTO task_token (task_id, param, system, value)
SELECT j.id, v.param, v.system, v.value
FROM gen_json j, LATERAL (VALUES
  ('_id', NULL, j.id),
  ('status', 'http://hl7.org/fhir/task-status', j.status),
  ('owner', NULL, j.owner),
  ('performer', 'http://baton.example/CodeSystem/work-queue', j.queue),
  ('patient', NULL, j.patient),
  ('subject', NULL, j.patient),
  ('focus', NULL, 'ServiceRequest/sr' || j.n),
  ('requester', NULL, j.requester),
  ('code', 'http://hl7.org/fhir/CodeSystem/task-code', 'fulfill'),
  ('priority', 'http://hl7.org/fhir/request-priority', j.priority),
  ('intent', 'http://hl7.org/fhir/task-intent', 'order'),
  ('identifier', 'urn:baton-load:search', '1-' || j.n)
) AS v(param, system, value)
WHERE v.value IS NOT NULL;

INSERT INTO task_date (task_id, param, start_at, end_at)
SELECT t.id, v.param, v.start_at, v.end_at
FROM task t, LATERAL (VALUES
  ('_lastUpdated', t.last_updated,
     to_char(to_timestamp(t.last_updated, 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')::timestamp
             + interval '1 millisecond', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')),
  ('authored-on', t.authored_on, replace(t.authored_on, 'T08:00:00.000Z', 'T08:00:01.000Z')),
  ('due-date', t.due_start, t.due_end)
) AS v(param, start_at, end_at);

DROP TABLE gen_resource;
DROP TABLE gen_json;
DROP TABLE gen;

ALTER TABLE task ADD CONSTRAINT task_pkey PRIMARY KEY (id);
ALTER TABLE task_version ADD CONSTRAINT task_version_pkey PRIMARY KEY (id, version);
DO $$ DECLARE r record; BEGIN
  FOR r IN SELECT indexdef FROM kept_index LOOP EXECUTE r.indexdef; END LOOP;
END $$;
VACUUM ANALYZE task;
VACUUM ANALYZE task_version;
VACUUM ANALYZE task_token;
VACUUM ANALYZE task_date;
SELECT count(*) AS tasks FROM task;
