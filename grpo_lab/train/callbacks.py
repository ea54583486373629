"""What keeps a run honest outside the algorithm: exact resume and the non-finite-step guard.

- :class:`ExactResume` (a Lightning callback the module adds itself) stores in every checkpoint what a
  resumed run needs to continue *exactly*: the torch (CPU, and the GPU's on CUDA), Python and numpy RNG
  states, the guard's counters, the dynamic-sampling query stream's position and the warm start the run
  started from.
- :class:`NonFiniteGuard` skips a step whose loss or gradient is not finite (weights untouched, counted in
  ``train/skipped_steps``) and stops the run after ``max_bad_steps`` such steps in a row; it also logs
  ``train/grad_norm`` and clips the gradient.

Both are written for a GRPOModule; :class:`GuardedModule` and :class:`ResumableModule` declare what each
uses of it (``tests/test_module.py`` checks that GRPOModule provides it).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import lightning as L
import numpy as np
import torch
from lightning.pytorch.plugins.precision import Precision

from grpo_lab.system.errors import UserError, UserRuntimeError

if TYPE_CHECKING:
    from grpo_lab.data.dynamic_sampling import QueryStream


def _numpy_state() -> tuple:
    """numpy's global RNG state as plain Python data (checkpoints load with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)


class GuardedModule(Protocol):
    """What :meth:`NonFiniteGuard.before_optimizer_step` uses of the module."""

    model: torch.nn.Module
    trainer: L.Trainer

    def log(self, name: str, value: Any, **kwargs: Any) -> None: ...

    def clip_gradients(self, optimizer: Any, gradient_clip_val: float | None = None,
                       gradient_clip_algorithm: str | None = None) -> None: ...


class ResumableModule(Protocol):
    """What :class:`ExactResume` stores and restores of the module."""

    device: torch.device
    guard: NonFiniteGuard
    warm_start_path: str | None
    stream: QueryStream | None


class NonFiniteGuard:
    """Counts and skips non-finite steps of ``module`` (a GRPOModule); its state is two counters."""

    def __init__(self, max_bad_steps: int) -> None:
        self.max_bad_steps, self.skipped, self.in_a_row = max_bad_steps, 0, 0

    def bad(self, why: str) -> None:
        self.skipped += 1
        self.in_a_row += 1
        if self.in_a_row >= self.max_bad_steps:
            raise UserRuntimeError(
                f"{self.in_a_row} steps in a row had a non-finite loss or gradient (last: {why}); stopping. "
                "Lower the learning rate, check the reward function, or raise model.max_bad_steps"
            )

    def before_optimizer_step(self, module: GuardedModule, optimizer,
                              max_grad_norm: float | None) -> None:
        """Log the gradient norm; drop a non-finite gradient (the optimizer then skips every parameter) or
        clip a finite one to ``max_grad_norm``. The norm is one fused computation on the device, the clipping
        reuses it, and the finiteness check is the one value read back (Lightning's ``grad_norm`` read each
        parameter's norm to the host, and its clipping computed the norm again)."""
        grads = [p.grad for p in module.model.parameters() if p.grad is not None]
        if not grads:  # no backward happened (a skipped loss): nothing to clip or count
            return
        total = torch.nn.utils.get_total_norm(grads, norm_type=2.0)  # 0-d, on the gradients' device
        module.log("train/grad_norm", total, on_step=True, on_epoch=False)
        if not torch.isfinite(total):
            for p in module.model.parameters():  # optimizers skip parameters without a gradient
                p.grad = None
            self.bad(f"gradient norm is {float(total)}")
            return
        self.in_a_row = 0
        if max_grad_norm is None:
            return
        if type(module.trainer.precision_plugin).clip_grad_by_norm is Precision.clip_grad_by_norm:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grads_with_norm_(params, max_grad_norm, total)  # what clip_grad_norm_ does
        else:  # a plugin with its own clipping (FSDP refuses it): Lightning's path
            module.clip_gradients(optimizer, gradient_clip_val=max_grad_norm, gradient_clip_algorithm="norm")


class ExactResume(L.Callback):
    """Stores and restores ``checkpoint["grpo_lab"]`` (see the module docstring)."""

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: ResumableModule, checkpoint: dict) -> None:
        checkpoint["grpo_lab"] = {
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": _numpy_state(),
                    # the GPU's sampling stream (written against torch's API; no GPU resume has run)
                    "cuda": (torch.cuda.get_rng_state(pl_module.device)
                             if pl_module.device.type == "cuda" else None)},
            "skipped_steps": pl_module.guard.skipped, "bad_in_a_row": pl_module.guard.in_a_row,
            "warm_start": pl_module.warm_start_path and Path(pl_module.warm_start_path).name,
            "stream": None if pl_module.stream is None else pl_module.stream.state_dict(),
        }

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: ResumableModule, checkpoint: dict) -> None:
        # Lightning adds 1 to the logging step on restart, assuming the checkpoint was written inside a batch;
        # one written at the end of an epoch or fit already counts that batch, so the resumed run's curves
        # would skip a step. Store it as if written inside the batch.
        loop = checkpoint.get("loops", {}).get("fit_loop", {})
        if "epoch_loop.state_dict" in loop and "epoch_loop.batch_progress" in loop:
            processed = loop["epoch_loop.batch_progress"]["total"]["processed"]
            stepped = loop["epoch_loop.state_dict"].get("_batches_that_stepped", 0)
            if processed and stepped >= processed:
                loop["epoch_loop.state_dict"]["_batches_that_stepped"] = processed - 1
        state = checkpoint.get("grpo_lab")
        if state is None:
            return
        ws = pl_module.warm_start_path and Path(pl_module.warm_start_path).name
        if state["warm_start"] != ws:
            raise UserError(f"checkpoint was trained from warm start {state['warm_start']!r}, this config "
                            f"gives {ws!r}")
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"].get("cuda") is not None and pl_module.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], pl_module.device)
        random.setstate(state["rng"]["python"])
        kind, keys, pos, has_gauss, gauss = state["rng"]["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
        pl_module.guard.skipped, pl_module.guard.in_a_row = state["skipped_steps"], state["bad_in_a_row"]
        if state.get("stream") is not None and pl_module.stream is not None:
            pl_module.stream.load_state_dict(state["stream"])
