-- Applied into every service schema (search_path is set to that schema).
-- Outbox: written in the same transaction as the state change; the relay publishes rows in
-- seq order and marks them published. Rows are kept as the durable event log (the embedded
-- broker keeps nothing across restarts; `clms dev` replays them into an empty broker).
create table outbox (
    seq           bigserial primary key,
    event_id      uuid not null unique,
    topic         text not null,            -- logical topic from the registry, e.g. clms.case-events
    key           text not null,            -- the case id
    event_type    text not null,
    envelope      jsonb not null,
    created_at    timestamptz not null default now(),
    published_at  timestamptz
);
create index outbox_unpublished on outbox (seq) where published_at is null;

-- Inbox: ids of events this service applied, recorded in the same transaction as the effect,
-- so a redelivered event changes nothing.
create table inbox (
    event_id    uuid not null,
    consumer    text not null,
    event_type  text not null,
    applied_at  timestamptz not null default now(),
    primary key (consumer, event_id)
);
