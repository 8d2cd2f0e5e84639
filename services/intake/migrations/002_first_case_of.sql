-- The earliest case of a child_ref, after taking a transaction-level advisory lock on the ref,
-- in one round trip. VOLATILE plpgsql: the select runs with a snapshot taken after the lock is
-- granted, so of two simultaneous reports of one child the second always sees the first.
create function first_case_of(ref text) returns uuid language plpgsql volatile as $$
declare
    found uuid;
begin
    perform pg_advisory_xact_lock(hashtextextended('clms-child-ref:' || ref, 0));
    select case_id into found from intake.cases where child_ref = ref order by created_at, case_id limit 1;
    return found;
end $$;
