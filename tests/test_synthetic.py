"""The synthetic generator: an ordinary store whose rows are exactly codes @ directions, with the promised
frequencies, hierarchy, correlation and magnitudes; deterministic, and byte-identical after kill -9 + rerun."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import committed

from saepipe.cli import main
from saepipe.harvest import open_store
from saepipe.harvest.config import SynthConfig
from saepipe.harvest.synthetic import fingerprint_of, generate, make_features, open_truth

SMALL = {
    "n_features": 64,
    "d_model": 16,
    "tokens": 32768,
    "context_size": 32,
    "contexts_per_chunk": 8,
    "chunks_per_shard": 4,
    "freq_max": 0.2,
    "freq_min": 2e-4,
    "n_parents": 3,
    "children_per_parent": 2,
    "child_coverage": 0.8,
    "correlation": 0.5,
    "correlation_group_size": 4,
}


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "set"
    generate(SynthConfig(out=str(out), **SMALL), progress=False)
    return out


@pytest.fixture(scope="module")
def presence(synth):
    truth = open_truth(str(synth))
    store = open_store(truth.store_path)
    codes = truth.codes(0, store.n_contexts)
    return truth, store, codes, (codes != 0).toarray()


def test_store_is_codes_times_directions(presence):
    truth, store, codes, _ = presence
    assert store.complete and store.hooks == ["synthetic"] and store.settings["prepend_bos"] is False
    assert store.settings["model"] | {"fingerprint": None} == {
        "name": "synthetic", "fingerprint": None, "d_model": 16, "n_layers": 0, "dtype": "float32",
    }  # fmt: skip
    assert store.settings["model"]["fingerprint"] == truth.fingerprint
    assert codes.shape == (store.n_tokens, 64) and codes.nnz > 1000
    rows = np.concatenate([a for a, _ in store.iter_token_rows("synthetic")])
    addr = np.concatenate([a for _, a in store.iter_token_rows("synthetic")])
    np.testing.assert_array_equal(addr[:, 0] * 32 + addr[:, 1], np.arange(store.n_tokens))
    dense = codes.toarray().astype(np.float64)
    np.testing.assert_allclose(rows, dense @ truth.directions.astype(np.float64), atol=1e-5)
    hint = np.where(dense.max(1) > 0, dense.argmax(1) + 1, 0)
    np.testing.assert_array_equal(store.tokens().ravel(), hint)
    # A window across a shard boundary equals the same rows of the whole.
    np.testing.assert_array_equal(truth.codes(30, 70).toarray(), codes[30 * 32 : 70 * 32].toarray())


def test_frequencies_follow_the_power_law(presence):
    truth, _, _, pres = presence
    f = truth.frequencies
    roots = truth.parent < 0
    ranks = np.arange(1, 65)
    slope = np.polyfit(np.log(ranks[roots]), np.log(f[roots]), 1)[0]
    assert slope == pytest.approx(-truth.meta["alpha"]) and f[0] == 0.2 and f.max() / f.min() >= 1000
    emp = pres.mean(0)
    sigma = np.sqrt(f * (1 - f) / len(pres))
    assert (np.abs(emp - f) < 4 * sigma).all()  # marginals hold exactly in expectation, correlation included


def test_hierarchy_children_exclusive_and_nested(presence):
    truth, _, _, pres = presence
    kids = np.flatnonzero(truth.parent >= 0)
    assert len(kids) == 6
    for p in np.unique(truth.parent[kids]):
        sib = np.flatnonzero(truth.parent == p)
        assert not (pres[:, sib] & ~pres[:, [p]]).any()  # a child never fires without its parent
        assert (pres[:, sib].sum(1) <= 1).all()  # siblings are mutually exclusive
        covered = pres[pres[:, p]][:, sib].any(1).mean()
        n_par = pres[:, p].sum()
        assert abs(covered - 0.8) < 5 * np.sqrt(0.16 / n_par) + 1e-9


def test_correlation_groups_co_occur(presence):
    truth, _, _, pres = presence
    g = truth.group
    assert (g[truth.parent >= 0] == -1).all() and (g[truth.parent < 0] >= 0).all()
    # Shared events make P(a and b) ~ p_a p_b (1 + rho^2 / q), q the group's event rate: strongest where q is small.
    f = truth.frequencies
    pairs = [
        (a, b)
        for k in np.unique(g[g >= 0])
        if 0.005 <= f[g == k].max() <= 0.03
        for a in np.flatnonzero(g == k)
        for b in np.flatnonzero(g == k)
        if a < b
    ]
    a, b = max(pairs, key=lambda ab: f[ab[0]] * f[ab[1]])
    joint, indep = (pres[:, a] & pres[:, b]).mean(), pres[:, a].mean() * pres[:, b].mean()
    assert joint > 3 * indep
    free = make_features(SynthConfig(out="x", **{**SMALL, "correlation": 0.0}))
    assert (free.group == -1).all()


@pytest.mark.parametrize(("dist", "cv"), [("lognormal", 0.3), ("uniform", 0.5), ("constant", 0.3)])
def test_magnitudes_have_mean_one_and_cv(tmp_path, dist, cv):
    cfg = SynthConfig(out=str(tmp_path / "m"), magnitude=dist, magnitude_cv=cv, **{**SMALL, "tokens": 8192})
    generate(cfg, progress=False)
    v = open_truth(cfg.out).codes(0, 256).data
    assert v.mean() == pytest.approx(1, abs=0.03) and (v > 0).all()
    assert v.std() / v.mean() == pytest.approx(0 if dist == "constant" else cv, abs=0.03)


def test_deterministic_and_seeded(tmp_path, synth):
    again = tmp_path / "again"
    generate(SynthConfig(out=str(again), **SMALL), progress=False)
    assert _digest(again) == _digest(synth)
    other = make_features(SynthConfig(out="x", seed=1, **SMALL))
    assert fingerprint_of(other) != open_truth(str(synth)).fingerprint


def test_kill_and_resume_is_byte_identical(tmp_path):
    opts = {**SMALL, "tokens": 51200, "contexts_per_chunk": 4, "chunks_per_shard": 2}  # 200 shards
    ref, resumed = tmp_path / "ref", tmp_path / "resumed"
    generate(SynthConfig(out=str(ref), **opts), progress=False)
    argv = [x for k, v in opts.items() for x in ("--" + k.replace("_", "-"), str(v))]
    cmd = [sys.executable, "-m", "saepipe", "synth", "--out", str(resumed), *argv]
    kills = 0
    for kill_after in (8, 160, 480):  # committed contexts at which to kill -9 (target: 1600, far away)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while (
            proc.poll() is None and committed(resumed / "store") < kill_after and time.monotonic() < deadline
        ):
            time.sleep(0.002)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
        assert committed(resumed / "store") < 1600, "the run finished before it could be killed"
    assert kills == 3
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    assert _digest(resumed) == _digest(ref)


def test_other_settings_are_refused(synth, capsys):
    before = _digest(synth)
    argv = [x for k, v in {**SMALL, "n_features": 65}.items() for x in ("--" + k.replace("_", "-"), str(v))]
    assert main(["synth", "--out", str(synth), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "n_features" in err and "Traceback" not in err
    assert _digest(synth) == before


def test_bad_config_is_one_line(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path / "x"), "--freq-max", "0.001", "--freq-min", "0.01"]) == 2
    assert "freq_min must be at most freq_max" in capsys.readouterr().err
