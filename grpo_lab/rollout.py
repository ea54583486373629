"""Rollout: sample G completions per query with a KV cache, build completion masks and log-probabilities.

Shapes: P prompts, G completions each, B = P·G sequences (a query's G completions are adjacent: row
``b`` belongs to query ``b // G``), Tp prompt tokens (left-padded), T completion tokens.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, replace

import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from grpo_lab.decode import Decoder, DecodeSettings, race_sample
from grpo_lab.system.errors import UserError

log = logging.getLogger(__name__)
_UNSHARED: set[str] = set()  # model classes whose cache cannot be repeated (logged once each)


@dataclass
class Rollout:
    prompt_ids: Tensor  # [B, Tp] left-padded
    prompt_mask: Tensor  # [B, Tp] 1 on real prompt tokens
    completion_ids: Tensor  # [B, T] padded after EOS
    completion_mask: Tensor  # [B, T] 1 on sampled tokens up to and including EOS
    logprobs: Tensor  # [B, T] log-probability of each sampled token under the sampling distribution
    completions: list[str]  # [B] decoded text without specials
    truncated: Tensor  # [B] bool: no EOS within max_new_tokens
    group_size: int = 1  # G: rows b·G .. b·G+G-1 share one prompt (1: no sharing assumed)

    @property
    def num_tokens(self) -> int:
        return int(self.completion_mask.sum())

    def without(self, rows: Tensor) -> Rollout:
        """A copy whose completion mask is 0 on the sequences where ``rows`` ``[B]`` (bool) is true: they stay
        in the rollout (and its metrics) but leave the loss. The original is unchanged."""
        return replace(self, completion_mask=self.completion_mask.masked_fill(rows.view(-1, 1), 0))

    def select(self, rows: slice) -> Rollout:
        """The sub-rollout of sequences ``rows`` (a micro-batch); it keeps the group structure when ``rows``
        starts and ends on group boundaries."""
        start, stop, step = rows.indices(len(self.completions))
        g = self.group_size
        aligned = step == 1 and start % g == 0 and (stop - start) % g == 0
        return Rollout(
            self.prompt_ids[rows], self.prompt_mask[rows], self.completion_ids[rows],
            self.completion_mask[rows], self.logprobs[rows], self.completions[rows], self.truncated[rows],
            g if aligned else 1,
        )


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                   repeats: int) -> tuple[Tensor, Tensor]:
    """Left-padded ``[P·repeats, Tp]`` ids and mask, each prompt repeated ``repeats`` times in a row."""
    enc = tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
    if enc["input_ids"].shape[1] == 0 or (enc["attention_mask"].sum(-1) == 0).any():
        raise UserError("every prompt must encode to at least one token")
    ids = enc["input_ids"].repeat_interleave(repeats, dim=0)
    mask = enc["attention_mask"].repeat_interleave(repeats, dim=0)
    return ids, mask


def positions(mask: Tensor) -> Tensor:
    """Position ids that ignore left padding: 0 at each row's first real token."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def token_logprobs(logits: Tensor, tokens: Tensor) -> Tensor:
    """log softmax(logits)[tokens] as a gather minus ``logsumexp`` (no [.., V] log-prob tensor kept)."""
    logits = logits.float()
    return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _cache_keyword(model: PreTrainedModel) -> str:
    """transformers >= 5.x names the KV cache ``cache``; earlier releases ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _keep_last(model: PreTrainedModel, n: int) -> dict:
    """Ask the model for the logits of the last ``n`` positions only (no LM head on the rest)."""
    return {"logits_to_keep": n} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def shared_prompt_forward(model: PreTrainedModel, ids: Tensor, mask: Tensor,
                          group: int) -> tuple[object, Tensor] | None:
    """Forward the P distinct prompts ``ids``/``mask`` [P, Tp] once, for G = ``group`` completions each.

    Returns the KV cache with every prompt's entries repeated G times in a row (``[B = P·G]`` rows, as the
    rollout lays them out) and the logits of the last prompt position ``[B, V]``; None if the model's cache
    cannot be repeated (the caller then forwards the B repeated prompts). With grad enabled the G copies
    share one graph: backward sums their gradients, exactly what G separate prompt forwards would give.
    """
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=True,
                **_keep_last(model, 1))
    cache = out[_cache_keyword(model)]
    if not hasattr(cache, "batch_repeat_interleave"):
        name = type(model).__name__
        if name not in _UNSHARED:
            _UNSHARED.add(name)
            log.warning("%s returns a %s KV cache, which cannot be repeated per group: each completion's "
                        "prompt is forwarded again (same result, more compute)", name, type(cache).__name__)
        return None
    if group > 1:
        cache.batch_repeat_interleave(group)
    return cache, out.logits[:, -1, :].repeat_interleave(group, dim=0)


def next_token(logits: Tensor, temperature: float, greedy: bool, ban: int | None,
               generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """The sampled (or greedy) next token [B] from ``logits`` [B, V] at ``temperature``, and its
    log-probability [B] under the sampling distribution; token ``ban`` (EOS before ``min_new_tokens``) gets
    probability 0. Sampling is ``decode.race_sample``: ``torch.multinomial``'s draw, no host checks."""
    scores = logits.float() / (1.0 if greedy else temperature)  # [B, V]
    if ban is not None:
        scores[:, ban] = float("-inf")
    tok = scores.argmax(-1) if greedy else race_sample(torch.softmax(scores, dim=-1), generator)  # [B]
    return tok, token_logprobs(scores, tok)


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    num_generations: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    greedy: bool = False,
    min_new_tokens: int = 0,
    decoder: Decoder | None = None,
) -> Rollout:
    """Sample ``num_generations`` completions for each prompt (or the greedy one), stopping at EOS.

    Sampling uses torch's default generator of the model's device, so a seeded run samples the same
    completions. ``decoder``: how to decode (``decode.Decoder``; default: the device's
    ``DecodeSettings.for_device``); every kind of cache and stop check gives the same completions.
    """
    if temperature <= 0 and not greedy:
        raise UserError(f"temperature must be > 0 for sampling, got {temperature}")
    device = next(model.parameters()).device
    dec = decoder or Decoder(DecodeSettings.for_device(device), device)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    prompt_ids, prompt_mask = (t.to(device) for t in encode_prompts(tokenizer, prompts, num_generations))
    b, tp = prompt_ids.shape
    cache_kw = _cache_keyword(model)
    g = num_generations  # prefill each prompt once, not G times
    shared = None
    if dec.settings.share_prompts:
        shared = shared_prompt_forward(model, prompt_ids[::g], prompt_mask[::g], g)
    if shared is not None:
        cache, logits = shared
    else:
        out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions(prompt_mask),
                    use_cache=True, **_keep_last(model, 1))
        cache, logits = out[cache_kw], out.logits[:, -1, :]  # [B, V]
    cache, slots = dec.prepare(model, cache, tp, max_new_tokens)
    attn = prompt_mask.new_zeros(b, slots)  # [B, slots]: the prompt's mask, then 1 per token fed back
    attn[:, :tp] = prompt_mask
    static = cache is dec.static  # a static cache's step attends over every slot (fixed shapes)
    next_pos = prompt_mask.sum(-1, keepdim=True)  # [B, 1]
    done = torch.zeros(b, dtype=torch.bool, device=device)
    tokens, logps, masks = [], [], []
    for step in range(max_new_tokens):
        tok, logp = next_token(logits, temperature, greedy, eos if step < min_new_tokens else None)
        logps.append(logp)
        masks.append(~done)
        tok = tok.masked_fill(done, pad)
        tokens.append(tok)
        done = done | (tok == eos)
        if step == max_new_tokens - 1 or ((step + 1) % dec.settings.stop_check_every == 0
                                          and bool(done.all())):
            break
        attn[:, tp + step] = 1
        logits = dec.forward(model, tok, attn if static else attn[:, : tp + step + 1], next_pos, cache,
                             cache_kw)
        next_pos = next_pos + 1
    completion_mask = torch.stack(masks, dim=1).long()  # [B, T']
    # a late stop check ran steps after the last EOS: keep T = the longest completion, as a check per token
    t = int(completion_mask.sum(-1).max()) if dec.settings.stop_check_every > 1 else len(tokens)
    completion_ids = torch.stack(tokens, dim=1)[:, :t]  # [B, T]
    completion_mask = completion_mask[:, :t]
    logprobs = torch.stack(logps, dim=1)[:, :t] * completion_mask  # [B, T]
    texts = tokenizer.batch_decode(completion_ids.masked_fill(completion_mask == 0, pad),
                                   skip_special_tokens=True)
    return Rollout(prompt_ids, prompt_mask, completion_ids, completion_mask, logprobs, texts, ~done,
                   num_generations)


def sequence_logprobs(
    model: PreTrainedModel, rollout: Rollout, temperature: float = 1.0, with_entropy: bool = False,
    token_entropy: bool = False, share_prompts: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Per-token log π(o_t | q, o_<t) ``[B, T]`` of the rollout's completions (with grad when enabled), at
    the sampling temperature; and the mean token entropy over the mask if asked (``token_entropy``: the
    per-token entropy ``[B, T]`` instead, with its graph, for an entropy term in the loss).

    With ``rollout.group_size`` G > 1 each prompt is forwarded once and its KV cache shared by its G
    completions (``shared_prompt_forward``); the completions then run in one forward over that cache. The
    result and its gradient equal one forward over the B full sequences (tests/test_rollout.py), with the
    prompt's share of the FLOPs divided by G; ``share_prompts=False`` forwards the B full sequences instead.
    """
    t = rollout.completion_ids.shape[1]
    g = rollout.group_size
    shared = None
    if g > 1 and share_prompts:
        shared = shared_prompt_forward(model, rollout.prompt_ids[::g], rollout.prompt_mask[::g], g)
    if shared is not None:
        cache, first = shared  # first: [B, V], the prediction of completion token 0
        parts = [first[:, None, :]]
        if t > 1:  # positions of completion tokens 0..T-2 predict tokens 1..T-1
            attn = torch.cat([rollout.prompt_mask, rollout.completion_mask], dim=1)[:, :-1]  # [B, Tp+T-1]
            rest = model(input_ids=rollout.completion_ids[:, :-1], attention_mask=attn,
                         position_ids=positions(attn)[:, -(t - 1):], use_cache=True,
                         **{_cache_keyword(model): cache}).logits  # [B, T-1, V]
            parts.append(rest)
        logits = torch.cat(parts, dim=1).float() / temperature  # [B, T, V]
    else:
        ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], dim=1)  # [B, Tp+T]
        attn = torch.cat([rollout.prompt_mask, rollout.completion_mask], dim=1)
        keep = _keep_last(model, t + 1)  # the LM head runs on the T+1 last positions only, when supported
        logits = model(input_ids=ids, attention_mask=attn, position_ids=positions(attn), use_cache=False,
                       **keep).logits
        logits = logits[:, -(t + 1) : -1, :].float() / temperature  # [B, T, V]: position t predicts token t+1
    logprobs = token_logprobs(logits, rollout.completion_ids)  # [B, T]
    entropy = None
    if token_entropy:
        logp = torch.log_softmax(logits, dim=-1)
        entropy = -(logp.exp() * logp).sum(-1)  # [B, T]
    elif with_entropy:
        with torch.no_grad():
            logp = torch.log_softmax(logits, dim=-1)
            ent = -(logp.exp() * logp).sum(-1)  # [B, T]
            m = rollout.completion_mask.float()
            entropy = (ent * m).sum() / m.sum().clamp(min=1)
    return logprobs, entropy
