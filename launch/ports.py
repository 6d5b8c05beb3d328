"""A free TCP port for a job's rendezvous, chosen on the node that will listen on it.

    python -m launch.ports [SEED]      # prints one port; SEED defaults to $SLURM_JOB_ID

A job's batch script runs on its first node, which is where rank 0 listens (MASTER_ADDR), so
the submitit jobs (launch/slurm.py) and slurm/kd-ddp.sbatch run this there and export the
port. A port derived from the job id alone (submitit: random 20000-60000; the template once:
20000 + id % 20000) falls inside the kernel's ephemeral range, where any outgoing connection
may already hold it on a shared node. The candidates here lie below that range, start at an
offset taken from the seed (so jobs sharing a node try different ports first) and are
checked by binding them.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

LOWEST = 10000  # below: well-known services (and room for the site's own)


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range for outgoing connections (Linux default 32768-60999)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def candidates(seed: int) -> Iterator[int]:
    """Every port of [LOWEST, start of the ephemeral range), starting at an offset from `seed`."""
    top = max(ephemeral_range()[0], LOWEST + 1)
    span = top - LOWEST
    for i in range(span):
        yield LOWEST + (seed + i) % span


def is_free(port: int) -> bool:
    """Whether a listener could bind `port` on every address family this host has. No
    SO_REUSEADDR: a port with connections still in TIME_WAIT counts as taken."""
    for family, address in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                if family == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                s.bind((address, port))
        except OSError as e:
            if e.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                continue  # no IPv6 on this host
            return False
    return True


def pick_port(seed: int) -> int:
    for port in candidates(seed):
        if is_free(port):
            return port
    raise OSError(errno.EADDRINUSE, f"no free TCP port in {LOWEST}-{ephemeral_range()[0] - 1}")


def main(argv: list[str]) -> int:
    seed = int(argv[0]) if argv else int(os.environ.get("SLURM_JOB_ID", os.getpid()))
    print(pick_port(seed))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
