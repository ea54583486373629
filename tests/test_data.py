from types import SimpleNamespace

import pytest

from grpo_lab.data import QueryDataModule


def test_seeded_splits_and_order():
    a, b = QueryDataModule(prompts_per_step=4, num_train=64, seed=1), QueryDataModule(prompts_per_step=4, num_train=64, seed=1)
    a.setup("fit"), b.setup("fit")
    assert a.train_set == b.train_set and len(a.val_set) == 128
    assert [q["prompt"] for q in next(iter(a.train_dataloader()))] == [q["prompt"] for q in next(iter(b.train_dataloader()))]
    assert len(next(iter(a.train_dataloader()))) == 4


def test_jsonl_split_holds_out_validation(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("".join(f'{{"prompt": "q{i}", "answer": "{i}"}}\n' for i in range(50)))
    dm = QueryDataModule(dataset=str(p), prompts_per_step=2, num_val=5, seed=0)
    dm.setup("fit")
    assert len(dm.val_set) == 5 and len(dm.train_set) == 45
    assert not {q["prompt"] for q in dm.val_set} & {q["prompt"] for q in dm.train_set}


def test_prompts_per_step_must_divide_across_processes():
    dm = QueryDataModule(prompts_per_step=3, num_train=16)
    dm.setup("fit")
    dm.trainer = SimpleNamespace(world_size=2)
    with pytest.raises(ValueError, match="prompts_per_step=3 is not divisible across 2 processes"):
        dm.train_dataloader()


def test_too_few_queries_and_bad_p():
    with pytest.raises(ValueError, match="prompts_per_step must be >= 1"):
        QueryDataModule(prompts_per_step=0)
    dm = QueryDataModule(prompts_per_step=64, num_train=8)
    with pytest.raises(ValueError, match="fewer than prompts_per_step=64"):
        dm.setup("fit")
