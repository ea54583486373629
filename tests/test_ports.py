"""grpo_lab/system/ports.py: the DDP rendezvous port comes from below the ephemeral range and avoids ports in
use, and only Lightning's own one-machine multi-process environment gets one."""

import random
import socket
from types import SimpleNamespace

import pytest
from lightning.fabric.plugins.environments import LightningEnvironment, SLURMEnvironment

from grpo_lab.system.ports import choose_rendezvous_port, pick_port, ports_in_use


def test_ports_in_use_reads_the_kernel_tables(tmp_path):
    table = tmp_path / "tcp"
    table.write_text("  sl  local_address rem_address   st\n"
                     "   0: 0100007F:4E20 00000000:0000 0A\n"      # 127.0.0.1:20000 LISTEN
                     "   1: 00000000:9C40 0100007F:1F90 01\n")     # :40000, established
    assert ports_in_use((table, tmp_path / "missing")) == {20000, 40000}


def test_a_listening_socket_is_seen_and_avoided():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert port in ports_in_use()
    assert pick_port({20000, 20001}, random.Random(0), (20000, 20002)) == 20002
    with pytest.raises(RuntimeError, match="in use"):
        pick_port({20000}, port_range=(20000, 20000))


def test_only_lightnings_own_multi_process_environment_gets_a_port():
    def trainer(env, world=2, nodes=1):
        return SimpleNamespace(strategy=SimpleNamespace(cluster_environment=env), world_size=world,
                               num_nodes=nodes)

    environ: dict[str, str] = {}
    port = choose_rendezvous_port(trainer(LightningEnvironment()), environ)
    assert environ == {"MASTER_PORT": str(port)} and 20000 <= port <= 32767
    for t, env in [(trainer(LightningEnvironment()), {"MASTER_PORT": "1234"}),  # the user's own
                   (trainer(LightningEnvironment()), {"LOCAL_RANK": "1"}),  # a rank Lightning started
                   (trainer(LightningEnvironment(), world=1), {}),
                   (trainer(LightningEnvironment(), nodes=2), {}),
                   (trainer(SLURMEnvironment()), {})]:
        before = dict(env)
        assert choose_rendezvous_port(t, env) is None and env == before
