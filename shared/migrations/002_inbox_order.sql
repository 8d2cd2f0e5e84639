-- The order in which a consumer applied events (a sequence, so ties within one transaction are
-- broken by insertion order): lets operators and tests check that one case's events were applied
-- in the order they were made.
alter table inbox add column applied_seq bigserial;
create index inbox_applied_seq on inbox (applied_seq);
