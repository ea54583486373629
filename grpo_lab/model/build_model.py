"""Build a small causal LM of a real architecture with a BPE tokenizer trained locally, saved as a local HF
directory that ``model.policy.pretrained`` can point at (nothing is downloaded):

    python -m grpo_lab.model.build_model --arch qwen2 --out runs/models/qwen2-tiny \
        --corpus examples/math_sample.jsonl

Architectures (``ARCHS``), each exercising what the tiny Llama of ``policy.py`` does not:

- ``gpt2``: learned absolute positions, tied embeddings, one special token (pad = eos = bos), no chat template
  (dropout off, as for the others, so a training-mode forward gives the sampler's log-probabilities);
- ``qwen2``: rotary positions, grouped-query attention (fewer key/value heads than query heads), untied
  embeddings, ChatML specials with pad != eos, and a chat template;
- ``llama``: as qwen2 but Llama's blocks (tied embeddings, as the built-in policy).

The weights are random (seeded): such a model demonstrates the wiring on CPU, not learning.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from grpo_lab.model.policy import save_policy
from grpo_lab.model.tokenizer import CHATML_TEMPLATE, build_bpe_tokenizer
from grpo_lab.system.entry import run_cli
from grpo_lab.system.errors import UserError, UserFileNotFoundError
from grpo_lab.system.rng import seeded

ARCHS = ("gpt2", "qwen2", "llama")


@dataclass
class ModelSpec:
    """The sizes of the model to build."""

    arch: str = "qwen2"
    """gpt2, qwen2 or llama."""
    hidden_size: int = 64
    """Width of the residual stream."""
    num_layers: int = 2
    """Transformer blocks."""
    num_heads: int = 4
    """Query heads (must divide hidden_size)."""
    num_kv_heads: int | None = None
    """Key/value heads for qwen2/llama (must divide num_heads); default num_heads // 2 (grouped-query
    attention, GQA)."""
    vocab_size: int = 512
    """BPE vocabulary size (including the 256 byte tokens and the specials)."""
    max_positions: int = 512
    """Longest prompt + completion."""
    seed: int = 0
    """Seed of the random weights."""

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise UserError(f"unknown arch {self.arch!r}; known: {', '.join(ARCHS)}")
        if self.hidden_size % self.num_heads:
            raise UserError(f"num_heads={self.num_heads} must divide hidden_size={self.hidden_size}")
        kv = self.kv_heads()
        if self.num_heads % kv:
            raise UserError(f"num_kv_heads={kv} must divide num_heads={self.num_heads}")

    def kv_heads(self) -> int:
        return self.num_kv_heads or max(1, self.num_heads // 2)


def corpus_texts(path: str | Path) -> list[str]:
    """The training text of the tokenizer: every string value of every line of a ``.jsonl`` file, or the
    lines of any other text file."""
    path = Path(path)
    if not path.is_file():
        raise UserFileNotFoundError(f"corpus {path} does not exist")
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if path.suffix != ".jsonl":
        return lines
    texts = []
    for i, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{i}: invalid JSON ({err.msg})") from None
        texts.extend(v for v in (row.values() if isinstance(row, dict) else []) if isinstance(v, str))
    return texts


def _config(spec: ModelSpec, tok) -> GPT2Config | Qwen2Config | LlamaConfig:
    h = spec.hidden_size
    if spec.arch == "gpt2":
        return GPT2Config(vocab_size=len(tok), n_positions=spec.max_positions, n_embd=h,
                          n_layer=spec.num_layers, n_head=spec.num_heads, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id,
                          # no dropout: RL log-probs stay exact
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    common = dict(vocab_size=len(tok), hidden_size=h, intermediate_size=4 * h,
                  num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
                  num_key_value_heads=spec.kv_heads(), max_position_embeddings=spec.max_positions,
                  pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    if spec.arch == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=False)
    return LlamaConfig(**common, tie_word_embeddings=True)


def build_model(spec: ModelSpec, texts: list[str], out: str | Path) -> Path:
    """Train the BPE tokenizer on ``texts``, build ``spec``'s model with seeded random weights, save both to
    ``out`` (atomically) with a ``build.json`` of the spec; returns ``out``."""
    if not texts:
        raise UserError("the tokenizer corpus is empty")
    family = "gpt2" if spec.arch == "gpt2" else "chatml"
    tok = build_bpe_tokenizer(texts, spec.vocab_size, family=family,
                              chat_template=None if family == "gpt2" else CHATML_TEMPLATE)
    config = _config(spec, tok)
    cls = {"gpt2": GPT2LMHeadModel, "qwen2": Qwen2ForCausalLM, "llama": LlamaForCausalLM}[spec.arch]
    with seeded(spec.seed):
        model = cls(config)
    out = Path(out)
    save_policy(model, tok, out)
    (out / "build.json").write_text(json.dumps({"spec": asdict(spec), "corpus_texts": len(texts),
                                                 "parameters": sum(p.numel() for p in model.parameters())},
                                               indent=2))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m grpo_lab.model.build_model",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=ARCHS, default="qwen2", help="architecture (default: %(default)s)")
    p.add_argument("--out", required=True,
                   help="the HF directory to write (skipped if it exists, unless --force)")
    p.add_argument("--corpus", required=True,
                   help=".jsonl (every string value) or text file the BPE is trained on")
    for name, default, what in (("hidden-size", 64, "width"), ("num-layers", 2, "blocks"),
                                ("num-heads", 4, "query heads"), ("vocab-size", 512, "BPE vocabulary"),
                                ("max-positions", 512, "longest sequence"),
                                ("seed", 0, "seed of the weights")):
        p.add_argument(f"--{name}", type=int, default=default, help=f"{what} (default: %(default)s)")
    p.add_argument("--num-kv-heads", type=int, default=None, help="key/value heads (default: num-heads // 2)")
    p.add_argument("--force", action="store_true", help="rebuild even if --out exists")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    if (out / "config.json").is_file() and not args.force:
        print(f"{out} exists (use --force to rebuild)")
        return 0
    spec = ModelSpec(arch=args.arch, hidden_size=args.hidden_size, num_layers=args.num_layers,
                     num_heads=args.num_heads, num_kv_heads=args.num_kv_heads, vocab_size=args.vocab_size,
                     max_positions=args.max_positions, seed=args.seed)
    texts = corpus_texts(args.corpus)
    if out.exists() and args.force:
        shutil.rmtree(out)
    build_model(spec, texts, out)
    meta = json.loads((out / "build.json").read_text())
    print(f"wrote {out} ({spec.arch}, {meta['parameters']:,} parameters)")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
