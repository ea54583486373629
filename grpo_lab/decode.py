"""Decoding at the hardware's pace: the sampler, the KV caches and the one-token step of ``rollout.generate``.

What a decode step costs besides its matmuls, and what this module does about it:

- ``torch.multinomial(p, 1)`` checks ``p`` on the host (two device->host copies per token). It draws by the
  exponential race ``argmax(p / E)``, ``E ~ Exp(1)`` (ATen ``multinomial_out``: the one-sample path);
  :func:`race_sample` is that race without the checks: the same tokens from the same generator state, and the
  same generator state after (tests/test_decode.py, on CPU).
- transformers' default KV cache grows by ``torch.cat`` per layer per token (a copy of the whole cache each
  time). ``kv_cache="sliced"`` writes each token into a preallocated buffer and attends over its filled prefix
  (a view): the same shapes and the same numbers as the growing cache, without the copies.
  ``kv_cache="static"`` is transformers' ``StaticCache`` over a fixed number of slots: every step has the
  same shapes, so the step can be compiled once (and captured as a CUDA graph under
  ``mode="reduce-overhead"``); it equals the growing cache to float rounding (it attends over masked slots).
- the stop check (``bool(done.all())``) blocks the host every token; ``stop_check_every=k`` checks every k
  tokens. The completions, masks and log-probabilities are the same; the steps after the last EOS draw
  from the generator (so later draws differ), which is why k = 1 on CPU, where a check costs nothing.

Shapes: B sequences, Tp prompt slots, T new tokens, V vocabulary, H heads, D head width.
"""

from __future__ import annotations

import inspect
import logging
import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor
from transformers import PreTrainedModel, StaticCache

try:
    from transformers.cache_utils import DynamicLayer
except ImportError:  # transformers < 4.56, no per-layer caches: every cache stays as the model made it
    DynamicLayer = object

log = logging.getLogger(__name__)
KV_CACHES = ("dynamic", "sliced", "static")
STATIC_SLOTS = 32  # a static cache's length is rounded up to a multiple of this: few distinct shapes


def race_sample(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One draw per row of the categorical distributions ``probs`` [B, V] -> token ids [B].

    ``argmax_v p_v / E_v`` with ``E_v ~ Exp(1)`` i.i.d. picks v with probability p_v (the exponential race:
    ``E_v / p_v ~ Exp(p_v)``, and the smallest of independent exponentials is v's with probability
    p_v / Σp). ``torch.multinomial(probs, 1)`` computes exactly this, after checking ``probs`` on the host;
    here nothing leaves the device (a NaN row gives some token instead of an error: the loss guard then
    skips the step)."""
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)  # [B, V]
    return (probs / noise).argmax(-1)


@dataclass(frozen=True)
class DecodeSettings:
    """How ``rollout.generate`` decodes (``RLConfig.decode_settings`` resolves the device defaults)."""

    kv_cache: str = "sliced"  # dynamic | sliced | static
    compile: bool = False  # torch.compile the one-token step (needs the static cache)
    compile_backend: str = "inductor"
    stop_check_every: int = 1
    share_prompts: bool = True  # forward each prompt once per group, its cache repeated G times

    def __post_init__(self) -> None:
        if self.kv_cache not in KV_CACHES:
            raise ValueError(f"kv_cache must be one of {', '.join(KV_CACHES)}, got {self.kv_cache!r}")
        if self.compile and self.kv_cache != "static":
            raise ValueError("compile_decode needs kv_cache='static' (a compiled step needs fixed shapes)")
        if self.stop_check_every < 1:
            raise ValueError(f"stop_check_every must be >= 1, got {self.stop_check_every}")

    @classmethod
    def for_device(cls, device: torch.device | str, kv_cache: str | None = None, compile: bool | None = None,
                   compile_backend: str = "inductor", stop_check_every: int | None = None,
                   share_prompts: bool | None = None) -> DecodeSettings:
        """The settings with each unset (None) one following the device: on CPU the bit-identical eager path
        (sliced cache, a stop check per token, prompts shared); on a GPU the compiled static-cache step
        (unless another cache is asked for), a stop check every 8 tokens, and no prompt sharing (FLOPs are
        cheap there, kernel launches are not)."""
        gpu = torch.device(device).type == "cuda"
        compile = gpu and kv_cache in (None, "static") if compile is None else compile
        kv_cache = kv_cache or ("static" if gpu or compile else "sliced")
        every = (8 if gpu else 1) if stop_check_every is None else stop_check_every
        share = (not gpu) if share_prompts is None else share_prompts
        return cls(kv_cache, compile, compile_backend, every, share)


class SlicedLayer(DynamicLayer):
    """A KV cache layer with a preallocated buffer [B, H, capacity, D]: ``update`` writes the new entries
    after the filled ones and returns the filled prefix (a view), the same tensors by value and shape that
    transformers' growing layer would return, without copying the cache per token."""

    def __init__(self, keys: Tensor, values: Tensor, capacity: int) -> None:
        super().__init__()
        b, h, n, _ = keys.shape  # [B, H, n, D]
        self.k_buf = keys.new_zeros(b, h, capacity, keys.shape[-1])  # [B, H, capacity, D]
        self.v_buf = values.new_zeros(b, h, capacity, values.shape[-1])
        self.k_buf[:, :, :n] = keys
        self.v_buf[:, :, :n] = values
        self.keys, self.values = self.k_buf[:, :, :n], self.v_buf[:, :, :n]
        self.device, self.is_initialized = keys.device, True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        n = self.keys.shape[-2]
        m = n + key_states.shape[-2]
        if m > self.k_buf.shape[-2]:
            raise RuntimeError(f"sliced KV cache full: {m} entries for {self.k_buf.shape[-2]} slots")
        self.k_buf[:, :, n:m] = key_states
        self.v_buf[:, :, n:m] = value_states
        self.keys, self.values = self.k_buf[:, :, :m], self.v_buf[:, :, :m]
        return self.keys, self.values


def slice_in_place(cache, capacity: int) -> bool:
    """Turn a prefilled growing cache (transformers ``DynamicCache``, every layer a plain ``DynamicLayer``)
    into :class:`SlicedLayer` layers of ``capacity`` slots; False (cache untouched) for any other cache."""
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer or not layer.is_initialized for layer in layers):
        return False
    cache.layers = [SlicedLayer(layer.keys, layer.values, capacity) for layer in layers]
    return True


def static_slots(prompt_len: int, new_tokens: int) -> int:
    """Slots of a static cache for ``prompt_len`` prompt and ``new_tokens`` new tokens, rounded up to a
    multiple of ``STATIC_SLOTS`` so that batches with other prompt lengths reuse the compiled step."""
    return STATIC_SLOTS * math.ceil((prompt_len + new_tokens) / STATIC_SLOTS)


def decode_forward(model: PreTrainedModel, tok: Tensor, attn: Tensor, pos: Tensor, cache, cache_kw: str,
                   slot: Tensor | None = None) -> Tensor:
    """One decode step: the logits [B, V] of the token after ``tok`` [B], given the attention mask ``attn``
    [B, slots] and position ids ``pos`` [B, 1]; ``cache`` is updated in place. ``slot`` [1]: the cache slot
    written, for transformers releases whose forward takes ``cache_position``."""
    extra = {} if slot is None else {"cache_position": slot}
    out = model(input_ids=tok.unsqueeze(-1), attention_mask=attn, position_ids=pos, use_cache=True,
                **{cache_kw: cache}, **extra)
    return out.logits[:, -1, :]


class Decoder:
    """The decode step of one policy on one device under ``settings``. It keeps what may be reused across
    rollouts: the compiled step and, for the static cache, one cache per batch shape (a CUDA graph replays on
    fixed addresses; training and validation rollouts alternate shapes)."""

    def __init__(self, settings: DecodeSettings, device: torch.device | str | None = None) -> None:
        self.settings, self.device = settings, None if device is None else torch.device(device)
        self.compiled = None
        self.static: StaticCache | None = None  # the cache of the rollout under way
        self.statics: dict[tuple, StaticCache] = {}  # one per (B, slots, dtype, device): fixed addresses
        self.slot: Tensor | None = None  # [1] the static cache's next slot (when the model takes it)
        self.calls = 0  # static-cache steps run

    def prepare(self, model: PreTrainedModel, cache, prompt_len: int, new_tokens: int):
        """The prefilled ``cache`` (``prompt_len`` entries) as the configured kind, and the number of slots
        its attention mask spans: ``(cache, slots)``. A cache of another kind than transformers' growing
        one stays as it is."""
        kind, width = self.settings.kv_cache, prompt_len + new_tokens
        if kind == "sliced":
            slice_in_place(cache, width)
            return cache, width
        layers = getattr(cache, "layers", None)
        if kind == "dynamic" or not layers or any(type(layer) is not DynamicLayer for layer in layers):
            return cache, width
        slots = static_slots(prompt_len, new_tokens)
        keys = cache.layers[0].keys  # [B, H, Tp, D]
        key = (keys.shape[0], slots, keys.dtype, str(keys.device))
        try:
            self.static = self.statics.get(key)
            if self.static is None:
                self.static = self.statics[key] = StaticCache(config=model.config, max_cache_len=slots)
            else:
                self.static.reset()
            filled = torch.arange(prompt_len, device=keys.device)
            for i, layer in enumerate(cache.layers):
                self.static.update(layer.keys, layer.values, i, {"cache_position": filled})
        except (TypeError, ValueError, AttributeError, NotImplementedError) as err:
            # a transformers release whose StaticCache differs: decode with the sliced cache from now on
            log.warning("transformers' StaticCache failed here (%s: %s); decoding with the sliced cache",
                        type(err).__name__, err)
            self.settings = replace(self.settings, kv_cache="sliced", compile=False)
            self.static, self.statics = None, {}
            slice_in_place(cache, width)
            return cache, width
        takes_position = "cache_position" in inspect.signature(model.forward).parameters
        self.slot = torch.full((1,), prompt_len, device=keys.device) if takes_position else None
        return self.static, slots

    def forward(self, model: PreTrainedModel, tok: Tensor, attn: Tensor, pos: Tensor, cache,
                cache_kw: str) -> Tensor:
        """:func:`decode_forward`, compiled when the settings say so and the cache is the static one. If the
        compiled step fails in its first calls (tracing, code generation, graph capture), that is logged
        and the step runs eagerly from then on."""
        if cache is not self.static:
            return decode_forward(model, tok, attn, pos, cache, cache_kw)
        try:
            if not self.settings.compile or self.compiled is decode_forward or self.calls >= 3:
                return self.step()(model, tok, attn, pos, cache, cache_kw, self.slot)
            try:
                return self.step()(model, tok, attn, pos, cache, cache_kw, self.slot)
            except Exception as err:  # a backend's failure must not cost the run
                log.warning("torch.compile of the decode step failed (%s: %s); decoding eagerly",
                            type(err).__name__, str(err).splitlines()[0] if str(err) else "")
                self.compiled = decode_forward
                return decode_forward(model, tok, attn, pos, cache, cache_kw, self.slot)
        finally:
            self.calls += 1
            if self.slot is not None:
                self.slot += 1

    def step(self):
        """The one-token step: :func:`decode_forward`, or its compiled form (compiled once per decoder; with
        inductor on a GPU in ``mode="reduce-overhead"``: CUDA graphs)."""
        if not self.settings.compile:
            return decode_forward
        if self.compiled is None:
            cuda = self.static is not None and self.static.layers[0].keys.is_cuda
            mode = "reduce-overhead" if self.settings.compile_backend == "inductor" and cuda else None
            self.compiled = torch.compile(decode_forward, backend=self.settings.compile_backend, mode=mode)
        return self.compiled


def enable_tf32(device: torch.device | str) -> bool:
    """Let fp32 matmuls on a CUDA device use TF32 tensor cores (``torch.set_float32_matmul_precision``:
    process-wide, called by the module when ``tf32`` is set). True if it applied (a CUDA device)."""
    if torch.device(device).type != "cuda":
        return False
    torch.set_float32_matmul_precision("high")
    return True
