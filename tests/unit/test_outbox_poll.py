"""An idle outbox relay slows its poll down instead of querying PostgreSQL 20 times a second."""

from shared.outbox import next_poll_interval


def test_an_idle_relay_backs_off_to_the_ceiling_and_snaps_back_when_it_finds_rows():
    interval, seen = 0.05, []
    for _ in range(8):
        interval = next_poll_interval(interval, found=False, base=0.05, ceiling=1.0)
        seen.append(interval)
    assert seen == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0]
    assert next_poll_interval(interval, found=True, base=0.05, ceiling=1.0) == 0.05
