-- Whether each referral intake knows of is still open (from referral.completed / declined /
-- closed on clms.referral-events): a worst-form case is not closed while its police or
-- prosecution referral is open (shared/access_policy.yaml, case.close). And what a case event
-- recorded beyond its type: non-personal facts in `detail`, free text (the coordinator's
-- override reason when closing anyway) encrypted under the case's data key in `note_ciphertext`,
-- so crypto-erasure of the case erases it too.
alter table case_access add column open boolean not null default true;
alter table case_access add column closed_at timestamptz;
alter table case_events add column detail jsonb;
alter table case_events add column note_ciphertext bytea;
