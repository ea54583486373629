import pytest
import torch

from grpo_lab.rollout import encode_prompts, generate, positions, sequence_logprobs
from tests.conftest import full_sequence_logprobs


def test_positions_ignore_left_padding():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert positions(mask).tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]


def test_without_masks_rows_in_a_copy(tiny_policy):
    model, tok = tiny_policy
    torch.manual_seed(0)
    r = generate(model, tok, ["1+2=", "3+4="], 2, 3, 1.0, min_new_tokens=3)
    out = r.without(torch.tensor([False, True, False, True]))
    assert out.completion_mask.sum(-1).tolist() == [3, 0, 3, 0]
    assert r.completion_mask.sum(-1).tolist() == [3] * 4
    assert out.completion_ids is r.completion_ids and out.completions == r.completions


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
    from grpo_lab.model.policy import PolicyConfig, build_policy

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


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("max_new_tokens", [1, 5])
def test_shared_prompt_forward_gives_the_full_forwards_logprobs_and_gradient(attn, max_new_tokens):
    """The prompt forwarded once per group (KV cache repeated G times) == B full sequences, in value and in
    gradient; left-padded prompts of different lengths, EOS-terminated completions, T = 1 included."""
    from grpo_lab.model.policy import PolicyConfig, build_policy

    cfg = PolicyConfig(hidden_size=32, num_layers=2, num_heads=2, attn_implementation=attn)
    model, tok = build_policy(cfg, seed=0)
    torch.manual_seed(3)
    r = generate(model, tok, ["1+2=", "13+45=", "7"], 4, max_new_tokens, temperature=1.5)
    assert r.group_size == 4 and r.prompt_mask.sum(-1).unique().numel() == 3
    from grpo_lab.rollout import shared_prompt_forward

    # the shared path runs
    assert shared_prompt_forward(model, r.prompt_ids[::4], r.prompt_mask[::4], 4) is not None
    m = r.completion_mask.float()
    shared, _ = sequence_logprobs(model, r, temperature=1.5)
    full = full_sequence_logprobs(model, r, temperature=1.5)
    torch.testing.assert_close(shared * m, full * m, atol=2e-5, rtol=1e-5)
    # the sampler's own log-probs too
    torch.testing.assert_close(shared * m, r.logprobs, atol=2e-5, rtol=1e-5)
    weights = torch.randn_like(m) * m  # an arbitrary loss on the masked tokens

    def grads(lp):
        model.zero_grad()
        (lp * weights).sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    for a, b in zip(grads(sequence_logprobs(model, r, temperature=1.5)[0]), grads(full), strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_select_keeps_groups_only_on_group_boundaries(tiny_policy):
    model, tok = tiny_policy
    r = generate(model, tok, ["1+2=", "3+4=", "5+6="], 4, 3)
    assert r.select(slice(4, 12)).group_size == 4 and r.select(slice(0, 12)).group_size == 4
    assert r.select(slice(0, 6)).group_size == 1 and r.select(slice(2, 6)).group_size == 1
    assert r.select(slice(8, 100)).group_size == 4  # a slice past the end is clamped
    part = r.select(slice(0, 6))  # not aligned: falls back to the full forward, same values
    torch.testing.assert_close(sequence_logprobs(model, part)[0] * part.completion_mask, part.logprobs,
                               atol=2e-5, rtol=1e-5)


def test_a_cache_that_cannot_be_repeated_falls_back_and_logs_once(caplog):
    """A model whose KV cache has no batch_repeat_interleave: the full forward is used (same log-probs) and a
    warning names the model class once, however many batches follow."""
    import inspect
    import logging
    import types

    from transformers import LlamaForCausalLM

    from grpo_lab import rollout as rollout_mod
    from grpo_lab.model.policy import PolicyConfig, build_policy

    class OpaqueCacheLlama(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            if kwargs.get("use_cache"):
                out[rollout_mod._cache_keyword(self)] = types.SimpleNamespace()  # no batch_repeat_interleave
            return out

    OpaqueCacheLlama.forward.__signature__ = inspect.signature(LlamaForCausalLM.forward)
    model, tok = build_policy(PolicyConfig(hidden_size=32, num_layers=1, num_heads=2), seed=0)
    r = generate(model, tok, ["1+2=", "13+45="], 3, 4)
    ref, _ = sequence_logprobs(model, r)
    opaque = OpaqueCacheLlama(model.config)
    opaque.load_state_dict(model.state_dict())
    rollout_mod._UNSHARED.discard("OpaqueCacheLlama")
    with caplog.at_level(logging.WARNING, logger="grpo_lab.rollout"):
        for _ in range(3):
            got, _ = sequence_logprobs(opaque, r)
            torch.testing.assert_close(got * r.completion_mask, ref * r.completion_mask, atol=1e-5, rtol=1e-5)
    warnings = [rec.getMessage() for rec in caplog.records if "cannot be repeated" in rec.getMessage()]
    assert len(warnings) == 1 and "OpaqueCacheLlama" in warnings[0]
