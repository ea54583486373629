"""QueryDataModule: serves batches of P queries (plain dicts) for rollouts; seeded train/val splits.

The training order is a function of (seed, epoch) only, and the module remembers how many batches of the
current epoch were used: a checkpoint stores that position (``state_dict``) and a resumed run continues
with the next unseen batch, so an interrupted run sees exactly the queries an uninterrupted one would.

With ``chat_template`` each prompt becomes one user message in the policy tokenizer's own chat template. The
DataModule does not own the tokenizer: ``setup`` takes it from the Trainer's LightningModule (``.tokenizer``),
which Lightning builds before any ``setup`` runs, so prompts are templated once, on every process alike.
"""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler

from grpo_lab.data.tasks import TASKS, Query, load_queries
from grpo_lab.model.tokenizer import PreTrainedTokenizerBase, chat_prompt
from grpo_lab.system.errors import UserError


def _as_list(batch: list[Query]) -> list[Query]:
    return batch


def chat_queries(queries: list[Query], tokenizer: PreTrainedTokenizerBase) -> list[Query]:
    """The queries with each ``prompt`` wrapped by ``tokenizer``'s chat template as one user message (the
    other columns unchanged, the raw prompt kept as ``_raw_prompt``, hidden from reward functions)."""
    return [{**q, "prompt": chat_prompt(tokenizer, q["prompt"]), "_raw_prompt": q["prompt"]} for q in queries]


class EpochSampler(DistributedSampler):
    """A seeded permutation per epoch, ``randperm(n, seed, epoch)``, that can start ``skip`` items in, shared
    out by global batch: of each ``batch`` consecutive queries process ``rank`` of ``world`` takes the
    ``rank``-th ``batch / world``, so W processes see together, step by step, the queries one process would.

    A ``DistributedSampler`` only so that Lightning keeps it under DDP: a plain sampler would be wrapped in a
    ``DistributedSamplerWrapper``, which reshuffles the order with its own seed (a 1-process DDP run then
    trained on other queries than the same run without a strategy, and resuming skipped the wrong ones).
    """

    def __init__(self, n: int, seed: int, epoch_fn, skip_fn, batch: int = 1, rank: int = 0,
                 world: int = 1) -> None:
        if batch % world:
            raise ValueError(f"batch={batch} is not divisible across {world} processes")
        super().__init__(range(n), num_replicas=world, rank=rank, shuffle=False, seed=seed)
        self.n, self.seed, self.epoch_fn, self.skip_fn, self.batch = n, seed, epoch_fn, skip_fn, batch

    def __len__(self) -> int:
        return self.n if self.num_replicas == 1 else self.n // self.batch * (self.batch // self.num_replicas)

    def __iter__(self):
        epoch = self.epoch_fn()
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.n, generator=gen).tolist()[self.skip_fn(epoch) :]
        if self.num_replicas == 1:
            return iter(order)
        per = self.batch // self.num_replicas  # this process's share of each global batch
        lo = self.rank * per
        return iter([i for k in range(0, len(order) - self.batch + 1, self.batch)
                     for i in order[k + lo : k + lo + per]])


class QueryDataModule(L.LightningDataModule):
    def __init__(
        self,
        dataset: str = "arithmetic",
        prompts_per_step: int = 8,
        num_train: int = 4096,
        num_val: int = 128,
        val_batch_size: int = 64,
        seed: int = 0,
        chat_template: bool = False,
    ) -> None:
        """Queries for GRPO.

        Args:
            dataset: a built-in task name (``arithmetic``: easy one-digit and hard two-digit additions;
                ``arithmetic_easy``) or a path to a ``.jsonl`` file with a ``prompt`` field per line.
            prompts_per_step: P, the queries per rollout batch over all processes (each gets G completions);
                with N devices each process takes P/N of them, so P must be divisible by N.
            num_train: queries generated for a built-in task's training split (ignored for JSONL).
            num_val: validation queries (a built-in task draws them with another seed; a JSONL file gives
                up this many of its lines, chosen with ``seed``).
            val_batch_size: queries per validation batch.
            seed: seed of the data (built-in generation, JSONL split, and the shuffling order).
            chat_template: wrap each prompt as a user message with the policy tokenizer's own chat template
                (``apply_chat_template(..., add_generation_prompt=True)``); an error if it has none. Set
                ``model.warm_start.chat_template`` the same, so the warm start trains on the same prompts.
        """
        super().__init__()
        if prompts_per_step < 1:
            raise UserError(f"prompts_per_step must be >= 1, got {prompts_per_step}")
        self.save_hyperparameters()
        self.train_set: list[Query] = []
        self.val_set: list[Query] = []
        self.position = {"epoch": 0, "batches": 0}  # batches of that epoch used by training steps
        self._resume_from: dict | None = None

    def setup(self, stage: str | None = None) -> None:
        h = self.hparams
        if self.train_set:
            return
        if h.dataset in TASKS:
            self.train_set = load_queries(h.dataset, h.num_train, h.seed)
            self.val_set = load_queries(h.dataset, h.num_val, h.seed + 7919)
        else:
            rows = load_queries(h.dataset, 0, h.seed)
            order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(h.seed)).tolist()
            n_val = min(h.num_val, len(rows) // 5)
            self.val_set = [rows[i] for i in order[:n_val]]
            self.train_set = [rows[i] for i in order[n_val:]]
        if len(self.train_set) < h.prompts_per_step:
            raise UserError(
                f"dataset {h.dataset!r} has {len(self.train_set)} training queries, fewer than "
                f"prompts_per_step={h.prompts_per_step}"
            )
        module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        ws = getattr(module, "warm_start_cfg", None)
        if ws is not None and ws.steps > 0 and bool(getattr(ws, "chat_template", False)) != h.chat_template:
            raise UserError(
                f"data.chat_template is {str(h.chat_template).lower()} but model.warm_start.chat_template is "
                f"{str(not h.chat_template).lower()}: the warm start would train on prompts the RL run never "
                "sees; set both the same"
            )
        if h.chat_template:
            tok = getattr(module, "tokenizer", None)
            if tok is None:
                raise UserError("data.chat_template needs the policy's tokenizer: attach the DataModule to a "
                                 "Trainer fitting a GRPOModule")
            self.train_set, self.val_set = chat_queries(self.train_set, tok), chat_queries(self.val_set, tok)

    def per_process_prompts(self) -> int:
        world = self.trainer.world_size if self.trainer is not None else 1
        p = self.hparams.prompts_per_step
        if p % world:
            raise UserError(
                f"prompts_per_step={p} is not divisible across {world} processes; use a multiple of {world}"
            )
        return p // world

    def train_dataloader(self) -> DataLoader:
        # Seeded shuffling: the same seed gives the same query order in every trial.
        per = self.per_process_prompts()
        rank = self.trainer.global_rank if self.trainer is not None else 0
        world = self.trainer.world_size if self.trainer is not None else 1
        sampler = EpochSampler(len(self.train_set), self.hparams.seed, self._epoch, self._skip,
                               batch=self.hparams.prompts_per_step, rank=rank, world=world)
        return DataLoader(
            self.train_set,
            batch_size=per,
            sampler=sampler,
            collate_fn=_as_list,
            drop_last=True,
            generator=torch.Generator().manual_seed(self.hparams.seed),  # never draw from the global RNG
        )

    def _epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else 0

    def _skip(self, epoch: int) -> int:
        """Queries to skip at the start of ``epoch``: the used batches, when resuming into that epoch."""
        resume, self._resume_from = self._resume_from, None
        if resume and resume["epoch"] == epoch:
            self.position = dict(resume)
            return resume["batches"] * self.hparams.prompts_per_step
        self.position = {"epoch": epoch, "batches": 0}
        return 0

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        if self.trainer is not None and self.trainer.training:
            self.position["batches"] += 1
        return batch

    def state_dict(self) -> dict:
        return dict(self.position)

    def load_state_dict(self, state_dict: dict) -> None:
        self._resume_from = {"epoch": int(state_dict["epoch"]), "batches": int(state_dict["batches"])}

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams.val_batch_size, collate_fn=_as_list)
