"""A character-level tokenizer built locally and saved as an ordinary Hugging Face tokenizer directory.

Every printable ASCII character is one token, plus ``<pad>``, ``<bos>``, ``<eos>`` and ``<unk>``. It is built
with the ``tokenizers`` library (no download) and wrapped in ``PreTrainedTokenizerFast``, so
``AutoTokenizer.from_pretrained(dir)`` loads it like any hub tokenizer and a local HF model directory can
use its own tokenizer through the same code path.
"""

from __future__ import annotations

import string
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from grpo_lab.errors import UserError

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>"}
CHARSET = "".join(ch for ch in string.printable if ch.isprintable())  # 95 printable ASCII characters


def build_char_tokenizer(charset: str = CHARSET) -> PreTrainedTokenizerFast:
    """A fast tokenizer that maps each character of ``charset`` to one id (specials first: pad=0)."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS.values())}
    for ch in dict.fromkeys(charset):
        vocab.setdefault(ch, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, padding_side="left", **SPECIAL_TOKENS)
    return tok


def load_tokenizer(path: str | Path | None = None) -> PreTrainedTokenizerBase:
    """The char tokenizer (``path=None``) or the tokenizer saved in a local HF directory, left-padded."""
    if path is None:
        return build_char_tokenizer()
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.eos_token is None:
        raise UserError(f"tokenizer in {path} has no eos_token; completions could never stop")
    return tok
