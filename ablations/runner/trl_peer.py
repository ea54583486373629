"""A grpo-lab trial trained by TRL's ``GRPOTrainer`` instead: the peer of the ``trl_parity`` space.

    python -m ablations.runner.trl_peer fit --config configs/ablate.yaml --config
    runs/ablate/<study>/.../trial.yaml

takes exactly the config a ``grpo-lab fit`` of the same trial would take and trains the same policy with TRL
(the ``[bench]`` extra: ``pip install -e .[bench]``) on the same terms, so that the two implementations can be
compared within seed intervals (the ``trl_parity`` space; ``ablations/spaces/space.py``):

- **the same start**: the cached warm start that grpo_lab would load (``ensure_warm_start`` with the trial's
  policy, warm-start settings and dataset), loaded by TRL from that local directory in float32;
- **the same data order**: grpo_lab's training order (``grpo_lab.data.datamodule.EpochSampler``: a seeded
  permutation per
  epoch, ``data.seed``) written out as TRL's dataset, with TRL's own shuffling off, so step k of both sees
  the same P queries;
- **the same hyperparameters**: G, P, max_new_tokens, temperature (top-k/top-p off), clip ε_low/ε_high, μ,
  β, AdamW's lr and weight decay, gradient clipping, constant learning rate, and the estimator and aggregation
  mapped to TRL's knobs (:func:`trl_settings`: ``group_norm`` is ``scale_rewards="group"``, ``token_mean`` is
  ``loss_type="dapo"`` ...). A setting TRL cannot express is a one-line error, not a silent difference;
- **the same metrics**: ``train/reward`` (and ``train/reward_<difficulty>``) of every rollout batch, written
  to TensorBoard in the trial's log directory at the optimizer step grpo_lab would log it, so the trial
  runner, the summary and the report read a TRL trial like any other.

What is not the same, by construction: the random numbers (TRL samples its completions with its own
generator calls), so the two peers' curves agree only in distribution: the report compares them by paired
seeds, with intervals; and TRL's group-std ε, hard-coded ``(r - mean) / (std + 1e-4)`` against grpo_lab's
1e-6 (at most 4e-4 relative on an advantage of 0/1 rewards with G = 16; no setting of either side changes
it). Everything else computes the same step: seeded alike before a generation, the two sample the same
completions, and on the same completions they take the same step (``tests/test_trl_peer.py``;
docs/peer_parity.md "Peer
parity"). TRL validates nothing here, so a TRL trial has no ``val/acc_*``.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from grpo_lab.system.entry import run_cli
from grpo_lab.system.errors import UserError

# grpo_lab's estimator -> TRL's scale_rewards (TRL always centres by the group mean), and aggregation ->
# loss_type
SCALE_REWARDS = {"group_norm": "group", "mean_baseline": "none", "batch_norm": "batch"}
LOSS_TYPES = {"token_mean": "dapo", "sequence_mean": "grpo", "constant": "dr_grpo"}
DEFAULT_SETTINGS = {"objective": "clip", "importance_level": "token", "dynamic_sampling": False,
                    "kl_in": "loss", "entropy_coef": 0.0, "top_entropy_quantile": 1.0, "dual_clip": None,
                    "advantage_center": None, "advantage_scale": None, "reward_aggregation": "weighted_sum",
                    "micro_batches": 1, "invalid_rewards": "error"}


def trl_settings(rl: dict[str, Any], optimizer: dict[str, Any] | None) -> dict[str, Any]:
    """``GRPOConfig`` keyword arguments for grpo_lab's RL settings ``rl`` (``module.hparams``) and optimizer
    config (``{"class_path": ..., "init_args": {...}}``); a ``UserError`` for what TRL cannot do the same
    way."""
    if rl["advantage"] not in SCALE_REWARDS:
        raise UserError(f"trl_peer: advantage {rl['advantage']!r} has no TRL equivalent; use one of "
                        f"{', '.join(SCALE_REWARDS)}")
    if rl["aggregation"] not in LOSS_TYPES:
        raise UserError(f"trl_peer: aggregation {rl['aggregation']!r} has no TRL equivalent; use one of "
                        f"{', '.join(LOSS_TYPES)}")
    if rl["beta"] > 0 and rl["kl_estimator"] != "k3":
        raise UserError("trl_peer: TRL's KL penalty is the k3 estimator; set kl_estimator: k3")
    changed = [k for k, v in DEFAULT_SETTINGS.items() if k in rl and rl[k] != v]
    if changed:
        raise UserError("trl_peer compares plain GRPO only; these settings differ from their defaults: "
                        f"{changed}")
    opt = optimizer or {}
    if opt and opt.get("class_path", "torch.optim.AdamW") not in ("torch.optim.AdamW", "AdamW"):
        raise UserError(f"trl_peer: optimizer {opt.get('class_path')!r}: only torch.optim.AdamW is mapped to "
                        "TRL")
    init = opt.get("init_args", {}) if opt else {}
    return {
        "num_generations": rl["num_generations"],
        "max_completion_length": rl["max_new_tokens"],
        "generation_kwargs": {"min_new_tokens": rl["min_new_tokens"]} if rl["min_new_tokens"] else None,
        "temperature": rl["temperature"], "top_p": 1.0, "top_k": 0,
        "epsilon": rl["clip_low"], "epsilon_high": rl["clip_high"],
        "num_iterations": rl["num_iterations"],
        "beta": rl["beta"],
        "scale_rewards": SCALE_REWARDS[rl["advantage"]],
        "loss_type": LOSS_TYPES[rl["aggregation"]],
        "mask_truncated_completions": bool(rl["mask_truncated"]),
        "max_grad_norm": rl["max_grad_norm"] if rl["max_grad_norm"] is not None else 0.0,
        "learning_rate": float(init.get("lr", 5e-4)),
        "weight_decay": float(init.get("weight_decay", 0.0)),
        "optim": "adamw_torch", "lr_scheduler_type": "constant", "warmup_steps": 0,
    }


def training_order(n: int, seed: int, prompts_per_step: int, steps: int) -> list[int]:
    """The indices of the first ``steps`` batches grpo_lab's data loader gives (drop_last per epoch)."""
    from grpo_lab.data.datamodule import EpochSampler

    order: list[int] = []
    epoch = 0
    per_epoch = n // prompts_per_step * prompts_per_step
    while len(order) < steps * prompts_per_step:
        sampler = EpochSampler(n, seed, lambda e=epoch: e, lambda _e: 0, batch=prompts_per_step)
        order += list(sampler)[:per_epoch]
        epoch += 1
    return order[: steps * prompts_per_step]


class RewardLog:
    """grpo_lab's reward functions as one TRL reward function that also logs ``train/reward[_<difficulty>]``.

    TRL calls it once per generation batch (P·G completions, every μ optimizer steps) with the dataset's
    columns; it writes the mean reward of that batch at the optimizer step grpo_lab logs it (the first step
    that batch trains), and keeps the prompts it saw so tests can check the data order."""

    def __init__(self, fns, weights, writer, num_iterations: int, num_generations: int) -> None:
        self.fns, self.weights, self.writer = fns, weights, writer
        self.mu, self.g = num_iterations, num_generations
        self.calls = 0
        self.prompts: list[str] = []
        self.__name__ = "grpo_lab_rewards"

    def __call__(self, completions: list[str], prompts: list[str] | None = None, **columns) -> list[float]:
        from grpo_lab.rewards.scoring import score

        trl_only = ("completion_ids", "trainer_state", "log_extra", "log_metric")
        keep = {k: v for k, v in columns.items() if k not in trl_only}
        rewards = score(self.fns, completions, keep, self.weights).tolist()
        step = self.calls * self.mu
        self.writer.add_scalar("train/reward", sum(rewards) / len(rewards), step)
        by: dict[str, list[float]] = defaultdict(list)
        for r, d in zip(rewards, keep.get("difficulty", [None] * len(rewards)), strict=True):
            if d is not None:
                by[str(d)].append(r)
        for d, rs in by.items():
            self.writer.add_scalar(f"train/reward_{d}", sum(rs) / len(rs), step)
        self.writer.flush()
        self.prompts += list(prompts or [])[:: self.g]  # a query's G completions are adjacent
        self.calls += 1
        return rewards


def fit(argv: list[str]) -> RewardLog:
    """Train the trial described by ``argv`` (``--config ... --config ...`` as for ``grpo-lab fit``) with
    TRL."""
    try:
        import datasets
        from trl import GRPOConfig, GRPOTrainer
    except ImportError as err:
        raise UserError(f"trl_peer needs TRL: pip install -e '.[bench]' ({err})") from err
    import torch
    from torch.utils.tensorboard import SummaryWriter

    from grpo_lab.cli import cli_main
    from grpo_lab.model.warmstart import ensure_warm_start

    cli = cli_main(argv, run=False)
    module, dm, trainer = cli.model, cli.datamodule, cli.trainer
    h, dh = dict(module.hparams), dm.hparams
    settings = trl_settings(h, cli.config.get("model", {}).get("optimizer"))
    if trainer.precision not in ("32-true", "32"):
        raise UserError(f"trl_peer runs in float32 only (got precision {trainer.precision!r})")
    steps = int(trainer.max_steps)
    if steps < 1:
        raise UserError("trl_peer needs trainer.max_steps >= 1")
    model_dir = str(ensure_warm_start(module.policy_cfg, module.warm_start_cfg, dh.dataset)) \
        if module.warm_start_cfg.steps > 0 else module.policy_cfg.pretrained
    if model_dir is None:
        raise UserError("trl_peer needs a model directory: a warm start (model.warm_start.steps > 0) or "
                        "policy.pretrained")
    dm.setup("fit")
    rollouts = -(-steps // settings["num_iterations"])
    order = training_order(len(dm.train_set), dh.seed, dh.prompts_per_step, rollouts)
    rows = [{k: v for k, v in dm.train_set[i].items() if not k.startswith("_")} for i in order]
    log_dir = Path(trainer.log_dir or "runs/trl_peer")
    writer = SummaryWriter(str(log_dir))
    reward = RewardLog(module.reward_fns, h["reward_weights"], writer, settings["num_iterations"],
                       h["num_generations"])
    seed = int(cli.config.get("seed_everything") or 0)
    with torch.random.fork_rng(devices=[]):
        config = GRPOConfig(
            output_dir=str(log_dir / "trl"), seed=seed, use_cpu=True, bf16=False, fp16=False,
            gradient_checkpointing=False,
            per_device_train_batch_size=dh.prompts_per_step * h["num_generations"],
            gradient_accumulation_steps=1, steps_per_generation=1, shuffle_dataset=False, max_steps=steps,
            report_to=[], logging_strategy="no", save_strategy="no", eval_strategy="no", disable_tqdm=True,
            log_completions=False, dataloader_num_workers=0, use_vllm=False,
            model_init_kwargs={"dtype": torch.float32,
                               "attn_implementation": module.policy_cfg.attn_implementation},
            **{k: v for k, v in settings.items() if v is not None},
        )
        tok = module.tokenizer
        GRPOTrainer(model=model_dir, reward_funcs=[reward], args=config,
                    train_dataset=datasets.Dataset.from_list(rows), processing_class=tok).train()
    writer.close()
    return reward


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    sys.argv[1:] = []  # LightningCLI is given the arguments explicitly (cli_main(args)), not through sys.argv
    if not args or args[0] != "fit":
        raise UserError("usage: python -m ablations.runner.trl_peer fit --config BASE.yaml "
                        "[--config OVERLAY.yaml ...]")
    fit(args[1:])
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
