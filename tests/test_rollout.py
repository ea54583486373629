import torch

from grpo_lab.rollout import encode_prompts, generate, positions, sequence_logprobs


def test_positions_ignore_left_padding():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert positions(mask).tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]


def test_prompts_repeat_in_groups(tiny_policy):
    _, tok = tiny_policy
    ids, mask = encode_prompts(tok, ["1+2=", "33+44="], 3)
    assert ids.shape == (6, 6)
    assert torch.equal(ids[0], ids[2]) and not torch.equal(ids[2], ids[3])
    assert mask[:3].sum(-1).tolist() == [4, 4, 4]


def test_masks_stop_at_eos_and_logprobs_match_a_plain_forward(tiny_policy):
    model, tok = tiny_policy
    torch.manual_seed(1)
    r = generate(model, tok, ["1+2=", "33+44=", "5+"], num_generations=4, max_new_tokens=6, temperature=1.3)
    assert r.completion_ids.shape[0] == 12 and r.completion_mask.shape == r.completion_ids.shape
    for ids, m, trunc in zip(r.completion_ids, r.completion_mask, r.truncated, strict=True):
        n = int(m.sum())
        assert m[:n].all() and not m[n:].any()  # mask is a prefix
        eos_at = (ids == tok.eos_token_id).nonzero()
        if trunc:
            assert len(eos_at) == 0
        else:
            assert int(eos_at[0]) == n - 1  # EOS included, nothing real after it
    lp, ent = sequence_logprobs(model, r, temperature=1.3, with_entropy=True)
    torch.testing.assert_close(lp * r.completion_mask, r.logprobs, atol=1e-5, rtol=1e-5)
    assert ent > 0


def test_min_new_tokens_and_greedy_are_deterministic(tiny_policy):
    model, tok = tiny_policy
    r = generate(model, tok, ["7+"], 2, 5, greedy=True, min_new_tokens=5)
    assert r.completion_mask.sum().item() == 10
    assert r.completions[0] == r.completions[1]


def test_eager_and_sdpa_attention_give_the_same_logprobs():
    from grpo_lab.policy import PolicyConfig, build_policy

    cfg = dict(hidden_size=32, num_layers=2, num_heads=2)
    sdpa, tok = build_policy(PolicyConfig(**cfg), seed=0)
    eager, _ = build_policy(PolicyConfig(**cfg, attn_implementation="eager"), seed=0)
    assert eager.config._attn_implementation == "eager" and sdpa.config._attn_implementation == "sdpa"
    r = generate(sdpa, tok, ["1+2=", "13+45="], 3, 6)  # left padding included
    a, _ = sequence_logprobs(sdpa, r)
    b, _ = sequence_logprobs(eager, r)
    m = r.completion_mask.bool()
    torch.testing.assert_close(a[m], b[m], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a[m], r.logprobs[m], atol=1e-5, rtol=1e-5)
