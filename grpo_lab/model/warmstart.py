"""Supervised warm start: a short SFT run on the task's answers, cached under ``runs/warmstart/<key>/``.

From random weights a policy almost never samples a correct answer, every group has zero spread and GRPO
has nothing to learn from (measured: reward 0.00 over 200 steps). A minute of teacher-forced training on
``prompt -> answer<eos>`` gives a policy that gets some easy queries right and most hard ones wrong,
which is where comparing the variants is interesting. The result is a local HF directory keyed by
everything that determines it (policy config, task, steps, seed ...), so every later fit and every
ablation trial with the same settings loads the identical weights instead of training again.

The cache is crash-consistent and safe for concurrent builders (several trial processes of one study may
ask for the same key at once):

- a builder holds an exclusive ``fcntl`` lock on ``<cache_dir>/<key>.lock`` (released by the kernel when
  its process dies, so a lock file left by a killed process blocks nobody), builds into
  ``<cache_dir>/.<key>.tmp<pid>`` and renames that directory into place when it is complete: a kill
  mid-save leaves only a temporary directory, which the next builder removes;
- the last file written is ``complete.json``, the size and SHA-256 of every other file; an entry is used
  only when all of them match (:func:`check_entry`), so a truncated or corrupt ``model.safetensors`` (a full
  disk, an interrupted copy) or a directory of an older grpo_lab without the marker is never loaded;
- a bad entry is moved aside to ``<key>.broken`` with one warning line and built again, once; if that
  fails too (a full disk), the error is one ``error:`` line naming the path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from grpo_lab.data.tasks import Query, load_queries
from grpo_lab.model.policy import PolicyConfig, build_policy, save_policy
from grpo_lab.model.tokenizer import chat_prompt
from grpo_lab.rewards.scoring import exact_match
from grpo_lab.rollout import generate
from grpo_lab.system.errors import UserError, UserRuntimeError
from grpo_lab.system.locks import exclusive_lock
from grpo_lab.system.rng import seeded

log = logging.getLogger(__name__)

MARKER = "complete.json"  # written last: every other file's size and SHA-256


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


def file_digest(path: Path) -> dict[str, int | str]:
    """``{"bytes": size, "sha256": hex}`` of one file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": h.hexdigest()}


def write_marker(entry: Path) -> None:
    """Write ``complete.json`` into ``entry``, the digest of every other file in it: the last file written."""
    files = {p.name: file_digest(p) for p in sorted(entry.iterdir()) if p.is_file() and p.name != MARKER}
    tmp = entry / f"{MARKER}.tmp"
    tmp.write_text(json.dumps({"files": files}, indent=2))
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    tmp.replace(entry / MARKER)


def check_entry(entry: Path) -> str | None:
    """Why the cache entry ``entry`` cannot be used (missing, no marker, a file missing, truncated or
    changed), or None when every file matches its ``complete.json`` digest."""
    if not entry.is_dir():
        return "missing"
    try:
        files = json.loads((entry / MARKER).read_text())["files"]
    except FileNotFoundError:
        return f"no {MARKER}: a build that did not finish, or one of an older grpo_lab"
    except (ValueError, KeyError, TypeError):
        return f"{MARKER} is unreadable"
    if "config.json" not in files or "warmstart.json" not in files:
        return f"{MARKER} lists no config.json or warmstart.json"
    for name, want in files.items():
        p = entry / name
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != want.get("bytes"):
            return f"{name} has {p.stat().st_size} bytes, {want.get('bytes')} were written"
        if file_digest(p)["sha256"] != want.get("sha256"):
            return f"{name} differs from what was written (SHA-256)"
    return None


def move_aside(entry: Path, reason: str) -> Path:
    """Move the bad entry to ``<key>.broken`` (replacing an older one), with one warning line."""
    aside = entry.with_name(entry.name + ".broken")
    shutil.rmtree(aside, ignore_errors=True)
    os.rename(entry, aside)
    log.warning("warning: warm start %s is incomplete or corrupt (%s): moved to %s, building it again",
                entry, reason, aside)
    return aside


def remove_leftovers(entry: Path) -> None:
    """Remove temporary build directories of ``entry`` (only called under its lock: their builders died)."""
    for tmp in entry.parent.glob(f".{entry.name}.tmp*"):
        shutil.rmtree(tmp, ignore_errors=True)


def train_warm_start(policy: PolicyConfig, cfg: WarmStartConfig, dataset: str):
    """Build the policy and run the SFT: ``(model, tokenizer, sampled accuracy)``."""
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
    return model, tok, acc


def build_entry(policy: PolicyConfig, cfg: WarmStartConfig, dataset: str, path: Path) -> None:
    """Train the warm start and put it at ``path`` complete or not at all: saved into a temporary directory
    beside it, ``warmstart.json`` and then ``complete.json`` written, and the directory renamed."""
    t0 = time.perf_counter()
    model, tok, acc = train_warm_start(policy, cfg, dataset)
    meta = {"key": path.name, "dataset": dataset, "policy": policy.key(), "warm_start": asdict(cfg),
            "sampled_accuracy": acc, "seconds": round(time.perf_counter() - t0, 1)}
    work = path.with_name(f".{path.name}.tmp{os.getpid()}")
    staged = work / path.name  # save_policy's own temporary directory lands in ``work`` too
    try:
        save_policy(model, tok, staged)
        (staged / "warmstart.json").write_text(json.dumps(meta, indent=2))
        write_marker(staged)
        try:
            os.rename(staged, path)
        except OSError:  # without fcntl, another builder may have renamed its copy first: use that one
            if check_entry(path) is not None:
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)  # a failed save, or a rename that lost the race
    log.info("warm start saved to %s (sampled accuracy %s)", path, acc)


def ensure_warm_start(policy: PolicyConfig, cfg: WarmStartConfig, dataset: str) -> Path:
    """The cached warm-start directory for these settings, checked against its ``complete.json``; built
    first if absent, built again (once) if it is incomplete or corrupt. See the module docstring."""
    path = warm_start_dir(policy, cfg, dataset)
    if check_entry(path) is None:
        return path
    with exclusive_lock(path.with_name(f"{path.name}.lock")):
        reason = check_entry(path)  # another process may have built it while we waited
        if reason is None:
            return path
        remove_leftovers(path)
        if path.exists():
            move_aside(path, reason)
        try:
            build_entry(policy, cfg, dataset, path)
        except (OSError, SafetensorError) as err:  # a full disk, a read-only cache directory
            why = getattr(err, "strerror", None) or err
            raise UserRuntimeError(f"could not write the warm start {path}: {why} (free space, or set "
                                   "model.warm_start.cache_dir)") from err
        reason = check_entry(path)
        if reason is not None:
            raise UserRuntimeError(f"the warm start {path} was built again and is still unusable ({reason}): "
                                   "check the disk, then remove it and rerun")
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
