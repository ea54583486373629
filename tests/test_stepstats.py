import json

import lightning as L
import pytest

from grpo_lab.data.datamodule import QueryDataModule
from grpo_lab.model.policy import PolicyConfig
from grpo_lab.module import GRPOModule
from grpo_lab.train.stepstats import StepStats, summarize


def test_summarize_leaves_out_warm_up_and_divides_totals():
    s = summarize([5.0, 1.0, 2.0, 3.0], [100, 10, 20, 30], skip=1)
    assert s == {"timed_steps": 3, "step_seconds_median": 2.0, "completion_tokens_per_s": 60 / 6}
    assert summarize([2.0], [8], skip=1)["completion_tokens_per_s"] == 4.0  # too few steps: all of them
    assert summarize([], [])["step_seconds_median"] is None
    with pytest.raises(ValueError, match="2 step times but 1 token counts"):
        summarize([1.0, 2.0], [3])


def test_callback_records_each_step_and_writes_json(tmp_path):
    L.seed_everything(0)
    module = GRPOModule(policy=PolicyConfig(hidden_size=32, num_layers=1, num_heads=2), num_generations=4,
                        max_new_tokens=5, min_new_tokens=5)
    stats = StepStats(out=str(tmp_path / "s.json"), skip=1)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[stats])
    trainer.fit(module, datamodule=QueryDataModule(prompts_per_step=2, num_train=32, num_val=2))
    out = json.loads((tmp_path / "s.json").read_text())
    assert out["steps"] == 3 and out["completion_tokens"] == [2 * 4 * 5.0] * 3  # P x G x exactly 5 tokens
    assert out["completion_tokens_per_s"] == pytest.approx(80 / sum(out["step_seconds"][1:]))
    assert all(len(v) == 3 and None not in v for v in out["metrics"].values())
    assert out["peak_memory_gib"] > 0 and out["device"] == "cpu" and out["parameters"] > 0
