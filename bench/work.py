"""The work of one benchmark shape: its spec (from its config), FLOPs, policy, and grpo_lab's module for it.

Both peers (``bench/peers.py``) and the profiler (``bench/profile_step.py``) build their work from here, so
the three time the same thing: the shape's config gives the sizes, one random policy saved as a local HF
directory is what both peers load, and grpo_lab's side is a ``GRPOModule`` with no warm start, fixed-length
completions (EOS suppressed), beta = 0 and AdamW without weight decay.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {"bench": ROOT / "configs" / "bench.yaml", "tiny": ROOT / "configs" / "bench_tiny.yaml",
          "gpu": ROOT / "configs" / "bench_gpu.yaml"}  # gpu: the bench shape scaled up, for --device cuda
FLOP_FORMULA = (
    "N = L*(4*h^2 + 3*h*I) + h*V (weights used in matmuls: q,k,v,o, gate/up/down, LM head; embedding lookup "
    "excluded); per sequence with padded prompt length Tp and T completion tokens, S = Tp + T: "
    "generation (KV cache: prefill of Tp tokens, then T-1 one-token forwards) = 2*N*(Tp + T - 1) "
    "+ attention 4*L*h*(Tp^2 + sum_{j=1..T-1}(Tp + j)); training forward+backward = 6*N*S "
    "+ attention 3*4*L*h*S^2 (dense, as SDPA computes it); times B = P*G sequences. "
    "fraction of FLOP limit = (FLOPs per step / fp32 peak FLOP/s) / measured seconds per step."
)


DECODE_KEYS = ("kv_cache", "compile_decode", "compile_backend", "stop_check_every", "share_prompts", "tf32")


def shape_spec(name: str) -> dict:
    """The work of one shape, read from its config (the one source for both peers)."""
    import yaml

    cfg = yaml.safe_load(SHAPES[name].read_text())
    model, data = cfg["model"], cfg.get("data", {})
    pol = model["policy"]
    opt = model.get("optimizer", {}).get("init_args", {})
    spec = {
        "shape": name,
        "config": str(SHAPES[name].relative_to(ROOT)),
        "hidden_size": pol["hidden_size"],
        "num_layers": pol["num_layers"],
        "num_heads": pol["num_heads"],
        "intermediate_size": pol.get("intermediate_size") or 4 * pol["hidden_size"],
        "max_positions": pol.get("max_positions", 128),
        "attn_implementation": pol.get("attn_implementation", "sdpa"),  # grpo_lab's; TRL keeps its default
        "num_generations": model["num_generations"],
        "completion_tokens": model["max_new_tokens"],
        "temperature": model.get("temperature", 1.0),
        "beta": model.get("beta", 0.0),
        "num_iterations": model.get("num_iterations", 1),
        "max_grad_norm": model.get("max_grad_norm", 1.0),
        "lr": opt.get("lr", 5e-4),
        "dataset": data.get("dataset", "arithmetic"),
        "prompts": data.get("prompts_per_step", 8),
        "decode": {k: model[k] for k in DECODE_KEYS if k in model},  # grpo_lab's; unset: the device's
    }
    if model.get("min_new_tokens") != model["max_new_tokens"]:
        raise ValueError(f"{spec['config']}: min_new_tokens must equal max_new_tokens (fixed-length work)")
    if spec["beta"] != 0.0 or spec["num_iterations"] != 1:
        raise ValueError(f"{spec['config']}: the benchmark compares beta=0, num_iterations=1")
    return spec


def estimate_flops(spec: dict, prompt_len: float, vocab: int) -> dict:
    """FLOPs of one step (see FLOP_FORMULA)."""
    h, L, inter = spec["hidden_size"], spec["num_layers"], spec["intermediate_size"]
    T, B = spec["completion_tokens"], spec["prompts"] * spec["num_generations"]
    tp = prompt_len
    n = L * (4 * h * h + 3 * h * inter) + h * vocab
    s = tp + T
    gen = 2 * n * (tp + T - 1) + 4 * L * h * (tp * tp + sum(tp + j for j in range(1, T)))
    train = 6 * n * s + 12 * L * h * s * s
    return {
        "n_matmul_params": n,
        "generation_flops": B * gen,
        "training_flops": B * train,
        "total_flops": B * (gen + train),
        "prompt_padded_length": tp,
    }


def save_policy_for(spec: dict, seed: int, out: Path) -> int:
    """Build the shape's random policy (``seed``) and save it as the HF directory ``out``; its vocab size."""
    from grpo_lab.model.policy import PolicyConfig, build_policy, save_policy

    cfg = PolicyConfig(hidden_size=spec["hidden_size"], num_layers=spec["num_layers"],
                       num_heads=spec["num_heads"], intermediate_size=spec["intermediate_size"],
                       max_positions=spec["max_positions"])
    model, tok = build_policy(cfg, seed=seed)
    save_policy(model, tok, out)
    return model.config.vocab_size


def grpo_module(spec: dict, model_dir: str | Path, attn: str | None = None, **settings):
    """grpo_lab's side of the work: a ``GRPOModule`` on the saved policy (``attn``: instead of the shape's
    attention kernel; ``settings``: further RL settings, e.g. ``rewards``)."""
    import torch

    from grpo_lab.model.policy import PolicyConfig
    from grpo_lab.model.warmstart import WarmStartConfig
    from grpo_lab.module import GRPOModule

    lr = spec["lr"]
    return GRPOModule(
        policy=PolicyConfig(pretrained=str(model_dir),
                            attn_implementation=attn or spec["attn_implementation"]),
        warm_start=WarmStartConfig(steps=0),
        num_generations=spec["num_generations"],
        max_new_tokens=spec["completion_tokens"],
        min_new_tokens=spec["completion_tokens"],
        temperature=spec["temperature"],
        beta=0.0,
        num_iterations=1,
        max_grad_norm=spec["max_grad_norm"],
        optimizer=lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=0.0),
        **{**spec.get("decode", {}), **settings},
    )


def grpo_trainer(steps: int, callbacks: list, bf16: bool, device: str = "cpu"):
    """A Lightning ``Trainer`` for ``steps`` training steps and nothing else (no logger, checkpoint,
    validation or progress bar)."""
    import lightning as L

    return L.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu", devices=1, max_steps=steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, callbacks=callbacks,
        precision="bf16-mixed" if bf16 else "32-true",
    )


def query_data(spec: dict, num_train: int = 4096, seed: int = 0):
    """The shape's prompts: a ``QueryDataModule`` of P queries per step."""
    from grpo_lab.data.datamodule import QueryDataModule

    return QueryDataModule(dataset=spec["dataset"], prompts_per_step=spec["prompts"], num_train=num_train,
                           num_val=16, seed=seed)
