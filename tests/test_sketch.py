"""grpo_lab/probe/sketch.py: the CountSketch's dot products are unbiased, and the sketched probe agrees with
the exact one on the tiny model (same batches, same seed)."""

import dataclasses

import numpy as np
import pytest
import torch
from scipy import stats as sps

from ablations.spaces.space import ProbeSettings, get_space
from grpo_lab.probe.callback import GradientVarianceProbe
from grpo_lab.probe.core import probe
from grpo_lab.probe.gradients import batch_gradients
from grpo_lab.probe.sketch import CountSketch, hash_coefficients, hashes, polynomial_hash
from grpo_lab.variance import main
from tests.test_variance import _module, _queries


def _pair(d: int = 400) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(d, generator=gen, dtype=torch.float64)
    return x, 0.3 * x + torch.randn(d, generator=gen, dtype=torch.float64)  # x·y clearly nonzero


def test_sketch_dot_products_are_unbiased_with_the_count_sketch_variance():
    x, y = _pair()
    dim, n = 32, 600
    dots = np.array([float(r[0] @ r[1]) for r in
                     (CountSketch(dim, seed).project_rows(torch.stack([x, y])) for seed in range(n))])
    exact = float(x @ y)
    assert sps.ttest_1samp(dots, exact).pvalue > 1e-3  # mean over sketch seeds = the exact dot product
    known = (float(x @ x) * float(y @ y) + exact**2 - 2 * float((x * x) @ (y * y))) / dim
    assert 0.75 < dots.var(ddof=1) / known < 1.33  # Charikar et al.'s variance: a CountSketch indeed


def test_projecting_per_parameter_equals_projecting_the_flat_vector():
    x, _ = _pair(50)
    params = [torch.empty(10), torch.empty(3, 5), torch.empty(25)]
    parts = [x[:10], None, x[25:].view(25)]  # an unused parameter's gradient is None: zeros
    flat = torch.cat([x[:10], torch.zeros(15), x[25:]])
    sketch = CountSketch(8, seed=3)
    torch.testing.assert_close(sketch.project(parts, params).double(),
                               sketch.project_rows(flat[None])[0], rtol=1e-6, atol=1e-6)
    assert not torch.equal(CountSketch(8, seed=4).project_rows(flat[None]), sketch.project_rows(flat[None]))
    coefs = hash_coefficients(3)  # chunked hashing gives the buckets and signs of one chunk
    for whole, chunked in zip(hashes(5, 45, coefs, 8), hashes(5, 45, coefs, 8, chunk=7), strict=True):
        assert torch.equal(whole, chunked)
    assert set(hashes(0, 1000, coefs, 8)[1].tolist()) == {-1, 1}


def test_polynomial_hash_stays_in_the_field_without_overflow():
    index = torch.tensor([0, 1, 2**27, 2**31 - 2], dtype=torch.int64)
    h = polynomial_hash(index, (2**31 - 2,) * 4)
    assert bool(((h >= 0) & (h < 2**31 - 1)).all())
    p = 2**31 - 1
    expected = [(sum((p - 1) * pow(int(i), k, p) for k in range(4))) % p for i in index]
    assert h.tolist() == expected


def test_sketched_batch_gradients_are_the_projection_of_the_exact_ones():
    module = _module()
    batch = _queries()[:4]
    sketch = CountSketch(512, seed=1)
    torch.manual_seed(7)
    exact = batch_gradients(module, batch, ["reward", "rloo"], "rloo", ("difficulty", "hard"))
    torch.manual_seed(7)
    sketched = batch_gradients(module, batch, ["reward", "rloo"], "rloo", ("difficulty", "hard"),
                               sketch=sketch)
    rows = lambda g: torch.stack([*g.full.values(), *g.hard.values(), g.reference])  # noqa: E731
    assert rows(sketched).shape == (5, 512)
    expected = sketch.project_rows(rows(exact).double())
    torch.testing.assert_close(rows(sketched).double(), expected, rtol=1e-4,
                               atol=1e-5 * float(expected.abs().max()))


def test_sketched_probe_agrees_with_the_exact_probe_within_its_intervals():
    """Same module, batches and seed; d = 4096 of D = 19,648 parameters (the relative error of a squared
    norm is about √(2/d) = 2%, of a signal about √(2/d) / (K·SNR)): every SNR and SNR ratio of the
    sketched probe lies inside the exact probe's 95% interval and near its value (measured: SNR 0.0262 vs
    0.0258 and 0.0308 vs 0.0318, group_norm / mean_baseline 1.18 vs 1.24 with an interval of about
    ±45%, cosine 0.977 vs 0.964). ``reward`` is left out: from random weights its SNR is about 0 and a
    ratio to it says nothing; ``rloo`` too: a rescaled ``mean_baseline``, its ratio is 1 on every resample
    (no interval)."""
    module = _module()
    kwargs = {"estimators": ["mean_baseline", "group_norm"], "num_batches": 12,
              "prompts_per_batch": 8, "seed": 3, "n_resamples": 500}
    exact = probe(module, _queries(), **kwargs)
    sketched = probe(module, _queries(), sketch_dim=4096, **kwargs)
    for name, e in exact.items():
        s = sketched[name]
        assert e["snr_lo"] <= s["snr"] <= e["snr_hi"], (name, s["snr"], e)
        assert s["snr"] == pytest.approx(e["snr"], rel=0.1)
        assert e["snr_ratio_lo"] <= s["snr_ratio"] <= e["snr_ratio_hi"], (name, s["snr_ratio"], e)
        assert s["snr_ratio"] == pytest.approx(e["snr_ratio"], rel=0.15)
        assert abs(s["cosine"] - e["cosine"]) < 0.05
    assert exact["group_norm"]["snr_ratio"] != sketched["group_norm"]["snr_ratio"]  # it did sketch


def test_a_negative_sketch_dim_is_a_user_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--ckpt", "no.ckpt", "--sketch-dim", "-1"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == "error: --sketch-dim must be >= 0 (0: the exact probe), got -1"
    with pytest.raises(ValueError, match="sketch_dim must be >= 0"):
        probe(_module(), _queries(), num_batches=2, sketch_dim=-1)


def test_probe_settings_pass_the_sketch_and_leave_exact_studies_and_cache_keys_as_they_were():
    exact, sketched = ProbeSettings(), ProbeSettings(sketch_dim=65536)
    assert "sketch_dim" not in exact.callback("rloo", 0)["init_args"]
    init = sketched.callback("rloo", 0)["init_args"]
    assert init["sketch_dim"] == 65536
    assert GradientVarianceProbe(**init).settings(8)["sketch_dim"] == 65536  # in the probe cache's key
    assert "sketch_dim" not in GradientVarianceProbe().settings(8)  # an exact probe's key is unchanged
    space = get_space("default")
    assert "sketch_dim" not in space.describe()["probe"]  # a stored exact study still resumes
    assert dataclasses.replace(space, probe=sketched).changed_settings(space.describe()) == ["probe"]
