-- Every delivery attempt (delivery_attempts: when, whether it went out, the redacted error) is
-- the operators' record of what was sent. The runtime role (deploy/postgres/roles.sql:
-- notifications_app gets data rights on every table the owner creates) keeps INSERT only: the
-- service never reads it back, updates, deletes or truncates it; as it owns nothing it cannot
-- drop the triggers below either. Operators read it as the owner.
do $$
declare
    r record;
begin
    for r in select distinct grantee from information_schema.role_table_grants
              where table_schema = current_schema() and table_name = 'delivery_attempts'
                and grantee not in (current_user, 'PUBLIC')
                and grantee <> (select tableowner from pg_tables
                                 where schemaname = current_schema() and tablename = 'delivery_attempts')
    loop
        execute format('revoke all on table delivery_attempts from %I', r.grantee);
        execute format('grant insert on table delivery_attempts to %I', r.grantee);
    end loop;
end $$;

-- For every role, the owner included (development runs with one role).
create function delivery_attempts_append_only() returns trigger language plpgsql as $$
begin
    raise exception 'delivery_attempts is append-only: % is not allowed', tg_op
        using errcode = 'insufficient_privilege';
end $$;

create trigger delivery_attempts_no_update_delete before update or delete on delivery_attempts
    for each row execute function delivery_attempts_append_only();
create trigger delivery_attempts_no_truncate before truncate on delivery_attempts
    for each statement execute function delivery_attempts_append_only();
