-- A subscription belongs to its author's whole identity (auth::Identity): issuer, subject,
-- role and FHIR user, one column each so that "the subscriptions of this identity" is an exact
-- comparison the store can index. '' stands for "none" (no `iss`: the local issuer; no
-- `fhirUser`); tokens never carry an empty `iss` or `fhirUser`, so '' is unambiguous.
-- Authors stored before this migration have no issuer in their JSON: they are the local
-- issuer, as tokens without `iss` still are.
ALTER TABLE subscription
    ADD COLUMN author_issuer    text COLLATE "C" NOT NULL DEFAULT '',
    ADD COLUMN author_subject   text COLLATE "C" NOT NULL DEFAULT '',
    ADD COLUMN author_role      text COLLATE "C" NOT NULL DEFAULT '',
    ADD COLUMN author_fhir_user text COLLATE "C" NOT NULL DEFAULT '';
UPDATE subscription SET
    author_issuer    = coalesce(author::json ->> 'issuer', ''),
    author_subject   = coalesce(author::json ->> 'subject', ''),
    author_role      = coalesce(author::json ->> 'role', ''),
    author_fhir_user = coalesce(author::json ->> 'fhir_user', '');
-- Serves the author's searches and the per-author quota (live subscriptions of one identity).
CREATE INDEX subscription_by_author
    ON subscription (author_subject, author_role, author_fhir_user, author_issuer, status);
