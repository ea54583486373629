"""The rendezvous port of a one-machine multi-process fit (DDP, FSDP, DeepSpeed on several devices).

Lightning's ``LightningEnvironment`` picks ``MASTER_PORT`` by binding port 0, closing the socket and handing
the number to the ranks; rank 0's ``TCPStore`` binds it seconds later. The number comes from the kernel's
ephemeral range, which every outgoing connection on the machine draws from too, and a sandboxed network
stack may keep a just-closed port reserved: either way the store can fail with ``EADDRINUSE`` ("The server
socket has failed to listen on any local network address ... address already in use"). (The EADDRINUSE that
CI saw had another cause: a test's in-process DDP fit left its port in ``MASTER_PORT``; tests/conftest.py.)

``pick_port`` instead draws a port below the ephemeral range (20000-32767, where the kernel never assigns
one on its own) that no socket on the machine uses (``/proc/net/tcp`` and ``tcp6``, read, never bound),
and ``choose_rendezvous_port`` sets it as ``MASTER_PORT`` for the launcher and every rank it starts, only
where Lightning's own one-machine environment would have picked one: a cluster's (SLURM, torchelastic)
port, or one the user set, is left alone.
"""

from __future__ import annotations

import os
import random
from collections.abc import MutableMapping
from pathlib import Path

PORT_RANGE = (20000, 32767)
PROC_NET = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))


def ports_in_use(tables: tuple[Path, ...] = PROC_NET) -> set[int]:
    """Local TCP ports of every socket in the kernel's tables (any state, IPv4 and IPv6); empty where the
    tables do not exist (not Linux)."""
    used: set[int] = set()
    for table in tables:
        try:
            lines = table.read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 1 and ":" in fields[1]:
                used.add(int(fields[1].rsplit(":", 1)[1], 16))
    return used


def pick_port(used: set[int] | None = None, rng: random.Random | None = None,
              port_range: tuple[int, int] = PORT_RANGE) -> int:
    """A random port of ``port_range`` not in ``used`` (default: ``ports_in_use()``)."""
    used = ports_in_use() if used is None else used
    free = [p for p in range(port_range[0], port_range[1] + 1) if p not in used]
    if not free:
        raise RuntimeError(f"every port in {port_range[0]}-{port_range[1]} is in use")
    return (rng or random.SystemRandom()).choice(free)


def choose_rendezvous_port(trainer, environ: MutableMapping[str, str] = os.environ) -> int | None:
    """Set ``MASTER_PORT`` (``pick_port``) before ``trainer`` launches several processes on this machine with
    Lightning's own environment; the port, or None where nothing was set."""
    from lightning.fabric.plugins.environments import LightningEnvironment

    env = getattr(trainer.strategy, "cluster_environment", None)
    if "MASTER_PORT" in environ or "LOCAL_RANK" in environ or trainer.num_nodes != 1 \
            or trainer.world_size < 2 or type(env) is not LightningEnvironment:
        return None
    port = pick_port()
    environ["MASTER_PORT"] = str(port)
    return port
