"""`free_port`: ports for servers we start later are picked below the kernel's ephemeral range, so the
outgoing connections Ray opens while it starts cannot take one before it is bound (a gateway's gRPC
port was lost that way once in CI, and the deployment failed)."""
from __future__ import annotations

import socket

from expertmesh.cluster import collective
from expertmesh.cluster.collective import PORT_FLOOR, free_port


def test_ports_are_below_the_ephemeral_range_distinct_and_bindable():
    floor = collective._ephemeral_floor()
    ports = [free_port() for _ in range(64)]
    assert len(set(ports)) == len(ports)
    for port in ports:
        assert PORT_FLOOR <= port < floor, (port, floor)
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_a_port_in_use_is_not_bindable():
    with socket.socket() as held:
        held.bind(("", 0))
        held.listen()
        assert not collective._bindable(held.getsockname()[1])


def test_no_room_below_the_ephemeral_range_lets_the_os_pick(monkeypatch):
    monkeypatch.setattr(collective, "_ephemeral_floor", lambda: PORT_FLOOR + 10)
    port = free_port()
    assert port >= 1024
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
