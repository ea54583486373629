import pytest
import torch

from grpo_lab.model.policy import PolicyConfig, build_policy, save_policy
from grpo_lab.model.tokenizer import build_char_tokenizer, load_tokenizer


def test_char_tokenizer_round_trips_and_saves(tmp_path):
    tok = build_char_tokenizer()
    ids = tok("12+34=", add_special_tokens=False)["input_ids"]
    assert len(ids) == 6 and tok.decode(ids) == "12+34="
    tok.save_pretrained(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again("12+34=", add_special_tokens=False)["input_ids"] == ids and again.padding_side == "left"


def test_seeded_build_and_local_dir_round_trip(tmp_path):
    cfg = PolicyConfig(hidden_size=32, num_layers=1, num_heads=2)
    m1, tok = build_policy(cfg, seed=5)
    m2, _ = build_policy(cfg, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters(), strict=True))
    save_policy(m1, tok, tmp_path / "p")
    m3, tok3 = build_policy(PolicyConfig(pretrained=str(tmp_path / "p")))
    assert torch.equal(m3.model.embed_tokens.weight, m1.model.embed_tokens.weight) and len(tok3) == len(tok)


def test_bad_policy_configs():
    with pytest.raises(ValueError, match="num_heads=3 must divide"):
        PolicyConfig(hidden_size=32, num_heads=3)
    with pytest.raises(FileNotFoundError, match="never downloads"):
        build_policy(PolicyConfig(pretrained="meta-llama/Llama-3-8B"))
