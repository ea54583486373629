"""Locally built BPE tokenizers and real-architecture models (GPT-2, Qwen2, Llama) saved as HF directories."""

import json

import pytest
import torch

from grpo_lab.model.build_model import ModelSpec, build_model, corpus_texts, main
from grpo_lab.model.policy import PolicyConfig, build_policy
from grpo_lab.model.tokenizer import build_bpe_tokenizer, chat_prompt, load_tokenizer
from grpo_lab.system.entry import run_cli
from tests.conftest import ROOT

SAMPLE = ROOT / "examples" / "math_sample.jsonl"


@pytest.fixture(scope="module")
def texts():
    return corpus_texts(SAMPLE)


def test_bpe_round_trips_any_text_and_merges(texts):
    tok = build_bpe_tokenizer(texts, vocab_size=400)
    for s in ("How many apples does Maya have?\n#### 32", "ünïcode ✓ and $4.50", ""):
        ids = tok(s, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == s  # byte-level: nothing is unknown
    word = tok("stickers", add_special_tokens=False)["input_ids"]
    assert len(word) < len("stickers")  # a corpus word is merged, not spelled out byte by byte
    assert len(tok) <= 400


def test_families_set_the_special_tokens(texts, tmp_path):
    gpt2 = build_bpe_tokenizer(texts, 300, family="gpt2", chat_template=None)
    gpt2.save_pretrained(tmp_path / "g")
    g = load_tokenizer(tmp_path / "g")
    assert g.pad_token_id == g.eos_token_id == g.bos_token_id  # GPT-2: one special, pad = eos once loaded
    chat = build_bpe_tokenizer(texts, 300, family="chatml")
    chat.save_pretrained(tmp_path / "c")
    c = load_tokenizer(tmp_path / "c")
    assert c.pad_token == "<|endoftext|>" and c.eos_token == "<|im_end|>" and c.pad_token_id != c.eos_token_id
    assert c.padding_side == "left"
    with pytest.raises(ValueError, match="unknown BPE family 'bert'"):
        build_bpe_tokenizer(texts, 300, family="bert")


def test_chat_prompt_uses_the_saved_template_and_names_a_directory_without_one(texts, tmp_path):
    chat = build_bpe_tokenizer(texts, 300)
    chat.save_pretrained(tmp_path / "c")
    tok = load_tokenizer(tmp_path / "c")
    text = chat_prompt(tok, "What is 2 + 3?")
    assert text == "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")  # the markers are single special tokens
    build_bpe_tokenizer(texts, 300, family="gpt2", chat_template=None).save_pretrained(tmp_path / "g")
    with pytest.raises(ValueError, match=f"the tokenizer in {tmp_path / 'g'} has no chat template"):
        chat_prompt(load_tokenizer(tmp_path / "g"), "hi")
    with pytest.raises(ValueError, match="the built-in character tokenizer has no chat template"):
        chat_prompt(load_tokenizer(None), "hi")


@pytest.mark.parametrize("arch", ["gpt2", "qwen2", "llama"])
def test_build_model_saves_a_loadable_directory_of_that_architecture(arch, texts, tmp_path):
    spec = ModelSpec(arch=arch, hidden_size=32, num_layers=1, num_heads=4, vocab_size=300, max_positions=64)
    out = build_model(spec, texts, tmp_path / arch)
    model, tok = build_policy(PolicyConfig(pretrained=str(out)))
    cfg = model.config
    assert cfg.model_type == arch and json.loads((out / "build.json").read_text())["spec"]["arch"] == arch
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    if arch == "gpt2":
        assert tok.pad_token_id == tok.eos_token_id
        assert hasattr(model.transformer, "wpe")  # absolute positions
        assert emb.data_ptr() == head.data_ptr() and tok.chat_template is None
    else:
        assert cfg.num_key_value_heads == 2 < cfg.num_attention_heads == 4  # grouped-query attention
        assert tok.pad_token_id != tok.eos_token_id and tok.chat_template
    if arch == "qwen2":
        assert not cfg.tie_word_embeddings and emb.data_ptr() != head.data_ptr()
    again = build_model(spec, texts, tmp_path / f"{arch}2")  # seeded: the same weights
    m2, _ = build_policy(PolicyConfig(pretrained=str(again)))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), m2.parameters(), strict=True))


def test_bad_specs_and_the_command_line(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown arch 'bert'"):
        ModelSpec(arch="bert")
    with pytest.raises(ValueError, match="num_kv_heads=3 must divide num_heads=4"):
        ModelSpec(num_kv_heads=3)
    with pytest.raises(ValueError, match="corpus is empty"):
        build_model(ModelSpec(), [], tmp_path / "x")
    with pytest.raises(SystemExit) as exit_:
        run_cli(main, ["--out", str(tmp_path / "m"), "--corpus", str(tmp_path / "missing.jsonl")])
    assert exit_.value.code == 2 and capsys.readouterr().err.startswith("error: corpus ")
    args = ["--arch", "gpt2", "--out", str(tmp_path / "m"), "--corpus", str(SAMPLE), "--hidden-size", "16",
            "--num-heads", "2", "--num-layers", "1", "--vocab-size", "280"]
    assert main(args) == 0 and (tmp_path / "m" / "config.json").is_file()
    stamp = (tmp_path / "m" / "build.json").stat().st_mtime_ns
    assert main(args) == 0 and "exists" in capsys.readouterr().out  # kept, not rebuilt
    assert (tmp_path / "m" / "build.json").stat().st_mtime_ns == stamp
