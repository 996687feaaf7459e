-- A subscription belongs to its author's whole identity (auth::Identity): issuer, subject,
-- role and FHIR user, one column each so that "the subscriptions of this identity" is an exact
-- comparison the store can index. '' stands for "none" (no `iss`: the local issuer; no
-- `fhirUser`); tokens never carry an empty `iss` or `fhirUser`, so '' is unambiguous.
-- Authors stored before this migration have no issuer in their JSON: they are the local
-- issuer, as tokens without `iss` still are.
ALTER TABLE subscription ADD COLUMN author_issuer TEXT NOT NULL DEFAULT '';
ALTER TABLE subscription ADD COLUMN author_subject TEXT NOT NULL DEFAULT '';
ALTER TABLE subscription ADD COLUMN author_role TEXT NOT NULL DEFAULT '';
ALTER TABLE subscription ADD COLUMN author_fhir_user TEXT NOT NULL DEFAULT '';
UPDATE subscription SET
    author_issuer    = coalesce(json_extract(author, '$.issuer'), ''),
    author_subject   = coalesce(json_extract(author, '$.subject'), ''),
    author_role      = coalesce(json_extract(author, '$.role'), ''),
    author_fhir_user = coalesce(json_extract(author, '$.fhir_user'), '');
-- Serves the author's searches and the per-author quota (live subscriptions of one identity).
CREATE INDEX subscription_by_author
    ON subscription (author_subject, author_role, author_fhir_user, author_issuer, status);
