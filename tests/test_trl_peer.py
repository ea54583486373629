"""The TRL peer of the trl_parity space: the same trial, trained by TRL's GRPOTrainer on the same terms."""

from __future__ import annotations

import pytest

from ablations.runner.trl_peer import training_order, trl_settings
from grpo_lab.config import RLConfig
from grpo_lab.data.datamodule import QueryDataModule
from grpo_lab.system.errors import UserError
from grpo_lab.train.tensorboard_scalars import read_scalars
from tests.conftest import CONFIGS

ADAMW = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 3e-4, "weight_decay": 0.0}}


def _rl(**kw) -> dict:
    from dataclasses import asdict

    return asdict(RLConfig(**kw))


def test_settings_map_grpo_lab_knobs_to_trl():
    s = trl_settings(_rl(num_generations=16, max_new_tokens=4, clip_high=0.28, temperature=0.9), ADAMW)
    got = [s[k] for k in ("scale_rewards", "loss_type", "epsilon", "epsilon_high")]
    assert got == ["group", "dapo", 0.2, 0.28]
    got = [s[k] for k in ("num_generations", "max_completion_length", "temperature", "top_k", "top_p")]
    assert got == [16, 4, 0.9, 0, 1.0]
    assert (s["learning_rate"], s["weight_decay"], s["max_grad_norm"], s["beta"]) == (3e-4, 0.0, 1.0, 0.0)
    assert trl_settings(_rl(advantage="mean_baseline", aggregation="constant"), ADAMW)[
        "scale_rewards"] == "none"
    assert trl_settings(_rl(aggregation="sequence_mean"), None)["loss_type"] == "grpo"
    assert trl_settings(_rl(aggregation="constant"), None)["loss_type"] == "dr_grpo"


@pytest.mark.parametrize("kw, match", [
    ({"advantage": "rloo"}, "advantage 'rloo' has no TRL equivalent"),
    ({"importance_level": "sequence"}, "importance_level"),
    ({"dynamic_sampling": True}, "dynamic_sampling"),
    ({"beta": 0.1, "kl_estimator": "k1"}, "k3"),
])
def test_settings_trl_cannot_mirror_are_one_line_errors(kw, match):
    with pytest.raises(UserError, match=match):
        trl_settings(_rl(**kw), ADAMW)
    with pytest.raises(UserError, match="only torch.optim.AdamW"):
        trl_settings(_rl(), {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1}})


def test_training_order_is_the_data_loaders_order_across_epochs():
    dm = QueryDataModule(dataset="arithmetic", prompts_per_step=4, num_train=10, num_val=2, seed=3)
    dm.setup("fit")
    first_epoch = [q["prompt"] for batch in dm.train_dataloader() for q in batch]  # 2 batches (drop_last)
    order = training_order(10, 3, 4, steps=5)
    assert len(order) == 20 and [dm.train_set[i]["prompt"] for i in order[:8]] == first_epoch
    assert order[:8] != order[8:16]  # the next epoch is another permutation (seed * 1_000_003 + epoch)


@pytest.mark.slow
def test_a_trl_trial_sees_grpo_labs_queries_in_order_and_logs_every_step(tmp_path):
    from ablations.runner.trl_peer import fit

    overlay = tmp_path / "o.yaml"
    overlay.write_text(
        "trainer:\n  max_steps: 3\n  logger:\n    class_path: lightning.pytorch.loggers.TensorBoardLogger\n"
        f"    init_args: {{save_dir: {tmp_path / 'run'}, name: '', version: ''}}\n"
        f"model:\n  warm_start: {{cache_dir: {tmp_path / 'ws'}}}\n"
    )
    reward = fit(["--config", str(CONFIGS / "smoke.yaml"), "--config", str(overlay)])
    dm = QueryDataModule(dataset="arithmetic", prompts_per_step=4, num_train=64, num_val=16, seed=0)
    dm.setup("fit")
    expected = [dm.train_set[i]["prompt"] for i in training_order(len(dm.train_set), 0, 4, 3)]
    assert reward.prompts == expected  # the 3 batches grpo_lab would train on, in its order
    scalars = read_scalars(tmp_path / "run")
    assert [s for s, _ in scalars["train/reward"]] == [0, 1, 2] and "train/reward_easy" in scalars
    assert all(0.0 <= v <= 1.0 for _, v in scalars["train/reward"])


@pytest.mark.slow
def test_a_parity_study_runs_trl_trials_through_the_trial_runner_and_compares_them(tmp_path, monkeypatch):
    """``trl_parity`` at smoke size: the trial runner runs the peer=trl trial as ``python -m
    ablations.runner.trl_peer``
    in its own process and the grpo_lab one in a worker; both COMPLETE with curves, and the report pairs them
    by seed."""
    import json

    from optuna.trial import TrialState

    from ablations.report.markdown import write_report
    from ablations.runner.storage import make_storage
    from ablations.runner.study_loop import open_study, run_grid
    from ablations.runner.trial import TrialRunner
    from ablations.runner.worker import WorkerPool
    from ablations.spaces.space import SPACES, Space

    base = SPACES["trl_parity"]
    space = Space(name="trl_parity_smoke", description="parity at smoke size",
                  grid={**base.grid, "seed": [0]},
                  presets=base.presets, base_config="configs/ablate_smoke.yaml", probe=None,
                  overrides={**base.overrides, "trainer.max_steps": 3}, baseline=base.baseline)
    monkeypatch.chdir(tmp_path)
    study = open_study(space, "p", make_storage(f"sqlite:///{tmp_path / 'p.db'}"))
    with WorkerPool(1, tmp_path / "workers.log") as pool:
        run_grid(study, space, TrialRunner(space, tmp_path / "study", tmp_path / "runs", pool=pool), n_jobs=1)
    done = {t.params["peer"]: t for t in study.get_trials(states=(TrialState.COMPLETE,))}
    assert set(done) == {"grpo_lab", "trl"}
    trl, ours = done["trl"].user_attrs, done["grpo_lab"].user_attrs
    assert "ablations.runner.trl_peer fit" in trl["command"] and not trl["in_process"]
    assert "grpo_lab.cli fit" in ours["command"] and ours["in_process"]
    assert all(t.user_attrs["last_step"] == 2 for t in done.values())
    write_report(study, tmp_path / "report")
    comparison = json.loads((tmp_path / "report" / "summary.json").read_text())["comparisons"]
    assert [(c["group"], c["baseline"], c["n"]) for c in comparison.values()] == [("trl", "grpo_lab", 1)]


@pytest.mark.slow
def test_from_one_rng_state_trl_and_grpo_lab_sample_the_same_batches_and_take_the_same_steps(tmp_path,
                                                                                          monkeypatch):
    """The peers differ only in their random numbers: seeded alike before each generation, TRL's
    ``generate`` and grpo_lab's sampler draw the same completions from the same warm start, and two steps
    on them give the same gradients and weights. A knob mapped wrongly (sampling, lr, Adam, clipping, loss
    type and normalizer, reward scaling) breaks this. What may differ: TRL's group-std ε (1e-4, ours 1e-6,
    ~4e-4 relative on the advantages) and rounding. A dense reward gives every group a spread, and a small
    ``max_grad_norm`` makes the clipping act on both steps (Adam's second step sees the two norms)."""
    import lightning as L
    import torch
    import trl

    from ablations.runner import trl_peer
    from grpo_lab.cli import cli_main

    def overlay(name: str) -> list[str]:
        path = tmp_path / f"{name}.yaml"
        path.write_text(
            "trainer:\n  max_steps: 2\n  val_check_interval: 8\n  enable_checkpointing: false\n"
            "  callbacks: []\n"
            "  logger:\n    class_path: lightning.pytorch.loggers.TensorBoardLogger\n"
            f"    init_args: {{save_dir: {tmp_path / name}, name: '', version: ''}}\n"
            f"model:\n  warm_start: {{cache_dir: {tmp_path / 'ws'}}}\n"
            "  rewards: [ablations.spaces.controls:length]\n  max_grad_norm: 0.01\n")
        return ["--config", str(CONFIGS / "ablate_smoke.yaml"), "--config", str(path)]

    def weights(model) -> torch.Tensor:
        return torch.cat([p.detach().flatten() for _, p in sorted(model.named_parameters())]).double()

    def grads(model) -> torch.Tensor:
        return torch.cat([p.grad.flatten() for _, p in sorted(model.named_parameters())]).double()

    trl_seen: dict[str, list] = {"completions": [], "grads": [], "weights": []}

    class Spy(trl.GRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            torch.manual_seed(100 + len(trl_seen["completions"]))
            out = super()._generate_and_score_completions(inputs)
            ids, mask = out["completion_ids"], out["completion_mask"]
            trl_seen["completions"].append([row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True)])
            return out

        def training_step(self, model, inputs, num_items_in_batch=None):
            if not trl_seen["weights"]:
                trl_seen["weights"].append(weights(self.model))
            out = super().training_step(model, inputs, num_items_in_batch)
            trl_seen["grads"].append(grads(self.model))  # before the optimizer step's clipping
            return out

        def train(self, *args, **kwargs):
            out = super().train(*args, **kwargs)
            trl_seen["weights"].append(weights(self.model))
            return out

    monkeypatch.setattr(trl, "GRPOTrainer", Spy)
    trl_peer.fit(overlay("trl"))

    cli = cli_main(overlay("grpo_lab"), run=False)
    module, ours = cli.model, {"completions": [], "grads": [], "weights": []}
    sample = module.rollout

    def seeded_rollout(batch, num_generations=None, greedy=False):
        torch.manual_seed(100 + len(ours["completions"]))
        rollout = sample(batch, num_generations, greedy)
        ids, mask = rollout.completion_ids, rollout.completion_mask
        ours["completions"].append([row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True)])
        return rollout

    class Record(L.Callback):
        def on_train_start(self, trainer, pl_module):
            ours["weights"].append(weights(pl_module.model))

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # before the module clips
            ours["grads"].append(grads(pl_module.model))

        def on_train_end(self, trainer, pl_module):
            ours["weights"].append(weights(pl_module.model))

    module.rollout = seeded_rollout
    cli.trainer.callbacks.append(Record())
    cli.trainer.fit(module, datamodule=cli.datamodule)

    assert torch.equal(trl_seen["weights"][0], ours["weights"][0])  # the same warm start
    assert len(ours["completions"]) == 2 and ours["completions"] == trl_seen["completions"]
    for g_trl, g_ours in zip(trl_seen["grads"], ours["grads"], strict=True):
        assert g_trl.norm() > 0.01  # a real gradient, clipped by max_grad_norm
        assert (g_trl - g_ours).norm() / g_trl.norm() < 1e-2
    step_trl = trl_seen["weights"][1] - trl_seen["weights"][0]
    assert step_trl.norm() > 0
    assert (trl_seen["weights"][1] - ours["weights"][1]).norm() / step_trl.norm() < 1e-2
