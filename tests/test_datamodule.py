from types import SimpleNamespace

import pytest
import torch

from grpo_lab.data.datamodule import QueryDataModule


def test_seeded_splits_and_order():
    a, b = QueryDataModule(prompts_per_step=4, num_train=64, seed=1), QueryDataModule(prompts_per_step=4,
                                                                                      num_train=64, seed=1)
    a.setup("fit"), b.setup("fit")
    assert a.train_set == b.train_set and len(a.val_set) == 128
    first_a, first_b = next(iter(a.train_dataloader())), next(iter(b.train_dataloader()))
    assert [q["prompt"] for q in first_a] == [q["prompt"] for q in first_b]
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


def _epoch_batches(n, p, world, rank, skip=0):
    from grpo_lab.data.datamodule import EpochSampler

    s = EpochSampler(n, seed=3, epoch_fn=lambda: 0, skip_fn=lambda e: skip, batch=p, rank=rank, world=world)
    order = list(s)
    per = p // world
    return [order[i : i + per] for i in range(0, len(order) - per + 1, per)], len(s)


def test_processes_share_each_global_batch_as_one_process_sees_it():
    """W processes see together, step by step, exactly the queries of a 1-process run (also after a skip)."""
    for skip in (0, 8):
        one, _ = _epoch_batches(30, 4, 1, 0, skip)
        one = one[: (30 - skip) // 4]  # the DataLoader drops the last partial batch
        r0, n0 = _epoch_batches(30, 4, 2, 0, skip)
        r1, n1 = _epoch_batches(30, 4, 2, 1, skip)
        assert len(r0) == len(r1) == len(one)
        assert [a + b for a, b in zip(r0, r1, strict=True)] == one
        assert n0 == n1 == 7 * 2  # 7 whole global batches of 4, 2 queries each per process


def test_lightning_keeps_the_sampler_under_ddp(tmp_path):
    """Under a DDP strategy Lightning would wrap a plain sampler in a reshuffling DistributedSamplerWrapper:
    a 1-process DDP run must train on the queries of the same run without a strategy."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    seen = {}

    class Record(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.setdefault(self.name, []).append([q["prompt"] for q in batch])
            trainer.should_stop = batch_idx >= 1

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def training_step(self, batch, batch_idx):
            return (self.w**2).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    for strategy in ("auto", "ddp"):
        rec = Record()
        rec.name = strategy
        trainer = L.Trainer(accelerator="cpu", devices=1, strategy=strategy, max_steps=2, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            limit_val_batches=0, callbacks=[rec], default_root_dir=tmp_path)
        trainer.fit(Tiny(), datamodule=QueryDataModule(prompts_per_step=4, num_train=64, num_val=4, seed=1))
    assert seen["auto"] == seen["ddp"] and len(seen["auto"]) == 2


def _chat_trainer(tmp_path, template=True, ws_chat=False, ws_steps=0):
    from grpo_lab.model.tokenizer import build_bpe_tokenizer, load_tokenizer
    from grpo_lab.model.warmstart import WarmStartConfig

    text = ("{% for m in messages %}<|im_start|>{{ m['role'] }}:{{ m['content'] }}<|im_end|>{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant:{% endif %}")
    tok = build_bpe_tokenizer(["What is 1+2?", "#### 3"], 280, chat_template=text if template else None)
    tok.save_pretrained(tmp_path / "tok")
    module = SimpleNamespace(tokenizer=load_tokenizer(tmp_path / "tok"),
                             warm_start_cfg=WarmStartConfig(steps=ws_steps, chat_template=ws_chat))
    return SimpleNamespace(lightning_module=module, world_size=1, global_rank=0)


def _jsonl(tmp_path):
    p = tmp_path / "q.jsonl"
    p.write_text("".join(f'{{"question": "What is {i}+1?", "answer": "#### {i + 1}"}}\n' for i in range(20)))
    return str(p)


def test_chat_template_wraps_prompts_with_the_policy_tokenizer(tmp_path):
    dm = QueryDataModule(dataset=_jsonl(tmp_path), prompts_per_step=2, num_val=4, chat_template=True)
    dm.trainer = _chat_trainer(tmp_path)
    dm.setup("fit")
    for q in dm.train_set + dm.val_set:
        assert q["prompt"] == f"<|im_start|>user:{q['question']}<|im_end|><|im_start|>assistant:"
        assert q["_raw_prompt"] == q["question"]  # kept, hidden from rewards (leading underscore)
    plain = QueryDataModule(dataset=_jsonl(tmp_path), prompts_per_step=2, num_val=4)
    plain.setup("fit")
    assert [q["_raw_prompt"] for q in dm.train_set] == [q["prompt"] for q in plain.train_set]  # same split


def test_chat_template_errors(tmp_path):
    dm = QueryDataModule(dataset=_jsonl(tmp_path), prompts_per_step=2, chat_template=True)
    with pytest.raises(ValueError, match="needs the policy's tokenizer"):
        dm.setup("fit")
    dm = QueryDataModule(dataset=_jsonl(tmp_path), prompts_per_step=2, chat_template=True)
    dm.trainer = _chat_trainer(tmp_path, template=False)
    with pytest.raises(ValueError, match=f"tokenizer in {tmp_path / 'tok'} has no chat template"):
        dm.setup("fit")
    for data_chat, ws_chat in ((True, False), (False, True)):  # the warm start must see the same prompts
        dm = QueryDataModule(dataset=_jsonl(tmp_path), prompts_per_step=2, chat_template=data_chat)
        dm.trainer = _chat_trainer(tmp_path, ws_chat=ws_chat, ws_steps=5)
        with pytest.raises(ValueError, match="model.warm_start.chat_template is"):
            dm.setup("fit")
    dm = QueryDataModule(dataset=_jsonl(tmp_path), prompts_per_step=2, chat_template=True)
    dm.trainer = _chat_trainer(tmp_path, ws_chat=False, ws_steps=0)  # no warm start: nothing to agree with
    dm.setup("fit")
