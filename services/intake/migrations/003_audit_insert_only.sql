-- The audit trail cannot be rewritten by the service: every role that got rights on the table
-- (deploy/postgres/roles.sql gives the runtime role intake_app data rights on every table the
-- owner creates) keeps INSERT only. The owner runs migrations; the runtime role owns nothing,
-- so it cannot drop the append-only triggers either.
do $$
declare
    r record;
begin
    for r in select distinct grantee from information_schema.role_table_grants
              where table_schema = current_schema() and table_name = 'audit'
                and grantee not in (current_user, 'PUBLIC')
                and grantee <> (select tableowner from pg_tables
                                 where schemaname = current_schema() and tablename = 'audit')
    loop
        execute format('revoke all on table audit from %I', r.grantee);
        execute format('grant insert on table audit to %I', r.grantee);
    end loop;
end $$;
