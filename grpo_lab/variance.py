"""How noisy is each advantage estimator's gradient? A probe of the true gradient variance, scale-free.

The claim behind every baseline in ``advantages.py`` is *variance reduction*. This module measures it on
the actual policy, at fixed parameters, without perturbing a training run:

1. draw K independent rollout batches (fresh queries, fresh samples) from the current policy;
2. on each batch compute every estimator's gradient on the *same* rollout (a paired comparison: the
   differences between estimators are not drowned in the batch-to-batch noise they share);
3. estimate ∇J itself from ``reference_batches`` further, independent batches with plain REINFORCE on the
   raw reward and the ``constant`` aggregation (an unbiased estimate of ∇J; ``token_mean`` would
   length-normalize it into the gradient of another objective);
4. summarize each estimator's K gradients with :func:`gradient_statistics`.

Why not just report the variance: ``group_norm`` divides every group's advantages by its reward std, and
``rloo`` multiplies ``mean_baseline``'s by G/(G−1), so their gradients live on different scales and the raw
variance mostly measures the scale. An optimizer step with Adam or gradient clipping is (nearly) scale
invariant, so what matters is how much of the gradient is signal: the signal-to-noise ratio and the
direction's agreement with ∇J (cosine) are both unchanged when the gradient is multiplied by a constant.

Gradients are the μ = 1 (ratio 1, REINFORCE) form of the policy loss, the ascent direction −∇loss, taken
w.r.t. the policy's parameters before any gradient clipping; the KL penalty (``beta``) is left out: it is
the same for every estimator and no part of ∇J.

Run on a checkpoint::

    python -m grpo_lab.variance --ckpt runs/.../last.ckpt --num-batches 16 --out probe.json

or attach :class:`GradientVarianceProbe` to a ``Trainer`` to probe at the start, middle and end of a fit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import pickle
import sys
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from grpo_lab.advantages import compute_advantages
from grpo_lab.errors import UserError, UserFileNotFoundError, run_cli
from grpo_lab.losses import policy_loss
from grpo_lab.rollout import sequence_logprobs

DEFAULT_ESTIMATORS: tuple[str, ...] = ("reward", "mean_baseline", "group_norm", "rloo")
REFERENCE_ESTIMATOR = "reward"
REFERENCE_AGGREGATION = "constant"


# ---- statistics ---------------------------------------------------------------------------------------
def _summarize(mean: Tensor, sum_sq_dev: float, k: int, reference: Tensor | None) -> dict[str, float | None]:
    """The statistics from the sample mean ḡ and Σ_k‖g_k − ḡ‖² (float64 on the same device)."""
    v = sum_sq_dev / (k - 1)
    norm_sq = float(mean.dot(mean))
    s = norm_sq - v / k
    if v > 0.0:
        snr = s / v
    else:  # every g_k equal: no noise. No signal either (0) unless the common gradient is non-zero (inf).
        snr = math.inf if norm_sq > 0.0 else 0.0
    if norm_sq > 0.0:
        rel = v / norm_sq
    else:
        rel = math.inf if v > 0.0 else 0.0
    cosine = None
    if reference is not None:
        ref = reference.to(device=mean.device, dtype=torch.float64).flatten()
        if ref.shape != mean.shape:
            raise ValueError(f"reference must have D={mean.numel()} entries, got shape {tuple(reference.shape)}")
        denom = math.sqrt(norm_sq) * float(ref.norm())
        cosine = max(-1.0, min(1.0, float(mean.dot(ref)) / denom)) if denom > 0.0 else 0.0
    return {
        "mean_norm": math.sqrt(norm_sq),
        "variance": v,
        "signal": s,
        "snr": snr,
        "cosine": cosine,
        "relative_variance": rel,
        "num_batches": float(k),
    }


def gradient_statistics(grads: Tensor, reference: Tensor | None = None) -> dict[str, float | None]:
    """Signal and noise of K independent gradient estimates ``grads`` ``[K, D]`` of one expectation μ.

    With ḡ = (1/K) Σ_k g_k (computed in float64):

    - ``variance`` V = Σ_k ‖g_k − ḡ‖² / (K − 1): the total variance tr Cov(g) of *one* estimate (unbiased);
    - ``signal`` S = ‖ḡ‖² − V/K: unbiased for ‖μ‖², because E‖ḡ‖² = ‖μ‖² + tr Cov(g)/K (it can come out
      negative when the noise dominates; that is the honest estimate, not clipped);
    - ``snr`` S / V ≈ ‖μ‖² / tr Cov(g): signal-to-noise of one estimate. V = 0 (all g_k equal) gives 0 when
      ḡ = 0 (no signal, e.g. every group had zero reward spread) and ``inf`` otherwise; never NaN;
    - ``cosine`` ḡ·r / (‖ḡ‖‖r‖) with the ``reference`` direction r (``None`` without one; 0 if a norm is 0);
    - ``mean_norm`` ‖ḡ‖, and ``relative_variance`` V / ‖ḡ‖² (0 when V = ḡ = 0, ``inf`` when only ḡ = 0).
      Scale-free but not K-free: ‖ḡ‖² carries the V/K of noise, so compare it only at equal K (1/``snr``
      is the K-free version);
    - ``num_batches`` K.

    Why SNR and cosine rather than V: estimators differ in *scale* (``group_norm`` divides each group by
    its reward std, ``rloo`` is G/(G−1) × ``mean_baseline``), and V grows with the square of the scale while
    an Adam step or a clipped step hardly depends on it. Multiplying every g_k by c multiplies V and S by c²
    and leaves ``snr``, ``cosine`` and ``relative_variance`` unchanged: those compare estimators fairly.
    Both still see bias: a biased estimator can have a high SNR around the wrong mean, which the cosine
    with an unbiased reference exposes.

    Note ``cosine`` compares ḡ, an average of K noisy estimates, with a reference that is itself a noisy
    average, so noise in either pulls it towards 0: compare estimators at the same K and reference.
    """
    if grads.dim() != 2:
        raise ValueError(f"grads must be [K, D] (K estimates of a D-dim gradient), got shape {tuple(grads.shape)}")
    k = grads.shape[0]
    if k < 2:
        raise ValueError(f"need K >= 2 gradient estimates to estimate a variance, got K={k}")
    g = grads.detach().to(torch.float64)
    mean = g.mean(dim=0)
    sum_sq_dev = float(((g - mean) ** 2).sum())
    return _summarize(mean, sum_sq_dev, k, reference)


class _RunningMoments:
    """Welford's running mean and Σ‖g_k − ḡ‖² of flattened gradients (float64, O(D) memory for any K)."""

    def __init__(self) -> None:
        self.k = 0
        self.mean: Tensor | None = None
        self.sum_sq_dev = 0.0

    def update(self, g: Tensor) -> None:
        g = g.detach().to(torch.float64).flatten()
        self.k += 1
        if self.mean is None:
            self.mean = g.clone()
            return
        delta = g - self.mean
        self.mean += delta / self.k
        self.sum_sq_dev += float(delta.dot(g - self.mean))

    def statistics(self, reference: Tensor | None = None) -> dict[str, float | None]:
        if self.k < 2 or self.mean is None:
            raise ValueError(f"need K >= 2 gradient estimates to estimate a variance, got K={self.k}")
        return _summarize(self.mean, self.sum_sq_dev, self.k, reference)


# ---- gradients ----------------------------------------------------------------------------------------
def _policy_parameters(module) -> list[Tensor]:
    return [p for p in module.model.parameters() if p.requires_grad]


def _flat(grads: Sequence[Tensor | None], params: Sequence[Tensor]) -> Tensor:
    parts = [
        (torch.zeros(p.numel(), dtype=torch.float32) if g is None else g.detach().float().flatten().cpu())
        for g, p in zip(grads, params, strict=True)
    ]
    return torch.cat(parts)


def estimator_gradients(
    module, batch: list[dict], estimators: Sequence[str], aggregation: str | None = None
) -> dict[str, Tensor]:
    """The ascent direction −∇loss ``[D]`` (float32, CPU) of each estimator on ONE rollout of ``batch``.

    One rollout (``module.rollout``: G completions per query, the module's temperature and length) and one
    reward (``module.reward``) are shared by all estimators, so they are compared on identical samples.
    The loss is the module's policy loss in its μ = 1 form (π_old = π_θ detached, ratio 1: the REINFORCE
    gradient −Σ A·∇log π / normalizer) with the module's aggregation, or ``aggregation`` when given
    (``constant`` divides by B·``max_new_tokens`` as the module does). It equals ``module.loss`` without the
    KL term (common to all estimators, no part of ∇J); and the token count of ``token_mean`` is always the
    local one, so a probe on one process never waits for the others. The log-probabilities are computed
    once; each estimator is one backward pass through the retained graph. D counts the trainable
    parameters of ``module.model`` in ``parameters()`` order (tied weights once).

    Group estimators on G = 1 raise ``compute_advantages``'s ValueError; ``reward`` works with any G.
    """
    if not estimators:
        raise UserError("estimators must name at least one advantage estimator")
    h = module.hparams
    agg = aggregation or h.aggregation
    rollout = module.rollout(batch)
    rewards = module.reward(rollout, batch)  # [P, G]
    advantages = {name: compute_advantages(rewards, name).flatten() for name in dict.fromkeys(estimators)}
    params = _policy_parameters(module)
    mask = rollout.completion_mask
    normalizer = mask.shape[0] * h.max_new_tokens if agg == "constant" else None
    out: dict[str, Tensor] = {}
    with torch.inference_mode(False), torch.enable_grad():
        logprobs, _ = sequence_logprobs(module.model, rollout, h.temperature)  # [B, T], one forward pass
        names = list(advantages)
        for i, name in enumerate(names):
            loss, _ = policy_loss(
                logprobs, logprobs.detach(), advantages[name], mask, clip_low=h.clip_low, clip_high=h.clip_high,
                kl_estimator=h.kl_estimator, aggregation=agg, normalizer=normalizer,
            )
            grads = torch.autograd.grad(loss, params, retain_graph=i < len(names) - 1, allow_unused=True)
            out[name] = -_flat(grads, params)
    return out


# ---- the probe ----------------------------------------------------------------------------------------
@contextlib.contextmanager
def _frozen(module, seed: int) -> Iterator[None]:
    """Fixed parameters, training mode, seeded sampling; RNG and module modes restored afterwards."""
    model = module.model
    params = list(model.parameters())
    versions = [p._version for p in params]  # any in-place update (an optimizer step) bumps these
    modes = [(m, m.training) for m in model.modules()]
    device = next(iter(params)).device if params else torch.device("cpu")
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        if cuda:
            torch.cuda.manual_seed(seed)  # the current device only: the one forked above
        model.train()  # the mode training gradients are taken in
        try:
            yield
        finally:
            for m, training in modes:
                m.training = training
    after = [p._version for p in model.parameters()]
    if after != versions:
        raise RuntimeError("the gradient probe must not change the policy's parameters, but they were modified")


def _batches(queries: list[dict], n: int, size: int, gen: torch.Generator) -> Iterator[list[dict]]:
    for _ in range(n):
        yield [queries[i] for i in torch.randperm(len(queries), generator=gen)[:size].tolist()]


def _progress(enabled: bool, total: int):
    if not enabled:
        return contextlib.nullcontext(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        transient=True, disable=not sys.stderr.isatty(),
    )


def probe(
    module,
    queries: list[dict],
    estimators: Sequence[str] = DEFAULT_ESTIMATORS,
    num_batches: int = 16,
    reference_batches: int = 64,
    prompts_per_batch: int = 8,
    seed: int = 0,
    progress: bool = False,
    reference_estimator: str = REFERENCE_ESTIMATOR,
) -> dict[str, dict[str, float | None]]:
    """Gradient statistics of each estimator at the module's current parameters.

    Draws ``num_batches`` (K) independent batches of ``prompts_per_batch`` queries (without replacement
    within a batch, from a ``torch.Generator`` seeded with ``seed``) and G fresh completions each; each
    batch gives every estimator's gradient on the same rollout (:func:`estimator_gradients`). The reference
    ∇J is the mean of ``reference_batches`` further, independent batches' REINFORCE gradients on the raw
    reward with ``constant`` aggregation (unbiased for ∇J; independent of the K batches so the cosine is
    not inflated by shared samples). ``reference_estimator="rloo"`` (also unbiased, G >= 2) gives a far
    less noisy reference at the same cost. Returns ``{estimator: gradient_statistics(...)}`` with the
    cosine taken against that reference, plus ``reference_snr``: the reference estimator's per-batch SNR
    (None for one reference batch). The reference direction's expected cosine with the true ∇J is about
    √(R·snr / (1 + R·snr)) for R reference batches: when that is far below 1, every ``cosine`` is
    attenuated by about that factor (the ranking of estimators is not).

    No optimizer step is taken (checked), ``.grad`` is untouched, the model runs in training mode and
    its modes are restored, and sampling uses a forked torch RNG seeded with ``seed``: the global RNG is
    the same afterwards, so a training run probed along the way samples what it would have without it.
    ``progress`` shows a transient Rich bar on a terminal.
    """
    estimators = list(dict.fromkeys(estimators))
    if not estimators:
        raise UserError("estimators must name at least one advantage estimator")
    if num_batches < 2:
        raise UserError(f"num_batches must be >= 2 to estimate a variance, got {num_batches}")
    if reference_batches < 1:
        raise UserError(f"reference_batches must be >= 1, got {reference_batches}")
    if not 1 <= prompts_per_batch <= len(queries):
        raise UserError(f"prompts_per_batch must be in [1, {len(queries)}] (the queries given), got {prompts_per_batch}")
    moments = {name: _RunningMoments() for name in estimators}
    reference = _RunningMoments()
    gen = torch.Generator().manual_seed(seed)
    with _frozen(module, seed), _progress(progress, num_batches + reference_batches) as bar:
        task = bar.add_task("gradient probe", total=num_batches + reference_batches) if bar is not None else None
        for batch in _batches(queries, num_batches, prompts_per_batch, gen):
            for name, g in estimator_gradients(module, batch, estimators).items():
                moments[name].update(g)
            if bar is not None:
                bar.advance(task)
        for batch in _batches(queries, reference_batches, prompts_per_batch, gen):
            grads = estimator_gradients(module, batch, [reference_estimator], aggregation=REFERENCE_AGGREGATION)
            reference.update(grads[reference_estimator])
            if bar is not None:
                bar.advance(task)
    reference_snr = reference.statistics()["snr"] if reference.k >= 2 else None
    return {name: {**m.statistics(reference.mean), "reference_snr": reference_snr} for name, m in moments.items()}


# ---- the callback -------------------------------------------------------------------------------------
class GradientVarianceProbe(L.Callback):
    """Probe the estimators' gradient statistics at fractions of a fit (rank 0 only).

    Fraction 0 runs in ``on_train_start``, fractions strictly between 0 and 1 at the first training batch
    whose ``global_step`` reaches ``fraction × max_steps`` (or the estimated number of steps when
    ``max_steps`` is unset), and fraction 1 in ``on_train_end``. Each probe appends rows
    ``{"step", "fraction", "estimator", **stats}`` to :attr:`results`, logs ``probe/snr_<est>``,
    ``probe/cosine_<est>`` and ``probe/relative_variance_<est>`` to the trainer's loggers (finite values),
    and rewrites ``probe.json`` in ``trainer.log_dir``. The probe forks the RNG, so the fit samples the
    same completions with or without it.
    """

    def __init__(
        self,
        estimators: Sequence[str] = DEFAULT_ESTIMATORS,
        num_batches: int = 16,
        reference_batches: int = 64,
        prompts_per_batch: int = 8,
        at_fractions: Sequence[float] = (0.0, 0.5, 1.0),
        seed: int = 0,
        reference_estimator: str = REFERENCE_ESTIMATOR,
    ) -> None:
        """
        Args:
            estimators: advantage estimators to compare (registry names).
            num_batches: K, independent rollout batches per probe.
            reference_batches: batches averaged into the reference gradient of J.
            prompts_per_batch: queries per probe batch (each gets the module's G completions).
            at_fractions: when to probe, as fractions of the fit's steps in [0, 1].
            seed: seed of the probe's queries and samples (the same at every probe).
            reference_estimator: unbiased estimator of the reference ∇J (``reward`` or ``rloo``), with
                ``constant`` aggregation.
        """
        if any(not 0.0 <= f <= 1.0 for f in at_fractions):
            raise UserError(f"at_fractions must lie in [0, 1], got {list(at_fractions)}")
        if num_batches < 2 or reference_batches < 1 or prompts_per_batch < 1:
            raise UserError("need num_batches >= 2, reference_batches >= 1 and prompts_per_batch >= 1")
        self.estimators = list(estimators)
        self.num_batches = num_batches
        self.reference_batches = reference_batches
        self.prompts_per_batch = prompts_per_batch
        self.at_fractions = sorted(set(float(f) for f in at_fractions))
        self.seed = seed
        self.reference_estimator = reference_estimator
        self.results: list[dict] = []
        self._done: set[float] = set()

    # -- hooks
    def on_train_start(self, trainer, pl_module) -> None:
        self._maybe_probe(trainer, pl_module, [f for f in self.at_fractions if f == 0.0])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        middle = [f for f in self.at_fractions if 0.0 < f < 1.0 and f not in self._done]
        if not middle:
            return
        total = self._total_steps(trainer)
        if total is None:
            return
        self._maybe_probe(trainer, pl_module, [f for f in middle if trainer.global_step >= f * total])

    def on_train_end(self, trainer, pl_module) -> None:
        self._maybe_probe(trainer, pl_module, [f for f in self.at_fractions if f == 1.0])

    def state_dict(self) -> dict:
        return {"results": self.results, "done": sorted(self._done)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.results = list(state_dict.get("results", []))
        self._done = set(state_dict.get("done", []))

    # -- work
    def _total_steps(self, trainer) -> float | None:
        if trainer.max_steps is not None and trainer.max_steps > 0:
            return float(trainer.max_steps)
        total = trainer.estimated_stepping_batches
        if not math.isfinite(total):
            rank_zero_warn("GradientVarianceProbe: the fit has no finite length; middle fractions are skipped")
            return None
        return float(total)

    def _maybe_probe(self, trainer, pl_module, fractions: list[float]) -> None:
        fractions = [f for f in fractions if f not in self._done]
        if not fractions:
            return
        self._done.update(fractions)
        if not trainer.is_global_zero:
            return
        dm = getattr(trainer, "datamodule", None)
        queries = getattr(dm, "train_set", None)
        if not queries:
            rank_zero_warn("GradientVarianceProbe: the trainer has no datamodule with a train_set; not probing")
            return
        stats = probe(
            pl_module, queries, self.estimators, self.num_batches, self.reference_batches,
            min(self.prompts_per_batch, len(queries)), self.seed, reference_estimator=self.reference_estimator,
        )
        step = int(trainer.global_step)
        for f in fractions:
            for name, s in stats.items():
                self.results.append({"step": step, "fraction": f, "estimator": name, **s})
        metrics = {}
        for name, s in stats.items():
            for key in ("snr", "cosine", "relative_variance"):
                if s[key] is not None and math.isfinite(s[key]):
                    metrics[f"probe/{key}_{name}"] = float(s[key])
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        log_dir = trainer.log_dir
        if log_dir:
            _write_json(Path(log_dir) / "probe.json", self._report())

    def _report(self) -> dict:
        return {
            "config": {
                "estimators": self.estimators, "num_batches": self.num_batches,
                "reference_batches": self.reference_batches, "prompts_per_batch": self.prompts_per_batch,
                "at_fractions": self.at_fractions, "seed": self.seed,
                "reference": f"{self.reference_estimator}/{REFERENCE_AGGREGATION}",
            },
            "results": self.results,
        }


def _write_json(path: Path, payload: dict) -> None:
    """Atomically (written beside, then renamed); non-finite floats as the JSON extensions Infinity/NaN."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)


# ---- command line -------------------------------------------------------------------------------------
def _table(stats: dict[str, dict[str, float | None]], title: str):
    from rich.table import Table

    table = Table(title=title)
    table.add_column("estimator")
    for header in ("snr", "cosine", "V/‖ḡ‖²", "‖ḡ‖", "variance"):
        table.add_column(header, justify="right", no_wrap=True)
    for name, s in stats.items():
        cells = [("-" if s[k] is None else f"{s[k]:.4g}") for k in ("snr", "cosine", "relative_variance", "mean_norm", "variance")]
        table.add_row(name, *cells)
    return table


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m grpo_lab.variance",
        description="Measure each advantage estimator's gradient signal-to-noise ratio and its cosine with "
        "an unbiased estimate of ∇J, at the parameters of a GRPOModule checkpoint.",
    )
    parser.add_argument("--ckpt", required=True, help="path to a GRPOModule Lightning checkpoint (.ckpt)")
    parser.add_argument(
        "--estimators", nargs="+", default=list(DEFAULT_ESTIMATORS),
        help="advantage estimators to compare, by registry name (default: %(default)s)",
    )
    parser.add_argument("--num-batches", type=int, default=16, help="K, independent rollout batches per estimator (>= 2; default: %(default)s)")
    parser.add_argument("--reference-batches", type=int, default=64, help="batches averaged into the reference gradient of J (default: %(default)s)")
    parser.add_argument(
        "--reference-estimator", default=REFERENCE_ESTIMATOR,
        help="unbiased estimator averaged into the reference ∇J with constant aggregation: reward (plain "
        "REINFORCE) or rloo (unbiased too, much less noisy; needs G >= 2) (default: %(default)s)",
    )
    parser.add_argument("--prompts-per-batch", type=int, default=8, help="queries per rollout batch; each gets the checkpoint's G completions (default: %(default)s)")
    parser.add_argument("--dataset", default="arithmetic", help="built-in task name or .jsonl path the queries come from (default: %(default)s)")
    parser.add_argument("--num-queries", type=int, default=2048, help="queries generated for a built-in task (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the queries and of the probe's sampling (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="torch device to run the probe on, e.g. cpu or cuda (default: %(default)s)")
    parser.add_argument("--out", default="probe.json", help="where to write the results as JSON (default: %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no table, only the JSON file")
    parser.add_argument(
        "--trust-checkpoint", action="store_true",
        help="unpickle the checkpoint in full (torch.load weights_only=False): only for checkpoints you made "
        "yourself, e.g. with an optimizer callable in its hyperparameters",
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of a user error, not just its line")
    return parser


def load_module(ckpt: str | Path, trust: bool = False):
    """``GRPOModule.load_from_checkpoint`` on CPU. By default with ``weights_only`` torch loading, the config
    dataclasses allow-listed; ``trust`` unpickles everything (a checkpoint whose hyperparameters hold other
    objects, such as an optimizer callable, needs it)."""
    from grpo_lab.module import GRPOModule
    from grpo_lab.policy import PolicyConfig
    from grpo_lab.warmstart import WarmStartConfig

    if trust:
        return GRPOModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=False)
    try:
        with torch.serialization.safe_globals([PolicyConfig, WarmStartConfig]):
            return GRPOModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UserError(
            f"{ckpt}: cannot be loaded with weights_only torch loading ({err}). "
            "If you made this checkpoint yourself, rerun with --trust-checkpoint."
        ) from None


def main(argv: list[str] | None = None) -> dict[str, dict[str, float | None]]:
    """``python -m grpo_lab.variance``: a bad checkpoint path or setting is one ``error:`` line and exit
    status 2 (``--debug`` for the traceback; see ``grpo_lab.errors``). Returns the statistics."""
    return run_cli(_main, argv)


def _main(argv: list[str] | None) -> dict[str, dict[str, float | None]]:
    args = build_parser().parse_args(argv)
    from grpo_lab.tasks import load_queries

    if not Path(args.ckpt).is_file():
        raise UserFileNotFoundError(f"--ckpt {args.ckpt}: no such checkpoint file")
    if not zipfile.is_zipfile(args.ckpt):  # what torch.save (and so Lightning) has written since torch 1.6
        raise UserError(f"--ckpt {args.ckpt}: not a checkpoint (a Lightning .ckpt is a zip archive written by torch.save)")
    module = load_module(args.ckpt, trust=args.trust_checkpoint).to(args.device)
    queries = load_queries(args.dataset, args.num_queries, args.seed)
    stats = probe(
        module, queries, args.estimators, args.num_batches, args.reference_batches, args.prompts_per_batch,
        args.seed, progress=not args.quiet, reference_estimator=args.reference_estimator,
    )
    payload = {
        "ckpt": str(args.ckpt),
        "config": {k: v for k, v in vars(args).items() if k not in ("ckpt", "out", "quiet")}
        | {"reference": f"{args.reference_estimator}/{REFERENCE_AGGREGATION}",
           "num_generations": module.hparams.num_generations, "aggregation": module.hparams.aggregation},
        "results": [{"estimator": name, **s} for name, s in stats.items()],
    }
    _write_json(Path(args.out), payload)
    if not args.quiet:
        from rich.console import Console

        console = Console()
        console.print(_table(stats, f"gradient probe of {args.ckpt}"))
        ref_snr = next(iter(stats.values()))["reference_snr"]
        if ref_snr is not None:
            r = args.reference_batches * max(ref_snr, 0.0)
            console.print(
                f"reference ∇J: {args.reference_estimator}/{REFERENCE_AGGREGATION} over {args.reference_batches} "
                f"batches, per-batch SNR {ref_snr:.3g}; its expected cosine with the true ∇J ≈ "
                f"{math.sqrt(r / (1 + r)) if math.isfinite(r) else 1.0:.2f} (cosines above are attenuated by about that)"
            )
        console.print(f"wrote {args.out}")
    return stats


if __name__ == "__main__":
    main()
