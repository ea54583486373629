"""Real architectures built from a config with a BPE tokenizer trained locally: a GPT-2 (pad = eos, absolute
positions) and a Qwen2 (grouped-query attention, untied embeddings, pad != eos, a chat template). Each: the
shared-prompt log-probabilities equal one forward over the full sequences (value and gradient), the warm
start trains on its tokenizer's (chat) prompts, and `grpo-lab fit` runs a few steps from the directory."""

import logging
import os
import subprocess
import sys

import pytest
import torch

from grpo_lab.model.build_model import ModelSpec, build_model, corpus_texts
from grpo_lab.model.policy import PolicyConfig, build_policy
from grpo_lab.model.tokenizer import chat_prompt
from grpo_lab.model.warmstart import WarmStartConfig, ensure_warm_start, sft_batch
from grpo_lab.rollout import generate, sequence_logprobs, shared_prompt_forward
from grpo_lab.train.tensorboard_scalars import read_scalars
from tests.conftest import CONFIGS, ROOT, full_sequence_logprobs

SAMPLE = ROOT / "examples" / "math_sample.jsonl"
ARCHS = ["gpt2", "qwen2"]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    texts = corpus_texts(SAMPLE)
    spec = dict(hidden_size=32, num_layers=2, num_heads=4, vocab_size=320, max_positions=256)
    return {a: build_model(ModelSpec(arch=a, **spec), texts, root / a) for a in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_shared_prompt_logprobs_equal_the_full_forward(arch, model_dirs, caplog):
    model, tok = build_policy(PolicyConfig(pretrained=str(model_dirs[arch])))
    prompts = ["Tom has 3 apples.", "A train has 12 cars and each car carries 64 people. How many?", "Ben"]
    if arch == "qwen2":
        prompts = [chat_prompt(tok, p) for p in prompts]
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING, logger="grpo_lab.rollout"):
        r = generate(model, tok, prompts, 4, 6, temperature=1.3)
        assert shared_prompt_forward(model, r.prompt_ids[::4], r.prompt_mask[::4], 4) is not None
        shared, _ = sequence_logprobs(model, r, temperature=1.3)
    assert not caplog.records  # the shared path ran: no fallback
    assert r.prompt_mask.sum(-1).unique().numel() == 3  # left padding of different widths
    m = r.completion_mask.float()
    full = full_sequence_logprobs(model, r, 1.3)
    torch.testing.assert_close(shared * m, full * m, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(shared * m, r.logprobs, atol=2e-5, rtol=1e-5)
    weights = torch.randn_like(m) * m

    def grads(lp):
        model.zero_grad()
        (lp * weights).sum().backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    for a, b in zip(grads(sequence_logprobs(model, r, temperature=1.3)[0]),
                    grads(full_sequence_logprobs(model, r, 1.3)), strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_warm_start_trains_the_directory_model_on_its_prompts(arch, model_dirs, tmp_path):
    policy = PolicyConfig(pretrained=str(model_dirs[arch]))
    chat = arch == "qwen2"
    cfg = WarmStartConfig(steps=25, batch_size=8, lr=3e-3, cache_dir=str(tmp_path), chat_template=chat)
    path = ensure_warm_start(policy, cfg, str(SAMPLE))
    before, tok = build_policy(policy)
    after, _ = build_policy(PolicyConfig(pretrained=str(path)))
    from grpo_lab.data.tasks import load_jsonl

    rows = load_jsonl(SAMPLE)[:8]
    if chat:
        rows = [{**q, "prompt": chat_prompt(tok, q["prompt"])} for q in rows]
    ids, mask, labels = sft_batch(tok, rows)
    assert (ids[:, 0] == tok.convert_tokens_to_ids("<|im_start|>")).all() if chat else True
    with torch.no_grad():
        ce = [m(input_ids=ids, attention_mask=mask, labels=labels).loss.item() for m in (before, after)]
    assert ce[1] < ce[0] - 0.5, ce  # the answers got more likely
    assert type(after) is type(before)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_a_short_fit_runs_from_the_directory(arch, model_dirs, tmp_path):
    chat = "true" if arch == "qwen2" else "false"
    args = [sys.executable, "-m", "grpo_lab.cli", "fit", "--config", str(CONFIGS / "smoke.yaml"),
            "--model.policy.pretrained", str(model_dirs[arch]), "--data.dataset", str(SAMPLE),
            "--data.chat_template", chat, "--model.warm_start.chat_template", chat,
            "--model.warm_start.steps", "3", "--model.warm_start.batch_size", "8",
            "--model.rewards", "[math_verify, format]", "--model.max_new_tokens", "8",
            "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--data.num_val", "4",
            "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
            "--model.warm_start.cache_dir", str(tmp_path / "ws"), "--trainer.enable_progress_bar", "false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    scalars = read_scalars(tmp_path / "runs")
    assert len(scalars["train/reward"]) == 2 and "val/acc_greedy" in scalars
    assert any((tmp_path / "ws").glob("*/config.json"))  # the warm start was built from the directory model
