-- Officer directory: who can be alerted, in which language, on which channels.
-- E-mail and phone are officers' work contacts: stored here, used to deliver, never logged or
-- published (events carry the officer's subject only).
create table officers (
    officer_id    text primary key,                 -- the officer's JWT subject
    agency        text not null,
    municipality  text not null,
    office_id     text not null,                    -- e.g. csw.prizren
    role          text not null check (role in ('duty_officer', 'supervisor', 'coordinator')),
    language      text not null check (language in ('sq', 'sr', 'en')),
    email         text,
    phone         text,
    inapp         boolean not null default true,
    on_duty       boolean not null default false,
    updated_at    timestamptz not null default now()
);
create index officers_office on officers (office_id, role);
create index officers_municipality on officers (municipality, role);

-- What later referral events do not carry (reported_by, deadline, ...), kept from referral.created,
-- and whether its alert was handled (acknowledged in the inbox or acted on) or re-sent.
create table referrals (
    referral_id       uuid primary key,
    case_id           uuid not null,
    municipality      text not null,
    agency            text not null,
    office_id         text not null,
    reported_by       text,
    priority          text,
    deadline          timestamptz,
    age_band          text,
    sector            text,
    created_event_id  uuid,
    correlation_id    text,
    alerted_at        timestamptz not null default now(),
    handled_at        timestamptz,     -- an alert acked, or the referral acknowledged/accepted/declined
    realerted_at      timestamptz      -- re-sent to the supervisor (once)
);
create index referrals_realert on referrals (alerted_at) where handled_at is null and realerted_at is null;

-- One row per (cause event, recipient, channel): the id is uuid5 over the three, so a redelivered
-- event inserts nothing new. The delivery loop works off `status = 'pending'` rows.
create table notifications (
    notification_id   uuid primary key,
    event_id          uuid not null,          -- the cause event (or a derived id for a re-alert)
    event_type        text not null,          -- template used, e.g. referral.created, referral.realert
    cause_event_type  text not null,
    referral_id       uuid,
    case_id           uuid,
    recipient         text not null,
    channel           text not null check (channel in ('email', 'sms', 'inapp')),
    language          text not null,
    subject           text not null,
    body              text not null,
    link              text,
    status            text not null default 'pending' check (status in ('pending', 'sent', 'failed')),
    attempts          integer not null default 0,
    max_attempts      integer not null,
    next_attempt_at   timestamptz not null default now(),
    last_error        text,
    correlation_id    text not null,
    cause_topic       text,
    cause_partition   integer,
    cause_offset      bigint,
    cause_key         text,
    cause_value       bytea,                  -- the cause event as received (no personal data), for the dead letter
    dead_lettered_at  timestamptz,
    created_at        timestamptz not null default now(),
    sent_at           timestamptz,
    failed_at         timestamptz
);
create index notifications_due on notifications (next_attempt_at) where status = 'pending';
create index notifications_undead on notifications (failed_at) where status = 'failed' and dead_lettered_at is null;
create index notifications_referral on notifications (referral_id);

-- Every delivery attempt, for operators (error class and message, never message content).
create table delivery_attempts (
    notification_id  uuid not null references notifications (notification_id),
    attempt          integer not null,
    at               timestamptz not null default now(),
    ok               boolean not null,
    error            text,
    primary key (notification_id, attempt)
);

-- The in-app inbox: one alert per in-app notification (alert_id = notification_id).
create table alerts (
    alert_id      uuid primary key references notifications (notification_id),
    recipient     text not null,
    event_type    text not null,
    referral_id   uuid,
    case_id       uuid,
    priority      text,
    subject       text not null,
    body          text not null,
    link          text,
    created_at    timestamptz not null default now(),
    acked_at      timestamptz
);
create index alerts_recipient on alerts (recipient, created_at desc);
