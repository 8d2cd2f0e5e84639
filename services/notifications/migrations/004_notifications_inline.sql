-- A notification row is ~2.2 KB (the cause event as received, ~1 KB; the rendered body; the
-- subject), just over PostgreSQL's 2 KB threshold for TOAST. Every insert and every update of
-- the row (the delivery process's lease, its sent/failed marks) then ran pglz over its largest
-- values, which do not compress enough to be kept compressed (stored size = raw size):
-- pglz_compress was 6 % of the notifications service's backends' samples at 100
-- identifications/s (perf, 2026-11-30). Rows up to 4 KB now stay whole in the heap without that
-- attempt; a longer one is toasted as before.
alter table notifications set (toast_tuple_target = 4080);
