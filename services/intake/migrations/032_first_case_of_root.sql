-- The first case of a child is the ROOT of its chain: the one case of the ref whose own
-- linked_case_id is null. Ordering by created_at alone was wrong under concurrency: created_at is
-- the transaction's start time, and a report that began before the first one committed (it waited
-- on the child's lock) carries an earlier created_at than the case it links to; a third report
-- then linked to that second case instead of the first (seen in CI, 1 run in several dozen).
-- Every later case of a ref links to the root, so the root is found whatever the timestamps say.
create or replace function first_case_of(ref text) returns uuid language plpgsql volatile as $$
declare
    found uuid;
begin
    perform pg_advisory_xact_lock(hashtextextended('clms-child-ref:' || ref, 0));
    select coalesce(linked_case_id, case_id) into found from intake.cases
     where child_ref = ref
     order by linked_case_id is not null, created_at, case_id
     limit 1;
    return found;
end $$;
