"""One benchmark peer in its own process: ``python -m bench.peers SPEC.json RESULT.json``.

``bench/benchmark.py`` writes the spec (peer, shape, model directory, steps, ...), runs this once per peer and
shape, and reads the result back, so each peer's peak RSS is its own process's. Both peers train the
same saved policy (a local HF directory) on the same arithmetic prompts with the same reward function,
P queries x G completions of exactly T tokens (EOS suppressed), beta = 0, one AdamW update per rollout batch.
Both record each rollout's completion lengths (the fixed-length check) and padded prompt length (the FLOPs)
through public hooks: the reward function (a registered reward on grpo_lab's side) and, for grpo_lab's
prompts, a Lightning callback that sees the batch.

What one timed "step" covers, for both peers: rollout (generation with a KV cache) + reward + advantage +
loss (forward and backward) + gradient clipping + optimizer step, and each trainer's own per-step
bookkeeping (grpo_lab logs its metrics inside training_step; TRL logs after on_step_end, so TRL's logging,
off here anyway, is not in its time).
- grpo_lab: a Lightning ``Trainer.fit``; a callback takes ``time.perf_counter()`` at ``on_train_batch_start``
  and ``on_train_batch_end`` (automatic optimization: the closure with training_step, backward and
  optimizer step runs in between).
- TRL: ``GRPOTrainer.train``; a ``TrainerCallback`` takes the time at ``on_step_begin`` and ``on_step_end``
  (generation happens in ``_prepare_inputs`` inside ``training_step``; clipping and ``optimizer.step`` before
  ``on_step_end``).
"""

from __future__ import annotations

import json
import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from bench.machine import cpu_snapshot, other_load
from bench.work import grpo_module, grpo_trainer, query_data
from grpo_lab.system.process_env import configure_process

RECORDING_REWARD = "bench_exact_match"  # grpo_lab's reward in the benchmark: exact_match, recording lengths


def _sync() -> None:
    """Wait for queued CUDA work, so a step's GPU time is inside the step it belongs to."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class _Clock:
    """Step times and the other processes' load during each step."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.cpu: list[float] = []
        self.other_load: list[float] = []
        self._snap = None
        self._t0 = 0.0

    def start(self) -> None:
        _sync()
        self._snap = cpu_snapshot()
        self._t0 = time.perf_counter()

    def stop(self) -> None:
        _sync()
        dt = time.perf_counter() - self._t0
        snap = cpu_snapshot()
        self.times.append(dt)
        self.cpu.append(snap[1] - self._snap[1])
        self.other_load.append(other_load(self._snap, snap))


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _queries(spec: dict) -> list[dict]:
    from grpo_lab.data.tasks import load_queries

    return load_queries(spec["dataset"], spec["num_train"], spec["seed"])


def run_grpo_lab(spec: dict) -> dict:
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from grpo_lab.rewards.scoring import exact_match, register_reward

    lengths: list[list[int]] = []
    prompt_lens: list[int] = []

    @register_reward(RECORDING_REWARD)
    def recording_exact_match(completions, answer, completion_length, **_):
        """grpo_lab's exact_match, recording each rollout's completion lengths (the fixed-length check)."""
        lengths.append(list(completion_length))
        return exact_match(completions, answer)

    L.seed_everything(spec["seed"], verbose=False)
    module = grpo_module(spec, spec["model_dir"], rewards=[RECORDING_REWARD])
    clock = _Clock()

    class StepTimer(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            enc = pl_module.tokenizer([q["prompt"] for q in batch], add_special_tokens=False, padding=True)
            prompt_lens.append(len(enc["input_ids"][0]))  # the rollout's padded prompt length (untimed)
            clock.start()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            clock.stop()

    trainer = grpo_trainer(spec["warmup"] + spec["steps"], [StepTimer()], spec["bf16"],
                           spec.get("device", "cpu"))
    trainer.fit(module, datamodule=query_data(spec, spec["num_train"], spec["seed"]))
    n_params = sum(p.numel() for p in module.model.parameters())
    opt = trainer.optimizers[0]
    flags = {k: opt.defaults.get(k) for k in ("lr", "foreach", "fused")}
    flags["weight_decay"] = sorted({g["weight_decay"] for g in opt.param_groups})
    return {
        "step_seconds": clock.times, "other_load_cores": clock.other_load,
        "cpu_seconds": clock.cpu, "completion_lengths": lengths,
        "prompt_padded_lengths": prompt_lens, "n_params": n_params,
        "model_dtype": str(next(module.model.parameters()).dtype),
        "attn_implementation": module.model.config._attn_implementation,
        "precision": "bf16-mixed" if spec["bf16"] else "32-true",
        "optimizer": f"{type(opt).__module__}.{type(opt).__name__}({flags})",
        "decode": {**vars(module.decoder.settings), "compiled": module.decoder.compiled is not None},
    }


def run_trl(spec: dict) -> dict:
    import datasets
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from grpo_lab.model.tokenizer import load_tokenizer
    from grpo_lab.rewards.scoring import exact_match

    datasets.disable_progress_bars()
    lengths: list[list[int]] = []
    prompt_lens: list[int] = []
    tok = load_tokenizer(spec["model_dir"])

    def exact_match_reward(completions, answer, completion_ids=None, prompts=None, **kwargs):
        """grpo_lab's exact_match, recording completion lengths (verifies fixed-length work)."""
        if completion_ids is not None:
            lengths.append([len(c) for c in completion_ids])
        if prompts is not None:
            prompt_lens.append(max(len(tok(p, add_special_tokens=True)["input_ids"]) for p in prompts))
        return exact_match(completions, answer)

    clock = _Clock()

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            clock.start()

        def on_step_end(self, args, state, control, **kwargs):
            clock.stop()

    total = spec["warmup"] + spec["steps"]
    batch = spec["prompts"] * spec["num_generations"]
    with tempfile.TemporaryDirectory(prefix="bench_trl_") as out_dir:
        args = GRPOConfig(
            output_dir=out_dir,
            seed=spec["seed"],
            use_cpu=spec.get("device", "cpu") == "cpu",
            bf16=bool(spec["bf16"]),  # TRL's default is bf16=True; fp32 unless benchmark.py asks (cuda only)
            fp16=False,
            gradient_checkpointing=False,  # TRL's default is True; grpo_lab does not checkpoint
            per_device_train_batch_size=batch,  # P*G completions per optimizer step
            gradient_accumulation_steps=1,
            steps_per_generation=1,  # one generation of P*G completions -> one optimizer step
            num_generations=spec["num_generations"],
            num_iterations=1,
            max_completion_length=spec["completion_tokens"],
            generation_kwargs={"min_new_tokens": spec["completion_tokens"]},  # EOS suppressed: fixed length
            temperature=spec["temperature"],
            top_p=1.0,
            top_k=0,
            beta=0.0,  # no reference model is built
            learning_rate=spec["lr"],
            weight_decay=0.0,
            lr_scheduler_type="constant",
            warmup_steps=0,
            optim="adamw_torch",
            max_grad_norm=spec["max_grad_norm"],
            max_steps=total,
            report_to=[],
            logging_strategy="no",
            save_strategy="no",
            eval_strategy="no",
            disable_tqdm=True,
            log_completions=False,
            dataloader_num_workers=0,
            use_vllm=False,
        )
        ds = datasets.Dataset.from_list(_queries(spec))
        trainer = GRPOTrainer(
            model=spec["model_dir"], reward_funcs=[exact_match_reward], args=args, train_dataset=ds,
            processing_class=tok, callbacks=[StepTimer()],
        )
        model = trainer.model
        info = {
            "n_params": sum(p.numel() for p in model.parameters()),
            "model_dtype": str(next(model.parameters()).dtype),
            "attn_implementation": model.config._attn_implementation,
            "loss_type": args.loss_type,
            "scale_rewards": args.scale_rewards,
            "ref_model": trainer.ref_model is not None,
            "gradient_checkpointing": args.gradient_checkpointing,
        }
        trainer.train()
        opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
        flags = {k: opt.defaults.get(k) for k in ("lr", "foreach", "fused")}
        flags["weight_decay"] = sorted({g["weight_decay"] for g in opt.param_groups})
        name = f"{type(opt).__module__}.{type(opt).__name__}"
        info["optimizer"] = f"{name}({flags}) via optim={str(args.optim)!r}"
    return {"step_seconds": clock.times, "other_load_cores": clock.other_load, "cpu_seconds": clock.cpu,
            "completion_lengths": lengths, "prompt_padded_lengths": prompt_lens,
            "precision": "bf16 (autocast)" if spec["bf16"] else "fp32", **info}


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise SystemExit("usage: python -m bench.peers SPEC.json RESULT.json (bench/benchmark.py calls this)")
    configure_process()
    warnings.filterwarnings("ignore")
    spec = json.loads(Path(argv[0]).read_text())
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    t0 = time.perf_counter()
    result = {"grpo_lab": run_grpo_lab, "trl": run_trl}[spec["peer"]](spec)
    result.update(
        peer=spec["peer"], shape=spec["shape"], threads=torch.get_num_threads(),
        wall_seconds=time.perf_counter() - t0, peak_rss_mb=_peak_rss_mb(),
    )
    Path(argv[1]).write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
