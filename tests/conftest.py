from __future__ import annotations

from pathlib import Path

import pytest
import torch

from grpo_lab.system.process_env import configure_process

configure_process()  # the test suite is a program too: offline, transformers' logging at errors only
ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"


def alive(pid: int) -> bool:
    """Alive and not a zombie (a killed child of a live parent stays a zombie until it is reaped), read from
    /proc: the tests' own oracle, independent of ``grpo_lab.system.processes``."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def process_commands() -> list[tuple[int, str]]:
    """``(pid, command line)`` of every process in /proc (zombies too: filter with :func:`alive`)."""
    out = []
    for d in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            cmd = d.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        out.append((int(d.parent.name), cmd))
    return out


def frozen_trial(state, params: dict, seconds: float, value=None, grid: dict | None = None):
    """An Optuna ``FrozenTrial`` in ``state`` with ``params``, started ``seconds`` after 2024-01-01 (each
    param's distribution is categorical over its ``grid`` values, or over its own value alone)."""
    import datetime

    from optuna.distributions import CategoricalDistribution
    from optuna.trial import create_trial

    dists = {k: CategoricalDistribution((grid or {}).get(k, [v])) for k, v in params.items()}
    t = create_trial(state=state, params=params, distributions=dists, value=value)
    t.datetime_start = datetime.datetime(2024, 1, 1) + datetime.timedelta(seconds=seconds)
    return t


def full_sequence_logprobs(model, r, temperature=1.0):
    """The reference log-probabilities ``[B, T]`` of a rollout's completions: one plain forward over the B
    full sequences (no prompt sharing, no KV cache), at ``temperature``."""
    from grpo_lab.rollout import positions

    ids = torch.cat([r.prompt_ids, r.completion_ids], 1)
    attn = torch.cat([r.prompt_mask, r.completion_mask], 1)
    t = r.completion_ids.shape[1]
    logits = model(input_ids=ids, attention_mask=attn, position_ids=positions(attn)).logits
    logits = logits[:, -(t + 1):-1].float()
    return torch.log_softmax(logits / temperature, -1).gather(-1, r.completion_ids[..., None]).squeeze(-1)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(1)  # tests run small shapes; one thread avoids oversubscribing 2 cores
    yield


DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "LOCAL_WORLD_SIZE")


@pytest.fixture(autouse=True)
def _no_distributed_leftovers():
    """A test that fits with a DDP strategy in this process leaves Lightning's MASTER_PORT in os.environ and
    rank 0's TCPStore listening on it: every later DDP subprocess would inherit the port and fail to bind it
    (EADDRINUSE). Tear the process group down and put the variables back after each test."""
    import os

    import torch.distributed as dist

    before = {k: os.environ.get(k) for k in DIST_ENV}
    yield
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run with the working directory in a fresh temp dir (runs/ and caches land there)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def tiny_policy():
    from grpo_lab.model.policy import PolicyConfig, build_policy

    return build_policy(PolicyConfig(hidden_size=32, num_layers=1, num_heads=2), seed=0)
