-- Intake: cases (personal data encrypted per case), their keys, follow-up events, referral
-- holders learned from clms.referral-events, idempotency keys and the append-only audit trail.

create table cases (
    case_id                uuid primary key,
    child_ref              text,                       -- keyed HMAC pseudonym; null once erased
    linked_case_id         uuid,                       -- earliest earlier case with the same child_ref
    municipality           text not null,
    status                 text not null default 'open' check (status in ('open', 'closed')),
    identified_on          date not null,
    report_source          text not null,
    reporter_agency        text not null,
    reporter_municipality  text not null,
    reported_by            text not null,
    channel                text not null,              -- http | inbound
    age_at_identification  smallint not null,
    age_band               text not null,
    compulsory_school_age  boolean not null,
    sex                    text not null,
    community              text not null,
    school_status          text not null,
    sector                 text not null,
    activity               text not null,
    hazardous              boolean not null,
    worst_form             boolean not null,
    employer_involved      boolean not null,
    pii_ciphertext         bytea,                      -- AES-GCM(data key, personal JSON); null once erased
    created_at             timestamptz not null default now(),
    updated_at             timestamptz not null default now(),
    erased_at              timestamptz
);
create index cases_child_ref on cases (child_ref, created_at) where child_ref is not null;

-- One data key per case, wrapped by the master key. Deleting the row is crypto-erasure.
create table case_keys (
    case_id        uuid primary key references cases (case_id) on delete cascade,
    wrapped_key    bytea not null,
    master_key_id  text not null,
    created_at     timestamptz not null default now()
);

create table case_events (
    event_id     uuid primary key,
    case_id      uuid not null references cases (case_id),
    event_type   text not null,
    actor        text not null,
    agency       text not null,
    at           timestamptz not null default now()
);
create index case_events_case on case_events (case_id, at);

-- Agencies holding a referral for a case (from referral.created): they may read the case.
create table case_access (
    case_id       uuid not null,
    agency        text not null,
    municipality  text not null,
    referral_id   uuid not null,
    office_id     text not null,
    granted_at    timestamptz not null default now(),
    primary key (case_id, agency, municipality, referral_id)
);

-- Idempotency-Key: the first answer for (subject, key); a replay with another body is refused.
create table idempotency_keys (
    subject       text not null,
    key           text not null,
    request_hash  text not null,
    case_id       uuid not null,
    response      jsonb not null,
    created_at    timestamptz not null default now(),
    primary key (subject, key)
);

-- Append-only audit trail of every read and write of a case (and every refused attempt).
create table audit (
    id                  bigserial primary key,
    at                  timestamptz not null default now(),
    actor               text not null,
    actor_agency        text not null,
    actor_municipality  text not null,
    action              text not null,        -- case.create, case.read, case.event, case.erase, ...
    outcome             text not null check (outcome in ('ok', 'denied', 'not_found', 'replayed', 'conflict')),
    case_id             uuid,
    client_addr         text,
    channel             text not null         -- http | inbound | cli
);
create index audit_case on audit (case_id, at);

create function audit_is_append_only() returns trigger language plpgsql as $$
begin
    raise exception 'the audit table is append-only: % is not allowed', tg_op
        using errcode = 'insufficient_privilege';
end $$;

create trigger audit_no_update_delete before update or delete on audit
    for each row execute function audit_is_append_only();
create trigger audit_no_truncate before truncate on audit
    for each statement execute function audit_is_append_only();

revoke update, delete, truncate on audit from public;
