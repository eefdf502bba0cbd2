"""torch.distributed behind the dispatcher's `AllToAll` contract, and process-group setup."""
from __future__ import annotations

import errno
import random
import socket
from datetime import timedelta

import torch
import torch.distributed as dist


class ProcessGroupAllToAll:
    """The default process group (or `group`) as the dispatcher's collective."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def all_to_all_single(self, output: torch.Tensor, input: torch.Tensor,
                          output_split_sizes: list[int] | None = None,
                          input_split_sizes: list[int] | None = None) -> None:
        dist.all_to_all_single(output, input, output_split_sizes, input_split_sizes, group=self.group)


PORT_FLOOR = 20000
"""Picked ports start here: above Ray's default worker ports (10002-19999) and the usual service ports."""
_handed_out: set[int] = set()


def free_port() -> int:
    """A TCP port free on this host right now, for a server this process or its children will bind.

    Picked below the kernel's ephemeral range (`ip_local_port_range`), so no outgoing connection
    (Ray opens hundreds while it starts) can take it between this pick and the bind; never the same
    port twice in one process. Where the ephemeral range leaves no room, the OS picks (port 0).
    """
    ceiling = _ephemeral_floor()
    rng = random.SystemRandom()
    for _ in range(256 if ceiling - PORT_FLOOR > 1024 else 0):
        port = rng.randrange(PORT_FLOOR, ceiling)
        if port not in _handed_out and _bindable(port):
            _handed_out.add(port)
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _ephemeral_floor() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default (macOS starts at 49152)


def _bindable(port: int) -> bool:
    for family, host in ((socket.AF_INET, ""), (socket.AF_INET6, "::")):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.bind((host, port))
        except OSError as exc:
            if family == socket.AF_INET6 and exc.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                continue  # no IPv6 here
            return False
    return True


def host_address() -> str:
    """An address of this host that peers on other hosts can reach (loopback when alone)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))  # no packet is sent: this only picks the outgoing interface
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def init_process_group(rank: int, world_size: int, address: str, port: int, device_type: str,
                       timeout_s: float = 120.0) -> None:
    """NCCL on CUDA, gloo on the CPU; rendezvous over TCP at address:port (rank 0 listens)."""
    backend = "nccl" if device_type == "cuda" else "gloo"
    kwargs = {}
    if device_type == "cuda":
        kwargs["device_id"] = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group(backend, init_method=f"tcp://{address}:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s), **kwargs)
