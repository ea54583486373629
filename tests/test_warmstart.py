import json

from grpo_lab.model.policy import PolicyConfig
from grpo_lab.model.tokenizer import build_char_tokenizer
from grpo_lab.model.warmstart import WarmStartConfig, ensure_warm_start, sft_batch, warm_start_dir

SMALL = PolicyConfig(hidden_size=32, num_layers=1, num_heads=2)


def test_sft_batch_labels_only_the_answer():
    tok = build_char_tokenizer()
    ids, mask, labels = sft_batch(tok,
                                  [{"prompt": "1+2=", "answer": "3"}, {"prompt": "10+20=", "answer": "30"}])
    assert ids.shape == (2, 9) and mask[0].sum() == 6
    assert labels[0].tolist()[:4] == [-100] * 4 and labels[0, 4] == ids[0, 4]
    assert labels[0, 5] == tok.eos_token_id
    assert (labels[0, 6:] == -100).all()


def test_warm_start_is_cached_by_config(tmp_path):
    cfg = WarmStartConfig(steps=3, batch_size=8, cache_dir=str(tmp_path))
    p1 = ensure_warm_start(SMALL, cfg, "arithmetic")
    stamp = (p1 / "warmstart.json").stat().st_mtime_ns
    assert ensure_warm_start(SMALL, cfg, "arithmetic") == p1
    assert (p1 / "warmstart.json").stat().st_mtime_ns == stamp  # reused, not retrained
    meta = json.loads((p1 / "warmstart.json").read_text())
    assert set(meta["sampled_accuracy"]) >= {"all", "easy", "hard"}
    other = WarmStartConfig(steps=4, batch_size=8, cache_dir=str(tmp_path))
    assert warm_start_dir(SMALL, other, "arithmetic") != p1


def test_chat_template_enters_the_key_only_when_set():
    """Runs without the template keep the keys (caches, checkpoints) they had before the field existed."""
    import hashlib
    from dataclasses import asdict

    cfg = WarmStartConfig(steps=3)
    old = {"policy": SMALL.key(),
           "warm_start": {k: v for k, v in asdict(cfg).items() if k not in ("cache_dir", "chat_template")},
           "dataset": "arithmetic"}
    old_key = hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:16]
    assert warm_start_dir(SMALL, cfg, "arithmetic").name == old_key
    chat = WarmStartConfig(steps=3, chat_template=True)
    assert warm_start_dir(SMALL, chat, "arithmetic") != warm_start_dir(SMALL, cfg, "arithmetic")
