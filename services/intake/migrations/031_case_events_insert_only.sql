-- The case's history (case_events: who recorded which event, when) is written once. The runtime
-- role (deploy/postgres/roles.sql: intake_app gets data rights on every table the owner creates)
-- keeps SELECT (the case view shows the history), INSERT, and UPDATE of `note_ciphertext` only:
-- `clms erase` sets that column to null (the coordinator's override reason, free text under the
-- case's data key). It cannot change or delete a history row, nor truncate the table, and as it
-- owns nothing it cannot drop the trigger below either (the owner runs the migrations).
do $$
declare
    r record;
begin
    for r in select distinct grantee from information_schema.role_table_grants
              where table_schema = current_schema() and table_name = 'case_events'
                and grantee not in (current_user, 'PUBLIC')
                and grantee <> (select tableowner from pg_tables
                                 where schemaname = current_schema() and tablename = 'case_events')
    loop
        execute format('revoke all on table case_events from %I', r.grantee);
        execute format('grant select, insert on table case_events to %I', r.grantee);
        execute format('grant update (note_ciphertext) on table case_events to %I', r.grantee);
    end loop;
end $$;

-- The same for every role, the owner included (development runs with one role): an UPDATE may
-- only clear note_ciphertext; DELETE and TRUNCATE are refused. A later migration that must
-- rewrite history rows disables this trigger inside its own transaction and says why.
create function case_events_append_only() returns trigger language plpgsql as $$
begin
    if tg_op = 'UPDATE' and new.note_ciphertext is null
       and (to_jsonb(new) - 'note_ciphertext') = (to_jsonb(old) - 'note_ciphertext') then
        return new;
    end if;
    raise exception 'the case history is append-only: % is not allowed (only erasure may clear note_ciphertext)', tg_op
        using errcode = 'insufficient_privilege';
end $$;

create trigger case_events_no_rewrite before update or delete on case_events
    for each row execute function case_events_append_only();
create trigger case_events_no_truncate before truncate on case_events
    for each statement execute function case_events_append_only();
