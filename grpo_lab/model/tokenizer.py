"""Tokenizers built locally and saved as ordinary Hugging Face tokenizer directories (nothing is downloaded).

- ``build_char_tokenizer``: every printable ASCII character is one token, plus ``<pad>``, ``<bos>``, ``<eos>``
  and ``<unk>``; the tokenizer of the tiny Llama built from a config.
- ``build_bpe_tokenizer``: a byte-level BPE trained on a corpus with the ``tokenizers`` library, in one of
  two families: ``gpt2`` (one special ``<|endoftext|>`` that is bos, eos and, once loaded, pad) or ``chatml``
  (Qwen2's layout: pad ``<|endoftext|>``, eos ``<|im_end|>``, a ChatML chat template).

Both are wrapped in ``PreTrainedTokenizerFast``, so ``AutoTokenizer.from_pretrained(dir)`` loads them like
any hub tokenizer and a local HF model directory uses its own tokenizer through the same code path.
``chat_prompt`` wraps a prompt as one user message with the tokenizer's own chat template.
"""

from __future__ import annotations

import string
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from grpo_lab.system.errors import UserError

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>"}
CHARSET = "".join(ch for ch in string.printable if ch.isprintable())  # 95 printable ASCII characters

# Qwen2's ChatML layout: each message is <|im_start|>role\ncontent<|im_end|>\n; the generation prompt
# opens the assistant's turn, and the model ends it with eos = <|im_end|>.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
BPE_FAMILIES = {
    "gpt2": {"specials": ["<|endoftext|>"],
             "tokens": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                        "unk_token": "<|endoftext|>"}},
    "chatml": {"specials": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
               "tokens": {"pad_token": "<|endoftext|>", "eos_token": "<|im_end|>"}},
}


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


def build_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 512, family: str = "chatml",
                        chat_template: str | None = CHATML_TEMPLATE) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on ``texts`` (any text encodes: the 256 bytes are in the alphabet).

    ``family`` chooses the special tokens (``BPE_FAMILIES``): ``gpt2`` has no pad token (``load_tokenizer``
    makes pad = eos, as for GPT-2), ``chatml`` has pad != eos. ``chat_template`` (a Jinja string, or None
    for none) is saved with the tokenizer; the default is ChatML, whose markers are ``chatml``'s specials.
    """
    if family not in BPE_FAMILIES:
        raise UserError(f"unknown BPE family {family!r}; known: {', '.join(BPE_FAMILIES)}")
    spec = BPE_FAMILIES[family]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=spec["specials"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(texts, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, padding_side="left", **spec["tokens"])
    if chat_template is not None:
        tok.chat_template = chat_template
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


def chat_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    """``prompt`` as one user message in the tokenizer's own chat template, with the assistant turn opened
    (``add_generation_prompt=True``); the text the policy continues. Raises ``ValueError`` naming the model
    directory when the tokenizer has no chat template."""
    if not getattr(tokenizer, "chat_template", None):
        where = getattr(tokenizer, "name_or_path", "") or ""
        what = f"the tokenizer in {where}" if where else "the built-in character tokenizer"
        raise UserError(f"chat_template is set but {what} has no chat template; set it to false or use a "
                         "model directory whose tokenizer has one")
    messages = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
