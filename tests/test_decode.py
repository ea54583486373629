"""grpo_lab/decode.py: the race sampler, the three KV caches, the late stop check and the compiled step."""

import inspect

import pytest
import torch
from scipy import stats
from transformers import LlamaForCausalLM

from grpo_lab.config import RLConfig
from grpo_lab.decode import Decoder, DecodeSettings, SlicedLayer, enable_tf32, race_sample, static_slots
from grpo_lab.model.policy import PolicyConfig, build_policy
from grpo_lab.rollout import generate, sequence_logprobs
from grpo_lab.system.errors import UserError

PROMPTS = ["12+34=", "5+6=", "123+4=", "7"]


def roll(model, tok, decoder, seed=0, n=12, bf16=False, temperature=1.3, prompts=PROMPTS, **kw):
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return generate(model, tok, prompts, 3, n, temperature, decoder=decoder, **kw)


def same_rollout(a, b) -> None:
    for name in ("completion_ids", "completion_mask", "logprobs", "truncated", "prompt_ids"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.completions == b.completions


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_race_sample_is_multinomials_draw(dtype):
    """Same tokens as torch.multinomial(p, 1) and the same generator state after, seeded globally or by a
    generator of its own."""
    for seed in range(10):
        logits = torch.randn(64, 99, generator=torch.Generator().manual_seed(seed)) * 3
        p = torch.softmax(logits, -1).to(dtype)
        torch.manual_seed(seed + 100)
        a = torch.multinomial(p, 1).squeeze(-1)
        state_a = torch.get_rng_state()
        torch.manual_seed(seed + 100)
        b = race_sample(p)
        assert torch.equal(a, b) and torch.equal(state_a, torch.get_rng_state())
        g1, g2 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        assert torch.equal(torch.multinomial(p, 1, generator=g1).squeeze(-1), race_sample(p, g2))
        assert torch.equal(g1.get_state(), g2.get_state())


def test_race_sample_draws_from_p():
    """Chi-square goodness of fit of 40,000 draws to p (n = 40,000; 5 categories, one of them rare)."""
    p = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03])
    draws = race_sample(p.expand(40_000, 5).contiguous(), torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=5).double()
    assert stats.chisquare(counts.numpy(), (p.double() * 40_000).numpy()).pvalue > 1e-3


def test_decode_settings_follow_the_device():
    cpu, gpu = DecodeSettings.for_device("cpu"), DecodeSettings.for_device("cuda")
    assert (cpu.kv_cache, cpu.compile, cpu.stop_check_every, cpu.share_prompts) == ("sliced", False, 1, True)
    assert (gpu.kv_cache, gpu.compile, gpu.stop_check_every, gpu.share_prompts) == ("static", True, 8, False)
    assert DecodeSettings.for_device("cpu", compile=True).kv_cache == "static"
    assert DecodeSettings.for_device("cuda", share_prompts=True, stop_check_every=1).stop_check_every == 1
    assert RLConfig(kv_cache="dynamic").decode_settings("cuda").kv_cache == "dynamic"
    for bad in ({"kv_cache": "paged"}, {"compile_decode": True, "kv_cache": "sliced"},
                {"stop_check_every": 0}):
        with pytest.raises(UserError):
            RLConfig(**bad)
    assert static_slots(10, 32) == 64 and static_slots(1, 31) == 32
    assert enable_tf32("cpu") is False  # process-wide, and only on a GPU


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("bf16", [False, True])
def test_every_cache_gives_the_same_rollout(attn, bf16):
    """The sliced cache is the growing one without its copies: the same rollout bit for bit. The static cache
    (attention over masked empty slots) gives the same tokens and log-probabilities to float rounding, under
    bf16 autocast (a bf16-mixed fit's rollout) too."""
    cfg = PolicyConfig(hidden_size=32, num_layers=2, num_heads=2, attn_implementation=attn)
    model, tok = build_policy(cfg, seed=0)
    dynamic = roll(model, tok, Decoder(DecodeSettings(kv_cache="dynamic")), bf16=bf16)
    sliced_dec = Decoder(DecodeSettings(kv_cache="sliced"))
    same_rollout(dynamic, roll(model, tok, sliced_dec, bf16=bf16))
    static_dec = Decoder(DecodeSettings(kv_cache="static"))
    static = roll(model, tok, static_dec, bf16=bf16)
    assert torch.equal(static.completion_ids, dynamic.completion_ids)
    tol = 2e-3 if bf16 else 1e-5
    torch.testing.assert_close(static.logprobs, dynamic.logprobs, atol=tol, rtol=tol)
    assert static_dec.static.layers[0].keys.shape[2] == static_slots(dynamic.prompt_ids.shape[1], 12)
    # a second rollout reuses the static cache (fixed addresses for a CUDA graph) and still agrees
    cache = static_dec.static
    again = roll(model, tok, static_dec, seed=1, bf16=bf16)
    assert static_dec.static is cache
    roll(model, tok, static_dec, prompts=PROMPTS[:2], bf16=bf16)  # another batch shape: a cache of its own
    assert len(static_dec.statics) == 2 and cache in static_dec.statics.values()
    assert torch.equal(again.completion_ids, roll(model, tok, sliced_dec, seed=1, bf16=bf16).completion_ids)


def test_sliced_layer_returns_views_of_its_buffer():
    keys, values = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    layer = SlicedLayer(keys, values, capacity=6)
    k, v = layer.update(torch.ones(2, 3, 1, 5), torch.zeros(2, 3, 1, 5))
    assert k.shape == (2, 3, 5, 5) and k.data_ptr() == layer.k_buf.data_ptr()
    assert torch.equal(k, torch.cat([keys, torch.ones(2, 3, 1, 5)], 2)) and layer.get_seq_length() == 5
    layer.update(torch.ones(2, 3, 1, 5), torch.ones(2, 3, 1, 5))
    with pytest.raises(RuntimeError, match="full"):
        layer.update(torch.ones(2, 3, 1, 5), torch.ones(2, 3, 1, 5))


class EosLlama(LlamaForCausalLM):
    """A Llama whose EOS logit is raised by 3 (P(EOS) ~ 1/6 a token): completions end early."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits[..., self.config.eos_token_id] += 3.0
        return out


EosLlama.forward.__signature__ = inspect.signature(LlamaForCausalLM.forward)


@pytest.mark.parametrize("kv_cache", ["sliced", "static"])
def test_a_late_stop_check_gives_the_same_rollout(kv_cache):
    """Checking for 'all ended' every k tokens runs steps after the last EOS; their tokens are cut off: the
    same completions, masks and log-probabilities as a check per token, whether the rollout ends early
    (trimmed to its longest completion) or runs to max_new_tokens."""
    base, tok = build_policy(PolicyConfig(hidden_size=32, num_layers=1, num_heads=2), seed=0)
    model = EosLlama(base.config)
    model.load_state_dict(base.state_dict())
    ended_early = 0
    for seed in range(4):
        ref = roll(model, tok, Decoder(DecodeSettings(kv_cache=kv_cache)), seed=seed, n=40)
        ended_early += ref.completion_ids.shape[1] < 40
        for k in (2, 3, 8):
            got = roll(model, tok, Decoder(DecodeSettings(kv_cache=kv_cache, stop_check_every=k)), seed=seed,
                       n=40)
            same_rollout(ref, got)
    assert ended_early >= 2  # the trimming was exercised


def test_compiled_static_step_never_recompiles():
    """torch.compile of the decode step over the static cache (backend aot_eager on CPU): one graph for
    every step of two rollouts with different prompt lengths (same batch, same slot count), no
    recompilation, and the eager static step's rollout."""
    dynamo = pytest.importorskip("torch._dynamo")
    from torch._dynamo.utils import counters

    model, tok = build_policy(PolicyConfig(hidden_size=32, num_layers=2, num_heads=2), seed=0)
    dynamo.reset()
    counters.clear()
    compiled = Decoder(DecodeSettings(kv_cache="static", compile=True, compile_backend="aot_eager"))
    eager = Decoder(DecodeSettings(kv_cache="static"))
    with dynamo.config.patch(error_on_recompile=True):
        for seed, prompts in ((0, PROMPTS), (1, ["1+2=", "3+4=", "99+1=", "8"])):
            got = roll(model, tok, compiled, seed=seed, n=10, prompts=prompts)
            ref = roll(model, tok, eager, seed=seed, n=10, prompts=prompts)
            assert torch.equal(got.completion_ids, ref.completion_ids)
            torch.testing.assert_close(got.logprobs, ref.logprobs, atol=1e-6, rtol=1e-6)
    assert compiled.compiled is not None and counters["stats"]["unique_graphs"] == 1
    assert counters["frames"]["ok"] == 1 and not counters["graph_break"]
    dynamo.reset()


def test_prompt_sharing_off_gives_the_same_logprobs():
    """share_prompts=False forwards the B full prompts (rollout prefill and loss forward): the same
    log-probabilities to float rounding."""
    model, tok = build_policy(PolicyConfig(hidden_size=32, num_layers=2, num_heads=2), seed=0)
    shared = roll(model, tok, Decoder(DecodeSettings()))
    full = roll(model, tok, Decoder(DecodeSettings(share_prompts=False)))
    assert torch.equal(shared.completion_ids, full.completion_ids)
    torch.testing.assert_close(shared.logprobs, full.logprobs, atol=1e-5, rtol=1e-5)
    a, _ = sequence_logprobs(model, shared, 1.3)
    b, _ = sequence_logprobs(model, shared, 1.3, share_prompts=False)
    m = shared.completion_mask
    torch.testing.assert_close(a * m, b * m, atol=2e-5, rtol=1e-5)


def test_a_failing_compilation_falls_back_to_the_eager_step(caplog):
    model, tok = build_policy(PolicyConfig(hidden_size=32, num_layers=1, num_heads=2), seed=0)
    broken = Decoder(DecodeSettings(kv_cache="static", compile=True, compile_backend="no_such_backend"))
    with caplog.at_level("WARNING", logger="grpo_lab.decode"):
        got = roll(model, tok, broken, n=6)
    assert broken.compiled is not None and "decoding eagerly" in caplog.text
    same_rollout(got, roll(model, tok, Decoder(DecodeSettings(kv_cache="static")), n=6))


def test_a_static_cache_transformers_cannot_build_falls_back_to_the_sliced_one(caplog, monkeypatch):
    from grpo_lab import decode

    def incompatible(**_):
        raise TypeError("unexpected keyword argument 'max_cache_len'")

    model, tok = build_policy(PolicyConfig(hidden_size=32, num_layers=1, num_heads=2), seed=0)
    monkeypatch.setattr(decode, "StaticCache", incompatible)
    dec = Decoder(DecodeSettings(kv_cache="static", compile=True))
    with caplog.at_level("WARNING", logger="grpo_lab.decode"):
        got = roll(model, tok, dec, n=6)
    assert "sliced cache" in caplog.text
    assert (dec.settings.kv_cache, dec.settings.compile) == ("sliced", False)
    same_rollout(got, roll(model, tok, Decoder(DecodeSettings(kv_cache="sliced")), n=6))
