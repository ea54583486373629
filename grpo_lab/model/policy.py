"""Building or loading the causal LM: a tiny Llama from a config (no download), or a local HF directory."""

from __future__ import annotations

import os
import shutil
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from grpo_lab.model.tokenizer import PreTrainedTokenizerBase, load_tokenizer
from grpo_lab.system.errors import UserError, UserFileNotFoundError
from grpo_lab.system.rng import seeded


@dataclass
class PolicyConfig:
    """The policy network. With ``pretrained`` unset a Llama is built from the sizes below (random
    weights, char tokenizer); otherwise the local HF causal-LM directory is loaded with its own tokenizer.
    """

    pretrained: str | None = None
    """Path to a local Hugging Face causal-LM directory (never a hub id: nothing is downloaded)."""
    hidden_size: int = 128
    """Width of the tiny Llama built from scratch."""
    num_layers: int = 2
    """Number of transformer blocks."""
    num_heads: int = 4
    """Attention heads (must divide hidden_size)."""
    intermediate_size: int | None = None
    """MLP width; default 4 x hidden_size."""
    max_positions: int = 128
    """Longest prompt + completion the model accepts."""
    attn_implementation: str = "sdpa"
    """transformers attention kernel: ``sdpa`` (torch's fused attention) or ``eager`` (plain matmul + softmax:
    same math; on CPU faster for short sequences under bf16, see ``make bench``)."""

    def __post_init__(self) -> None:
        if self.pretrained is None and self.hidden_size % self.num_heads:
            raise UserError(f"num_heads={self.num_heads} must divide hidden_size={self.hidden_size}")
        if self.attn_implementation not in ("sdpa", "eager"):
            raise UserError(f"attn_implementation must be 'sdpa' or 'eager', got "
                            f"{self.attn_implementation!r}")

    def key(self) -> dict:
        """What identifies the weights (the warm-start cache key): the kernel choice does not."""
        return {k: v for k, v in asdict(self).items() if k != "attn_implementation"}


def build_policy(cfg: PolicyConfig,
                 seed: int | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model and its tokenizer. A from-scratch build is seeded by ``seed`` (same seed, same weights)."""
    if cfg.pretrained is not None:
        path = Path(cfg.pretrained)
        if not (path / "config.json").is_file():
            raise UserFileNotFoundError(
                f"policy.pretrained={cfg.pretrained!r} is not a local Hugging Face model directory "
                "(no config.json); grpo_lab never downloads from a hub"
            )
        tok = load_tokenizer(path)
        model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=torch.float32,
                                                     attn_implementation=cfg.attn_implementation)
        return model, tok
    tok = load_tokenizer(None)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size or 4 * cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_positions,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
    )
    with seeded(seed) if seed is not None else nullcontext():  # CPU init; the GPU's stream untouched
        model = LlamaForCausalLM(config)
    model.set_attn_implementation(cfg.attn_implementation)
    return model, tok


def save_policy(model: PreTrainedModel, tok: PreTrainedTokenizerBase, path: str | Path) -> None:
    """Save as a local HF directory (atomically: written beside, then renamed), loadable as ``pretrained``."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():  # another process finished first: keep its copy
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, path)
