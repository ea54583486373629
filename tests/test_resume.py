"""Exact resume: a run of 2N steps and a run killed (SIGKILL, a real subprocess) after N steps then resumed
for N more log the same per-step metrics and end with the same weights."""

import os
import signal
import subprocess
import sys

import lightning as L
import pytest
import torch
import yaml

from grpo_lab.train.tensorboard_scalars import read_scalars
from tests.conftest import CONFIGS, ROOT

N = 4


class KillAtStep(L.Callback):
    """Test helper: SIGKILL this process when batch ``step + 1`` starts (after step ``step``'s checkpoint)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def _overlay(path, ckpt_dir, kill: bool):
    callbacks = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"dirpath": str(ckpt_dir), "save_last": True, "save_top_k": 0,
                                "every_n_train_steps": N}}]
    if kill:
        callbacks.insert(0, {"class_path": "tests.test_resume.KillAtStep", "init_args": {"step": N}})
    path.write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks, "deterministic": True}}))
    return path


def _run(tmp, name, overlay, *extra):
    cmd = [sys.executable, "-m", "grpo_lab.cli", "fit", "--config", str(CONFIGS / "smoke.yaml"), "--config",
           str(overlay), "--trainer.max_steps", str(2 * N), "--trainer.val_check_interval", "3",
           "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(tmp / "runs"),
           "--trainer.logger.init_args.name", name, "--model.warm_start.cache_dir", str(tmp / "ws"),
           "--data.num_train", "12", *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_killed_and_resumed_run_matches_an_uninterrupted_one(tmp_path):
    full = _run(tmp_path, "full", _overlay(tmp_path / "a.yaml", tmp_path / "ck_full", kill=False))
    assert full.returncode == 0, full.stderr[-3000:]

    killed = _run(tmp_path, "part", _overlay(tmp_path / "b.yaml", tmp_path / "ck_part", kill=True))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert (tmp_path / "ck_part" / "last.ckpt").is_file()
    resumed = _run(tmp_path, "part", _overlay(tmp_path / "c.yaml", tmp_path / "ck_part", kill=False),
                   "--ckpt_path", str(tmp_path / "ck_part" / "last.ckpt"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    a, b = read_scalars(tmp_path / "runs" / "full"), read_scalars(tmp_path / "runs" / "part")
    # 12 queries / P=4 = 3 batches an epoch: the kill at step 4 lands mid-epoch, so the data position matters.
    for tag in ("train/reward", "train/loss", "train/grad_norm", "train/entropy", "train/advantage_std",
                "val/acc_sampled"):
        want = sorted(a[tag])
        got = sorted(dict(b[tag]).items())  # the resumed run's values replace the killed run's, step by step
        assert [s for s, _ in got] == [s for s, _ in want], tag
        for (s, x), (_, y) in zip(want, got, strict=True):
            assert abs(x - y) <= 1e-6, (tag, s, x, y)
    wa = torch.load(tmp_path / "ck_full" / "last.ckpt", weights_only=True)["state_dict"]
    wb = torch.load(tmp_path / "ck_part" / "last.ckpt", weights_only=True)["state_dict"]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
