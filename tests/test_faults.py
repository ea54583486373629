"""Fault injection, part 1: the caches under ``runs/`` (the warm start, the probe points). Each test injects
the fault for real (a truncated file, a SIGKILL mid-save, a lock held by a killed process, a file-size limit)
and checks what the user sees and that nothing broken is trusted later. The matrix is in docs/errors.md."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from grpo_lab.model.policy import PolicyConfig, build_policy
from grpo_lab.model.warmstart import (
    MARKER,
    WarmStartConfig,
    check_entry,
    ensure_warm_start,
    load_weights,
    warm_start_dir,
)
from grpo_lab.probe.cache import cached
from grpo_lab.system.entry import run_cli
from tests.conftest import CONFIGS, ROOT

SMALL = PolicyConfig(hidden_size=32, num_layers=1, num_heads=2)
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _cfg(tmp_path: Path) -> WarmStartConfig:
    return WarmStartConfig(steps=2, batch_size=8, cache_dir=str(tmp_path / "ws"))


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter."""
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=300)


@contextlib.contextmanager
def file_size_limit(limit_bytes: int) -> Iterator[None]:
    """A full disk for this process: RLIMIT_FSIZE's soft limit (Python ignores SIGXFSZ, so a write past it
    raises EFBIG), put back afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


# ---- the warm start ------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["truncated", "same_size_corrupt", "marker_missing"])
def test_a_damaged_warm_start_is_moved_aside_and_built_again(tmp_path, caplog, damage):
    """Truncated weights (a full disk, an interrupted copy), flipped bytes of the same size, or a directory
    without the completion marker (an older grpo_lab, a build killed before the marker): one warning line
    naming the entry, the bad copy kept beside it, a rebuilt entry that loads."""
    cfg = _cfg(tmp_path)
    path = ensure_warm_start(SMALL, cfg, "arithmetic")
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    if damage == "truncated":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "same_size_corrupt":
        weights.write_bytes(data[:-64] + bytes(64))
    else:
        (path / MARKER).unlink()
    assert check_entry(path) is not None
    with caplog.at_level(logging.WARNING, logger="grpo_lab.model.warmstart"):
        assert ensure_warm_start(SMALL, cfg, "arithmetic") == path
    (line,) = _warnings(caplog)
    assert str(path) in line and "moved to" in line and "\n" not in line
    assert check_entry(path) is None and path.with_name(path.name + ".broken").is_dir()
    model, _ = build_policy(SMALL, seed=0)
    load_weights(model, path)


@pytest.mark.slow
def test_a_warm_start_killed_during_its_save_is_never_loaded(tmp_path, caplog):
    """SIGKILL right after the weights and config are saved, before ``warmstart.json`` and the marker: the
    entry's directory does not exist (the build was in a temporary directory), and the next call builds it,
    removing the dead builder's leftovers."""
    cfg = _cfg(tmp_path)
    code = ("import os, signal\nimport grpo_lab.model.warmstart as w\n"
            "from grpo_lab.model.policy import PolicyConfig\n"
            "real = w.save_policy\n"
            "def save_then_die(*a):\n    real(*a)\n    os.kill(os.getpid(), signal.SIGKILL)\n"
            "w.save_policy = save_then_die\n"
            f"w.ensure_warm_start(PolicyConfig(hidden_size=32, num_layers=1, num_heads=2), "
            f"w.WarmStartConfig(steps=2, batch_size=8, cache_dir={cfg.cache_dir!r}), 'arithmetic')\n")
    killed = _python(code, tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    path = warm_start_dir(SMALL, cfg, "arithmetic")
    leftovers = list(path.parent.glob(f".{path.name}.tmp*"))
    assert not path.exists() and leftovers and (leftovers[0] / path.name / "model.safetensors").is_file()
    with caplog.at_level(logging.WARNING, logger="grpo_lab.model.warmstart"):
        assert ensure_warm_start(SMALL, cfg, "arithmetic") == path
    assert check_entry(path) is None and not list(path.parent.glob(f".{path.name}.tmp*"))
    assert not _warnings(caplog)  # nothing was at the entry's path: nothing to warn about


def _hold_lock_and_die(lock: Path, cwd: Path) -> None:
    """A process takes the ``fcntl`` lock on ``lock`` and is SIGKILLed holding it."""
    code = (f"import fcntl, os, signal\nfh = open({str(lock)!r}, 'a')\nfcntl.flock(fh, fcntl.LOCK_EX)\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n")
    assert _python(code, cwd).returncode == -signal.SIGKILL
    assert lock.is_file()


def test_a_stale_lock_file_of_a_killed_process_blocks_nobody(tmp_path):
    """The warm start's and the probe cache's lock files stay behind a killed process; the kernel released
    its lock, so the next builder goes on at once."""
    cfg = _cfg(tmp_path)
    path = warm_start_dir(SMALL, cfg, "arithmetic")
    path.parent.mkdir(parents=True)
    _hold_lock_and_die(path.with_name(f"{path.name}.lock"), tmp_path)
    (tmp_path / "pc").mkdir()
    _hold_lock_and_die(tmp_path / "pc" / "k.lock", tmp_path)
    t0 = time.perf_counter()
    assert cached(tmp_path / "pc", "k", lambda: {"x": 1}) == ({"x": 1}, False)
    assert ensure_warm_start(SMALL, cfg, "arithmetic") == path and check_entry(path) is None
    assert time.perf_counter() - t0 < 60


def test_concurrent_builders_of_one_warm_start_build_it_once(tmp_path, caplog):
    """Two callers at the same moment (trial processes of one study; threads here, which ``flock`` also
    serializes): one builds, the other waits and loads the same complete entry."""
    cfg = _cfg(tmp_path)
    paths: list[Path] = []
    with caplog.at_level(logging.INFO, logger="grpo_lab.model.warmstart"):
        threads = [threading.Thread(target=lambda: paths.append(ensure_warm_start(SMALL, cfg, "arithmetic")))
                   for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    saved = [r for r in caplog.records if r.getMessage().startswith("warm start saved")]
    assert len(paths) == 2 and paths[0] == paths[1] and check_entry(paths[0]) is None and len(saved) == 1


def test_a_warm_start_on_a_full_disk_is_one_error_line_and_leaves_nothing(tmp_path, capsys):
    """Building the warm start under a 64 KiB file-size limit (the weights need more) through ``run_cli``,
    as ``grpo-lab warmstart`` does: one ``error:`` line naming the entry, exit 2, no entry and no temporary
    directory; with space again the next call builds it."""
    cfg = _cfg(tmp_path)
    path = warm_start_dir(SMALL, cfg, "arithmetic")
    with file_size_limit(64 * 1024), pytest.raises(SystemExit) as exit_:
        run_cli(lambda argv: ensure_warm_start(SMALL, cfg, "arithmetic"), [])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: could not write the warm start {path}: ") and "File too large" in err[0]
    assert not [p for p in path.parent.iterdir() if not p.name.endswith(".lock")]
    assert ensure_warm_start(SMALL, cfg, "arithmetic") == path and check_entry(path) is None


# ---- the probe cache -----------------------------------------------------------------------------------
@pytest.mark.parametrize("content", [b'{"snr": 1.5, "cos', b"", b"\xff\xfe", b"[1, 2]"],
                         ids=["truncated", "empty", "not_utf8", "not_an_object"])
def test_a_corrupt_probe_cache_entry_is_computed_again(tmp_path, caplog, content):
    (tmp_path / "k.json").write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="grpo_lab.probe.cache"):
        assert cached(tmp_path, "k", lambda: {"snr": 2.0}) == ({"snr": 2.0}, False)
    (line,) = _warnings(caplog)
    assert str(tmp_path / "k.json") in line and "moved to" in line and "\n" not in line
    assert (tmp_path / "k.json.broken").read_bytes() == content
    assert cached(tmp_path, "k", lambda: {"snr": -1.0}) == ({"snr": 2.0}, True)  # the rebuilt entry is used


def test_a_probe_cache_write_on_a_full_disk_leaves_no_entry(tmp_path):
    """A write that fails (EFBIG under a 1 KiB file-size limit) raises, and neither the entry nor a
    temporary file is left to be read later; with space again the entry is computed and stored."""
    with file_size_limit(1024), pytest.raises(OSError) as err:
        cached(tmp_path, "k", lambda: {"x": "y" * 4096})
    assert err.value.errno == errno.EFBIG
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.lock"]
    assert cached(tmp_path, "k", lambda: {"x": 1}) == ({"x": 1}, False)
    assert cached(tmp_path, "k", lambda: {"x": 2}) == ({"x": 1}, True)


# ---- a fit's checkpoint --------------------------------------------------------------------------------
def _fit(tmp_path: Path, *extra: str) -> list[str]:
    """``grpo-lab fit`` on the smoke config, 2 steps, its checkpoint (base.yaml's ModelCheckpoint, last.ckpt)
    under ``tmp_path/runs``."""
    return ["fit", "--config", str(CONFIGS / "smoke.yaml"), "--trainer.max_steps", "2",
            "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--model.warm_start.cache_dir",
            str(tmp_path / "ws"), "--trainer.enable_progress_bar", "false", "--data.num_train", "8", *extra]


def _one_error_line(capsys, run) -> str:
    with pytest.raises(SystemExit) as exit_:
        run()
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert exit_.value.code == 2 and len(errors) == 1 and "Traceback" not in err, err[-3000:]
    return errors[0]


def test_a_full_disk_at_the_checkpoint_then_a_truncated_last_ckpt_are_one_line_each(tmp_path, capsys):
    """A fit under a 160 KiB file-size limit (the warm start's 80 KB fit, the 270 KB checkpoint does not):
    one ``error:`` line, no ``last.ckpt`` left behind. With space again the fit writes its checkpoint; that
    file truncated (a full disk during a copy) and given to ``--ckpt_path last`` is one line naming it."""
    from grpo_lab import cli

    with file_size_limit(160 * 1024):
        line = _one_error_line(capsys, lambda: cli.main(_fit(tmp_path)))
    assert line.startswith("error: no space left") and "File too large" in line, line
    assert not list((tmp_path / "runs").rglob("*.ckpt"))
    cli.main(_fit(tmp_path))
    (last,) = (tmp_path / "runs").rglob("last.ckpt")
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    line = _one_error_line(capsys, lambda: cli.main(_fit(tmp_path, "--ckpt_path", "last")))
    assert line.startswith(f"error: --ckpt_path last: {last} is truncated or not a checkpoint"), line
