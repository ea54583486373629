"""Supervised warm start: a short SFT run on the task's answers, cached under ``runs/warmstart/<key>/``.

From random weights a policy almost never samples a correct answer, every group has zero spread and GRPO
has nothing to learn from (measured: reward 0.00 over 200 steps). A minute of teacher-forced training on
``prompt -> answer<eos>`` gives a policy that gets some easy queries right and most hard ones wrong,
which is where the comparison of objectives is interesting. The result is a local HF directory keyed by
everything that determines it (policy config, task, steps, seed ...), so every later fit and every
ablation trial with the same settings loads the identical weights instead of training again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from grpo_lab.errors import UserError
from grpo_lab.policy import PolicyConfig, build_policy, save_policy
from grpo_lab.rewards import exact_match
from grpo_lab.rng import seeded
from grpo_lab.rollout import generate
from grpo_lab.tasks import Query, load_queries
from grpo_lab.tokenizer import chat_prompt

log = logging.getLogger(__name__)


@dataclass
class WarmStartConfig:
    """Supervised warm start on the task's ``answer`` column before RL (0 steps: start from the raw
    policy)."""

    steps: int = 0
    """SFT optimizer steps (0 disables the warm start)."""
    batch_size: int = 64
    """Queries per SFT step."""
    lr: float = 3e-3
    """AdamW learning rate for SFT."""
    seed: int = 1234
    """Seed of the initial weights and of the SFT data (independent of the RL seed, so every RL seed
    starts from the same policy)."""
    cache_dir: str = "runs/warmstart"
    """Where warm starts are cached, one directory per configuration."""
    chat_template: bool = False
    """Wrap the SFT prompts in the tokenizer's chat template, as ``data.chat_template`` does for the RL
    prompts (the two must agree; the DataModule checks)."""


def warm_start_key(policy: PolicyConfig, cfg: WarmStartConfig, dataset: str) -> str:
    """What determines the weights, hashed. ``chat_template`` enters only when true, so the keys (and the
    caches, and the checkpoints that name them) of runs without it stay what they were."""
    ws = {k: v for k, v in asdict(cfg).items() if k != "cache_dir" and not (k == "chat_template" and not v)}
    ident = {"policy": policy.key(), "warm_start": ws}
    ident["dataset"] = dataset
    if dataset.endswith(".jsonl") and Path(dataset).is_file():
        ident["dataset_sha"] = hashlib.sha256(Path(dataset).read_bytes()).hexdigest()
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def warm_start_dir(policy: PolicyConfig, cfg: WarmStartConfig, dataset: str) -> Path:
    return Path(cfg.cache_dir) / warm_start_key(policy, cfg, dataset)


def sft_batch(tok: PreTrainedTokenizerBase,
              queries: list[Query]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``prompt + answer + <eos>`` ids ``[N, L]``, attention mask, and labels (-100 on the
    prompt)."""
    rows, labels = [], []
    for q in queries:
        if "answer" not in q:
            raise UserError("the warm start needs an 'answer' column in the dataset (the SFT target)")
        p = tok(q["prompt"], add_special_tokens=False)["input_ids"]
        a = tok(str(q["answer"]), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append(p + a)
        labels.append([-100] * len(p) + a)
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tok.pad_token_id)
    lab = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, lb) in enumerate(zip(rows, labels, strict=True)):
        ids[i, : len(r)], lab[i, : len(lb)], mask[i, : len(r)] = torch.tensor(r), torch.tensor(lb), 1
    return ids, mask, lab


def sampled_accuracy(model: PreTrainedModel, tok: PreTrainedTokenizerBase, queries: list[Query],
                     max_new_tokens: int = 4) -> dict[str, float]:
    """Exact-match accuracy of one sampled completion (temperature 1) per query, overall and per
    difficulty."""
    model.eval()
    roll = generate(model, tok, [q["prompt"] for q in queries], 1, max_new_tokens, 1.0)
    hits: dict[str, list[float]] = {"all": []}
    scores = exact_match(roll.completions, [q.get("answer", "") for q in queries])
    for q, ok in zip(queries, scores, strict=True):
        hits["all"].append(ok)
        hits.setdefault(str(q.get("difficulty", "all")), []).append(ok)
    return {k: sum(v) / len(v) for k, v in hits.items()}


def train_sft(model: PreTrainedModel, tok: PreTrainedTokenizerBase, queries: list[Query],
              cfg: WarmStartConfig) -> None:
    """Teacher-forced cross-entropy on the answer tokens, ``cfg.steps`` AdamW steps."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    model.train()
    for step in range(cfg.steps):
        chunk = queries[step * cfg.batch_size : (step + 1) * cfg.batch_size]
        ids, mask, labels = sft_batch(tok, chunk)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == cfg.steps - 1:
            log.info("warm start step %d/%d: loss %.3f", step + 1, cfg.steps, loss.item())


def ensure_warm_start(policy: PolicyConfig, cfg: WarmStartConfig, dataset: str) -> Path:
    """The cached warm-start directory for these settings, training it first if absent."""
    path = warm_start_dir(policy, cfg, dataset)
    if (path / "config.json").is_file():
        return path
    t0 = time.perf_counter()
    with seeded(cfg.seed):
        model, tok = build_policy(policy, seed=cfg.seed)
        train_data = load_queries(dataset, cfg.steps * cfg.batch_size, cfg.seed + 1)
        if len(train_data) < cfg.steps * cfg.batch_size:  # a JSONL file: cycle through it
            reps = -(-cfg.steps * cfg.batch_size // len(train_data))
            train_data = (train_data * reps)[: cfg.steps * cfg.batch_size]
        held_out = load_queries(dataset, 400, cfg.seed + 2)[:400]
        if cfg.chat_template:  # the prompts the RL run sees with data.chat_template
            chat = {p: chat_prompt(tok, p) for p in {q["prompt"] for q in train_data + held_out}}
            train_data, held_out = ([{**q, "prompt": chat[q["prompt"]]} for q in qs]
                                    for qs in (train_data, held_out))
        train_sft(model, tok, train_data, cfg)
        acc = sampled_accuracy(model, tok, held_out)
    meta = {"key": path.name, "dataset": dataset, "policy": policy.key(), "warm_start": asdict(cfg),
            "sampled_accuracy": acc, "seconds": round(time.perf_counter() - t0, 1)}
    save_policy(model, tok, path)
    (path / "warmstart.json").write_text(json.dumps(meta, indent=2))
    log.info("warm start saved to %s (sampled accuracy %s)", path, acc)
    return path


def shared_warm_start(strategy, policy: PolicyConfig, cfg: WarmStartConfig, dataset: str) -> Path:
    """:func:`ensure_warm_start` under a Lightning strategy: rank 0 trains it if absent while the others wait
    at a barrier, then every rank has the path."""
    if strategy.is_global_zero:
        ensure_warm_start(policy, cfg, dataset)
    strategy.barrier("warm_start")
    return ensure_warm_start(policy, cfg, dataset)


def load_weights(model: PreTrainedModel, path: str | Path) -> None:
    """Copy the weights of the local HF directory ``path`` (a warm start) into ``model`` in place."""
    model.load_state_dict(type(model).from_pretrained(str(path), local_files_only=True).state_dict())
