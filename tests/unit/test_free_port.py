"""shared.embedded.free_port: a port a service binds later, outside the kernel's ephemeral range
(an outgoing connection may take an ephemeral port as its source port meanwhile, and a service
restarted on it then fails with "address already in use")."""

from __future__ import annotations

import socket

from shared.embedded import _ephemeral_low, free_port


def test_ports_are_distinct_bindable_and_below_the_ephemeral_range():
    low = _ephemeral_low()
    ports = [free_port() for _ in range(100)]
    assert len(set(ports)) == len(ports)
    if low > 12_000:
        assert all(p < low for p in ports), [p for p in ports if p >= low]
    for port in ports[:10]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
