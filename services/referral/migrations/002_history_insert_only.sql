-- The referral's history (referral_history: who acknowledged, accepted, declined, completed or
-- closed a referral, overdue and escalation, when) is its audit trail. The runtime role
-- (deploy/postgres/roles.sql: referral_app gets data rights on every table the owner creates)
-- keeps INSERT and SELECT (GET /v1/referrals/{id} shows the history) only: it cannot update,
-- delete or truncate history rows, and as it owns nothing it cannot drop the triggers below.
do $$
declare
    r record;
begin
    for r in select distinct grantee from information_schema.role_table_grants
              where table_schema = current_schema() and table_name = 'referral_history'
                and grantee not in (current_user, 'PUBLIC')
                and grantee <> (select tableowner from pg_tables
                                 where schemaname = current_schema() and tablename = 'referral_history')
    loop
        execute format('revoke all on table referral_history from %I', r.grantee);
        execute format('grant select, insert on table referral_history to %I', r.grantee);
    end loop;
end $$;

-- For every role, the owner included (development runs with one role).
create function history_is_append_only() returns trigger language plpgsql as $$
begin
    raise exception 'referral_history is append-only: % is not allowed', tg_op
        using errcode = 'insufficient_privilege';
end $$;

create trigger referral_history_no_update_delete before update or delete on referral_history
    for each row execute function history_is_append_only();
create trigger referral_history_no_truncate before truncate on referral_history
    for each statement execute function history_is_append_only();
