-- Whether each referral intake knows of is still open (from referral.completed / declined /
-- closed on clms.referral-events): a worst-form case is not closed while its police or
-- prosecution referral is open (shared/access_policy.yaml, case.close). And what a case event
-- recorded beyond its type (the coordinator's override reason when closing anyway).
alter table case_access add column open boolean not null default true;
alter table case_access add column closed_at timestamptz;
alter table case_events add column detail jsonb;
