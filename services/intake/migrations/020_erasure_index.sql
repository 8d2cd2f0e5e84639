-- `clms erase` rewrites the case.identified row of one case in the outbox (its child_ref becomes
-- the erased marker): find it by key without scanning the whole event log.
create index outbox_case_identified_key on intake.outbox (key) where event_type = 'case.identified';
