"""``StepStats``: a Lightning callback that times every training step and records the peak memory, written
to JSON when the fit ends (what ``bench/gpu_check.sh`` reads; also usable in any fit):

    trainer:
      callbacks:
        - class_path: grpo_lab.train.stepstats.StepStats
          init_args: {out: runs/stepstats.json}

A step is ``on_train_batch_start`` -> ``on_train_batch_end`` (rollout, reward, loss, backward, optimizer
step), timed with ``perf_counter`` after synchronizing the accelerator, so asynchronous CUDA work is inside
the step it belongs to. Completion tokens per step are ``train/completion_length`` (the documented metric:
tokens per completion, EOS included) times the step's sequences; peak memory is
``torch.cuda.max_memory_allocated`` on CUDA, else the process's peak RSS. ``train/loss``, ``train/reward`` and
``train/grad_norm`` of every step are kept too (``metrics``), so two runs can be compared step by step.
"""

from __future__ import annotations

import json
import resource
import statistics
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

TRACKED = ("train/loss", "train/reward", "train/grad_norm")


def summarize(seconds: list[float], tokens: list[float], skip: int = 1) -> dict:
    """Median step time and completion tokens/s (total tokens over total time) of the steps after the first
    ``skip`` (warm-up: kernel selection, allocator growth, lazy imports). With fewer steps, all are used."""
    if len(seconds) != len(tokens):
        raise ValueError(f"{len(seconds)} step times but {len(tokens)} token counts")
    if not seconds:
        return {"timed_steps": 0, "step_seconds_median": None, "completion_tokens_per_s": None}
    s, t = (seconds[skip:], tokens[skip:]) if len(seconds) > skip else (seconds, tokens)
    return {"timed_steps": len(s), "step_seconds_median": statistics.median(s),
            "completion_tokens_per_s": sum(t) / sum(s) if sum(s) > 0 else None}


class StepStats(Callback):
    def __init__(self, out: str | None = None, skip: int = 1) -> None:
        """Args:
            out: JSON file written at the end of the fit (by global rank 0); None keeps the stats in memory.
            skip: leading steps left out of the summary (warm-up)."""
        self.out, self.skip = out, skip
        self.seconds: list[float] = []
        self.tokens: list[float] = []
        self.metrics: dict[str, list[float | None]] = {k: [] for k in TRACKED}
        self._t0 = 0.0

    @staticmethod
    def _sync(pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_start(self, trainer, pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._sync(pl_module)
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._sync(pl_module)
        self.seconds.append(time.perf_counter() - self._t0)
        metrics = trainer.callback_metrics
        length = metrics.get("train/completion_length")
        g = int(getattr(pl_module, "hparams", {}).get("num_generations", 1))
        self.tokens.append(float(length) * len(batch) * g if length is not None else 0.0)
        for key, values in self.metrics.items():
            v = metrics.get(key)
            values.append(float(v) if v is not None else None)

    def peak_memory(self, pl_module) -> dict:
        if pl_module.device.type == "cuda":
            return {"kind": "torch.cuda.max_memory_allocated",
                    "bytes": torch.cuda.max_memory_allocated(pl_module.device)}
        return {"kind": "peak RSS of the process (ru_maxrss)",
                "bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}

    def stats(self, trainer, pl_module) -> dict:
        mem = self.peak_memory(pl_module)
        return {
            **summarize(self.seconds, self.tokens, self.skip),
            "steps": len(self.seconds), "step_seconds": self.seconds, "completion_tokens": self.tokens,
            "metrics": self.metrics, "peak_memory_kind": mem["kind"], "peak_memory_gib": mem["bytes"] / 2**30,
            "device": str(pl_module.device),
            "device_name": torch.cuda.get_device_name(pl_module.device) if pl_module.device.type == "cuda"
            else "cpu",
            "precision": str(trainer.precision), "strategy": type(trainer.strategy).__name__,
            "world_size": trainer.world_size, "parameters": sum(p.numel() for p in pl_module.parameters()),
        }

    def on_train_end(self, trainer, pl_module) -> None:
        if self.out is None or not trainer.is_global_zero:
            return
        path = Path(self.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.stats(trainer, pl_module), indent=2))
