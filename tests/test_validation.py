"""SampledAccuracy.validation_step with a stub rollout and reward: the accuracies per mode and per difficulty
by hand, the text samples, and validation's own seed (the training RNG never moves)."""

from __future__ import annotations

import types

import pytest
import torch

from grpo_lab.train.validation import SampledAccuracy

# completion per (mode, prompt): a hit when it is the query's answer
COMPLETIONS = {
    "greedy": {"1+1=": "2", "1+2=": "3", "2+3=": "4", "3+4=": "7", "0+1=": "1"},
    "sampled": {"1+1=": "2", "1+2=": "x", "2+3=": "5", "3+4=": "x", "0+1=": "0"},
}
FIRST = [{"prompt": "1+1=", "answer": "2", "difficulty": "easy"},
         {"prompt": "1+2=", "answer": "3", "difficulty": "easy"},
         {"prompt": "2+3=", "answer": "5", "difficulty": "hard"},
         {"prompt": "3+4=", "answer": "7"}]  # no difficulty: counted under "all"
SECOND = [{"prompt": "0+1=", "answer": "1", "difficulty": "hard"}]


class Host(SampledAccuracy):
    """What SampledAccuracy uses of a GRPOModule; records rollouts, rewards, logs and texts."""

    def __init__(self, global_step: int = 3, num_text_samples: int = 2) -> None:
        self.global_step, self.device = global_step, torch.device("cpu")
        self.val_metrics = torch.nn.ModuleDict()
        self.hparams = types.SimpleNamespace(num_text_samples=num_text_samples)
        self.texts, self.logged, self.calls, self.draws = [], {}, [], []
        self.logger = types.SimpleNamespace(experiment=types.SimpleNamespace(
            add_text=lambda tag, text, step: self.texts.append((tag, text, step))))

    def rollout(self, batch, num_generations=None, greedy=False):
        self.calls.append(("rollout", num_generations, greedy))
        self.draws.append(torch.rand(()))  # a sampler's draw: from validation's own seed
        mode = "greedy" if greedy else "sampled"
        return types.SimpleNamespace(completions=[COMPLETIONS[mode][q["prompt"]] for q in batch])

    def reward(self, rollout, batch, aggregation=None):
        self.calls.append(("reward", aggregation))
        hits = [float(c == q["answer"]) for c, q in zip(rollout.completions, batch, strict=True)]
        return torch.tensor(hits)[:, None]  # [P, G = 1]

    def log(self, name, value, **kw):
        self.logged[name] = (value, kw)


def accuracies(host: Host) -> dict[str, float]:
    return {key: float(metric.compute()) for key, metric in host.val_metrics.items()}


def test_accuracy_per_mode_and_difficulty_by_hand():
    host = Host()
    host.validation_step(FIRST, 0)
    # greedy hits 1, 1, 0, 1; sampled hits 1, 0, 1, 0
    assert accuracies(host) == pytest.approx({
        "greedy": 3 / 4, "greedy_easy": 2 / 2, "greedy_hard": 0 / 1, "greedy_all": 1 / 1,
        "sampled": 2 / 4, "sampled_easy": 1 / 2, "sampled_hard": 1 / 1, "sampled_all": 0 / 1,
    })
    assert host.calls == [("rollout", 1, True), ("reward", "weighted_sum"),
                          ("rollout", 1, False), ("reward", "weighted_sum")]
    host.validation_step(SECOND, 1)  # greedy hits, sampled misses: the means run over both batches
    assert accuracies(host) == pytest.approx({
        "greedy": 4 / 5, "greedy_easy": 2 / 2, "greedy_hard": 1 / 2, "greedy_all": 1 / 1,
        "sampled": 2 / 5, "sampled_easy": 1 / 2, "sampled_hard": 1 / 2, "sampled_all": 0 / 1,
    })
    assert set(host.logged) == {f"val/acc_{key}" for key in host.val_metrics}
    assert [name for name, (_, kw) in host.logged.items() if kw["prog_bar"]] == ["val/acc_greedy"]
    assert host.logged["val/acc_greedy"][1]["batch_size"] == 1  # the last batch's size


def test_the_first_batchs_greedy_completions_are_logged_as_text():
    host = Host(global_step=3, num_text_samples=2)
    host.validation_step(FIRST, 0)
    host.validation_step(SECOND, 1)  # not the first batch: no text
    assert host.texts == [("samples/greedy", "`1+1=` → `2` (reward 1.00)  \n`1+2=` → `3` (reward 1.00)", 3)]
    quiet = Host(num_text_samples=0)
    quiet.validation_step(FIRST, 0)
    assert quiet.texts == []


def test_validation_samples_with_its_own_seed_and_leaves_the_training_rng():
    """Seed global_step·7919 + batch_idx: the same draws at every validation of that step and batch."""
    torch.manual_seed(123)
    state = torch.get_rng_state()
    host = Host(global_step=3)
    host.validation_step(FIRST, 1)
    assert torch.equal(torch.get_rng_state(), state)
    gen = torch.Generator().manual_seed(3 * 7919 + 1)
    expected = [torch.rand((), generator=gen) for _ in range(2)]  # the greedy rollout's, then the sampled's
    assert host.draws == expected
    other = Host(global_step=4)
    other.validation_step(FIRST, 1)
    assert other.draws != expected
