-- Referrals: one per (case, target agency). search_path is the referral schema.
create table referral (
    referral_id      uuid primary key,
    case_id          uuid not null,
    municipality     text not null,
    agency           text not null,
    office_id        text not null,
    status           text not null default 'pending'
                     check (status in ('pending','acknowledged','accepted','declined','completed','closed')),
    priority         text not null check (priority in ('urgent','high','normal')),
    rule_id          text not null,
    rule_version     integer not null,
    matched_rules    text[] not null default '{}',
    legal_basis      text not null,
    age_band         text not null,
    sector           text not null,
    reported_by      text not null,
    source_event_id  uuid not null,           -- the case.identified event that opened it
    correlation_id   text not null,
    identified_at    timestamptz not null,    -- event time: the deadline counts from it
    deadline         timestamptz not null,
    decline_reason   text,
    outcome          text,
    overdue          boolean not null default false,
    overdue_at       timestamptz,
    escalated        boolean not null default false,
    escalated_at     timestamptz,
    escalated_to     text,
    escalation_reason text,
    created_at       timestamptz not null default now(),
    updated_at       timestamptz not null default now(),
    acknowledged_at  timestamptz,
    accepted_at      timestamptz,
    declined_at      timestamptz,
    completed_at     timestamptz,
    closed_at        timestamptz,
    unique (case_id, agency)
);
create index referral_by_scope on referral (municipality, agency, status);
create index referral_by_case on referral (case_id);
-- the deadline scanner only looks at referrals still waiting for an answer and not yet overdue
create index referral_due on referral (deadline)
    where status in ('pending', 'acknowledged') and not overdue;

-- Audit trail: every change of a referral, who made it and when.
create table referral_history (
    id           bigserial primary key,
    referral_id  uuid not null references referral(referral_id),
    at           timestamptz not null default now(),
    actor        text not null,               -- officer subject, or 'referral' for the service
    action       text not null,               -- created, acknowledge, accept, decline, complete, overdue, escalate
    from_status  text,
    to_status    text not null,
    detail       jsonb not null default '{}'::jsonb,
    event_id     uuid                         -- the outbox event that published the change
);
create index referral_history_by_referral on referral_history (referral_id, id);
