"""The step's named phases: PhaseTimer records only when on, and GRPOModule names every phase of its step."""

import lightning as L
import pytest
import torch

from grpo_lab.data.datamodule import QueryDataModule
from grpo_lab.model.policy import PolicyConfig
from grpo_lab.module import GRPOModule
from grpo_lab.train.phase_timer import PhaseTimer


def test_timer_off_records_nothing_and_on_accumulates_nested_phases():
    timer = PhaseTimer()
    assert timer("a") is timer("b")  # off: one shared no-op context
    with timer("a"):
        pass
    assert timer.pop() == ({}, {})
    timer.enabled = True
    with timer("outer"):
        for _ in range(2):
            with timer("inner"):
                torch.ones(8).sum()
    seconds, calls = timer.pop()
    assert calls == {"outer": 1, "inner": 2}
    assert seconds["outer"] >= seconds["inner"] > 0
    assert timer.pop() == ({}, {})  # pop starts again from zero


class _Read(L.Callback):
    def __init__(self):
        self.steps = []

    def on_train_start(self, trainer, pl_module):
        pl_module.timer.enabled = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append(pl_module.timer.pop()[1])


@pytest.mark.parametrize(("settings", "phases"), [
    ({}, {"rollout": 1, "reward": 1, "advantage": 1, "loss": 1, "policy_loss": 1, "metrics": 1, "backward": 1,
          "clip": 1}),
    ({"num_iterations": 2, "beta": 0.1},
     {"rollout": 1, "reward": 1, "advantage": 1, "loss": 1, "old_logprobs": 1,
                                          "reference": 2, "policy_loss": 2, "backward": 2, "clip": 2,
                                          "metrics": 1}),
])
def test_a_step_names_its_phases(in_tmp, settings, phases):
    module = GRPOModule(policy=PolicyConfig(hidden_size=32, num_layers=1, num_heads=2), num_generations=2,
                        max_new_tokens=2, **settings)
    read = _Read()
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, accelerator="cpu", callbacks=[read])
    trainer.fit(module, QueryDataModule(prompts_per_step=2, num_train=8, num_val=2))
    assert read.steps and all(step == phases for step in read.steps)  # (μ = 2: one batch makes 2 steps)


def test_a_module_whose_timer_is_off_records_nothing():
    module = GRPOModule(policy=PolicyConfig(hidden_size=32, num_layers=1, num_heads=2), num_generations=2,
                        max_new_tokens=2)
    sample = module.sample([{"prompt": "1+2=", "answer": "3"}])
    module.advantages(sample.rollout, sample.rewards)
    assert module.timer.pop() == ({}, {})
