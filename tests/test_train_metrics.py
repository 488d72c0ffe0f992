"""Interval metrics: the means a log line reports, computed from device tensors that are read back to the host
only in `summary()` (issue 16), must equal the same means computed independently in float64 numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from saepipe.train.metrics import IntervalMetrics
from saepipe.train.saes import build_sae


def _steps(device: str, n_steps: int = 5, n: int = 48, d_in: int = 12, d_sae: int = 40):
    torch.manual_seed(0)
    sae = build_sae("topk", d_in, d_sae, k=4).to(device)
    xs = [torch.randn(n, d_in, device=device) for _ in range(n_steps)]
    with torch.no_grad():
        outs = [sae.train_forward(x) for x in xs]
    return sae, xs, outs


def _reference(xs, outs, global_counts, global_tokens):
    """float64 numpy, from the raw batches: per-step values, then their mean."""
    per_step = {"fvu": [], "mse": [], "l0": [], "loss/total": []}
    for x, out in zip(xs, outs, strict=True):
        x64, r64 = x.cpu().double().numpy(), out.recon.cpu().double().numpy()
        err = ((x64 - r64) ** 2).sum()
        per_step["fvu"].append(err / ((x64 - x64.mean(0)) ** 2).sum())
        per_step["mse"].append(((x64 - r64) ** 2).sum(-1).mean())
        per_step["l0"].append(out.fire_counts.cpu().numpy().sum() / len(x64))
        per_step["loss/total"].append(float(out.loss))
    means = {k: float(np.mean(v)) for k, v in per_step.items()}
    density = sum(c.cpu().numpy().astype(np.float64) for c in global_counts) / global_tokens
    return means, np.log10(np.maximum(density, 1e-10))


def test_interval_means_equal_an_independent_float64_reference():
    sae, xs, outs = _steps("cpu")
    counts = [out.fire_counts * 2 for out in outs]  # as if a second rank fired the same way
    metrics = IntervalMetrics(sae.d_sae)
    for x, out, c in zip(xs, outs, counts, strict=True):
        metrics.add(out, x, c, 2 * len(x))
    got = metrics.summary(sae)
    want, log10_density = _reference(xs, outs, counts, 2 * sum(len(x) for x in xs))
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-5), key
    assert got["l0"] == pytest.approx(4.0)  # TopK k=4: non-vacuous
    np.testing.assert_allclose(got["log10_density"], log10_density, rtol=1e-12)
    assert np.isfinite(got["log10_density"]).sum() > 0


def test_an_empty_interval_summarises_without_error():
    sae = build_sae("topk", 8, 16, k=2)
    got = IntervalMetrics(sae.d_sae).summary(sae)
    assert got["dead_fraction"] == 0.0 and got["log10_density"].shape == (16,)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_accumulating_on_a_gpu_never_waits_for_it():
    """CUDA's sync debug mode raises on any operation that makes the host wait for the device."""
    sae, xs, outs = _steps("cuda")
    metrics = IntervalMetrics(sae.d_sae)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x, out in zip(xs, outs, strict=True):
            metrics.add(out, x, out.fire_counts, len(x))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    got = metrics.summary(sae)
    want, _ = _reference(xs, outs, [o.fire_counts for o in outs], sum(len(x) for x in xs))
    assert got["fvu"] == pytest.approx(want["fvu"], rel=1e-4)
