-- Operator actions recorded by `clms dlq replay`: one row per dead letter re-published.
create table if not exists dlq_replays (
    dlq_topic      text not null,
    dlq_partition  int not null,
    dlq_offset     bigint not null,
    original_topic text not null,
    reason         text not null,
    fixed          boolean not null default false,
    replayed_by    text not null,
    replayed_at    timestamptz not null default now(),
    primary key (dlq_topic, dlq_partition, dlq_offset, replayed_at)
);
