"""The streaming statistics equal a brute-force computation over all of a real store's activations at once."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from saepipe.analyze.contexts import WINDOW_AFTER, WINDOW_BEFORE
from saepipe.analyze.ranking import RANKING_KEYS, rank, scores, token_concentration
from saepipe.analyze.stats import HIST_EDGES, collect_stats
from saepipe.harvest import open_store

HOOK = "blocks.1.hook_resid_post"
N_LATENTS, K, SAMPLES = 96, 7, 5


@pytest.fixture(scope="module")
def encoder(tiny_store):
    """A random relu encoder with a bias that makes latents sparse, some dead, one always on."""
    d = open_store(str(tiny_store)).d_model
    g = torch.Generator().manual_seed(0)
    W = torch.randn(d, N_LATENTS, generator=g, dtype=torch.float64) / d**0.5
    x = torch.from_numpy(open_store(str(tiny_store)).activations(HOOK)[:, 1:]).double().reshape(-1, d)
    pre = x @ W
    # thresholds at spread quantiles: densities from ~0.2% to ~50%; a few latents never fire
    q = torch.linspace(0.5, 0.998, N_LATENTS, dtype=torch.float64)
    b = -torch.quantile(pre, q, dim=0).diagonal()
    b[:3] = -pre.max(0).values[:3] - 1.0  # dead
    b[3] = -pre.min() + 1.0  # always active
    return W, b


def encode_with(W: torch.Tensor, b: torch.Tensor, dtype: torch.dtype):
    return lambda x: torch.relu(x.to(dtype) @ W.to(dtype) + b.to(dtype))


def test_streaming_stats_equal_brute_force(tiny_store, encoder):
    store = open_store(str(tiny_store))
    W, b = encoder
    stats = collect_stats(
        store, HOOK, encode_with(W, b, torch.float32), N_LATENTS, K, SAMPLES, torch.device("cpu"),
        batch_tokens=100, progress=False,
    )  # fmt: skip
    tokens = store.tokens()
    X = torch.from_numpy(store.activations(HOOK)[:, 1:]).double()  # [C, P, d], BOS excluded
    C, P, _ = X.shape
    Z = encode_with(W, b, torch.float64)(X).numpy()  # [C, P, L] float64 reference
    flat = Z.reshape(-1, N_LATENTS)

    assert stats.n_tokens == C * P
    np.testing.assert_array_equal(stats.n_active, (flat > 0).sum(0))
    np.testing.assert_allclose(stats.mean, flat.mean(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(stats.act_max, flat.max(0), rtol=1e-5, atol=1e-7)
    assert (stats.n_active[:3] == 0).all() and stats.n_active[3] == C * P  # non-vacuous classes

    hist_ref = np.stack(
        [
            np.histogram(np.clip(np.log10(col[col > 0]), HIST_EDGES[0], HIST_EDGES[-1] - 1e-9), HIST_EDGES)[0]
            for col in flat.T
        ]
    )
    assert np.abs(stats.histogram - hist_ref).sum() <= 2  # float32 vs float64 at a bin edge, at most
    np.testing.assert_array_equal(stats.histogram.sum(1), stats.n_active)

    checked = 0
    for lat in range(N_LATENTS):
        col = flat[:, lat]
        order = np.argsort(-col, kind="stable")[:K]
        order = order[col[order] > 0]
        n = len(order)
        got = stats.top
        assert np.isnan(got.values[lat, n:]).all() and (got.contexts[lat, n:] == -1).all()
        scale = max(col.max(), 1e-12)
        np.testing.assert_allclose(got.values[lat, :n], col[order], rtol=1e-5, atol=1e-5 * scale)
        for j, r in enumerate(order):
            gap = np.abs(col[order[j]] - np.delete(col, order[j])).min()
            if gap < 1e-4 * scale:
                continue  # a near-tie: float32 may legitimately order it differently
            c, p = divmod(int(r), P)
            p += 1
            assert (got.contexts[lat, j], got.positions[lat, j]) == (c, p)
            for w in range(-WINDOW_BEFORE, WINDOW_AFTER + 1):
                pos, slot = p + w, WINDOW_BEFORE + w
                tok = got.window_tokens[lat, j, slot]
                act = got.window_acts[lat, j, slot]
                if 0 <= pos < store.context_size:
                    assert tok == tokens[c, pos]
                else:
                    assert tok == -1
                if 1 <= pos < store.context_size:
                    np.testing.assert_allclose(act, Z[c, pos - 1, lat], rtol=1e-5, atol=1e-5 * scale)
                else:
                    assert np.isnan(act)
            checked += 1
    assert checked > N_LATENTS * K // 2, "top-k address check is vacuous"

    s = stats.samples
    for lat in range(N_LATENTS):
        n = min(SAMPLES, int(stats.n_active[lat]))
        vals = s.values[lat, :n]
        assert np.isnan(s.values[lat, n:]).all()
        assert (vals > 0).all() and (np.diff(vals) >= 0).all()  # active, smallest first
        ref = Z[s.contexts[lat, :n], s.positions[lat, :n] - 1, lat]
        np.testing.assert_allclose(vals, ref, rtol=1e-5, atol=1e-5 * flat[:, lat].max())
        assert len(set(zip(s.contexts[lat, :n], s.positions[lat, :n]))) == n  # without replacement


def test_token_limit_rounds_to_whole_contexts(tiny_store, encoder):
    store = open_store(str(tiny_store))
    W, b = encoder
    P = store.context_size - 1
    stats = collect_stats(
        store, HOOK, encode_with(W, b, torch.float32), N_LATENTS, K, SAMPLES, torch.device("cpu"),
        max_tokens=3 * P + 1, batch_tokens=P, progress=False,
    )  # fmt: skip
    assert stats.n_tokens == 4 * P
    assert stats.top.contexts.max() == 3


def test_token_concentration_and_ranking(tiny_store, encoder):
    store = open_store(str(tiny_store))
    W, b = encoder
    stats = collect_stats(
        store, HOOK, encode_with(W, b, torch.float32), N_LATENTS, K, SAMPLES, torch.device("cpu"),
        progress=False,
    )  # fmt: skip
    # Hand-set top contexts: latent 10 peaks always on one token, latent 11 on K different tokens.
    stats.top.values[10] = stats.top.values[11] = np.linspace(2, 1, K)
    stats.top.window_tokens[10, :, WINDOW_BEFORE] = 42
    stats.top.window_tokens[11, :, WINDOW_BEFORE] = np.arange(K)
    score = token_concentration(stats)
    assert score[10] == pytest.approx(1.0)
    v = np.linspace(2, 1, K)
    p = v / v.sum()
    assert score[11] == pytest.approx(np.exp((p * np.log(p)).sum()))
    assert score[:3].tolist() == [0, 0, 0]  # dead
    expl = np.random.default_rng(0).random(N_LATENTS)
    expl[20] = np.nan  # unscored: left out of that ranking only
    for key in RANKING_KEYS:
        order = rank(stats, key, dense_threshold=0.4, explanation=expl)
        assert not {0, 1, 2, 3} & set(order.tolist())  # dead and ultra-dense are left out
        s = scores(stats, expl)[key][order]
        assert (np.diff(s) <= 0).all() and np.isfinite(s).all()
        assert (20 in order) == (key != "explanation")


# The fast paths (saepipe.analyze.stats_fast) must give exactly the simple references' results.


def assert_identical(a, b, what: str) -> None:
    """Equal bit for bit (NaN where NaN, -0.0 where -0.0), same dtype and shape."""
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape, what
    assert np.array_equal(a.view(np.uint8), b.view(np.uint8)), what


def test_fast_stats_equal_simple_reference_bit_for_bit(tiny_store, encoder, monkeypatch):
    store = open_store(str(tiny_store))
    W, b = encoder
    enc = encode_with(W, b, torch.float32)
    args = (store, HOOK, enc, N_LATENTS, K, SAMPLES, torch.device("cpu"))
    fast = collect_stats(*args, batch_tokens=70, seed=3, progress=False, simple=False)
    simple = collect_stats(*args, batch_tokens=70, seed=3, progress=False, simple=True)
    monkeypatch.setenv("SAEPIPE_SIMPLE_STATS", "1")  # the switch selects the reference
    switched = collect_stats(*args, batch_tokens=70, seed=3, progress=False)
    for name in ("n_active", "act_sum", "act_max", "histogram"):
        assert_identical(getattr(fast, name), getattr(simple, name), name)
        assert_identical(getattr(switched, name), getattr(simple, name), name)
    for part in ("top", "samples"):
        for field in ("values", "contexts", "positions", "window_tokens", "window_acts"):
            ref = getattr(getattr(simple, part), field)
            assert_identical(getattr(getattr(fast, part), field), ref, f"{part}.{field}")
            assert_identical(getattr(getattr(switched, part), field), ref, f"{part}.{field}")
    # not vacuous: many latents saw more entries than they keep, so both merges evicted entries
    assert (simple.n_active > 3 * K).sum() > N_LATENTS // 3


def test_slotted_topk_equals_running_topk_with_ties():
    """Many updates of quantised keys (ties everywhere): same kept entries, same order, same windows."""
    from saepipe.analyze.contexts import RunningTopK, ranked_context_set
    from saepipe.analyze.stats_fast import DenseCodes, SlottedTopK

    g = torch.Generator().manual_seed(1)
    L, k, C, T = 45, 6, 3, 24  # L not a multiple of the block size; windows cross context edges
    P = T - 1
    ref = RunningTopK(L, k, torch.device("cpu"))
    fast = SlottedTopK(L, k, torch.device("cpu"), (WINDOW_BEFORE, WINDOW_AFTER))
    ties_at_threshold = evicted = 0
    for step in range(12):
        # raw latent values incl. negatives and zeros (windows copy them as they are); keys on a coarse grid
        z = torch.randint(-2, 6, (C, P, L), generator=g).float() / 2
        z[:, :, :3] = 0.0  # never active
        tokens = torch.randint(0, 100, (C, T), generator=g, dtype=torch.int32)
        rows, lat = torch.nonzero(z.view(-1, L) > 0, as_tuple=True)
        if step == 4:
            rows, lat = rows[:0], lat[:0]  # an empty update
        vals = z.view(-1, L)[rows, lat]
        # keys on a coarse grid that rises a little each step: later entries evict earlier ones, with ties
        keys = (
            vals + step / 2 if step % 2 else (torch.randint(0, 8, vals.shape, generator=g).float() + step) / 2
        )
        thr = ref.threshold[lat]
        assert torch.equal(thr, fast.threshold[lat])
        ties_at_threshold += int((keys == thr).sum())
        enter = keys > thr
        n_before = int((ref.contexts >= 0).sum())
        ref.update(rows[enter], lat[enter], keys[enter], z, tokens, 10 * step)
        vals = z.view(-1, L)[rows, lat]
        fast.update(
            rows[enter], lat[enter], keys[enter], vals[enter], DenseCodes(z.view(-1, L), P), tokens, 10 * step
        )
        n_new = int((ref.contexts >= 10 * step).sum())
        evicted += n_before + n_new - int((ref.contexts >= 0).sum())
        r, f = ref.ranked(), fast.ranked()
        for name in r:
            assert_identical(f[name].numpy(), r[name].numpy(), f"step {step} {name}")
        assert torch.equal(ref.keys, fast.keys.T)
    for ascending in (False, True):
        a, b = ranked_context_set(ref.ranked(), ascending), ranked_context_set(fast.ranked(), ascending)
        for field in ("values", "contexts", "positions", "window_tokens", "window_acts"):
            assert_identical(getattr(b, field), getattr(a, field), field)
    assert ties_at_threshold > 100 and evicted > 100, "tie and eviction cases are vacuous"
    assert (ref.contexts[:, 3:] >= 0).all() and (ref.contexts[:, :3] == -1).all()


@pytest.mark.parametrize("L", [64, 96, 50])
def test_active_entries_equal_nonzero(L):
    """Same (row, latent) pairs in the same order as nonzero(z > 0), whatever the values around them."""
    from saepipe.analyze.stats_fast import active_entries

    g = torch.Generator().manual_seed(L)
    z = torch.randn(200, L, generator=g)
    z[torch.rand(200, L, generator=g) < 0.9] = 0.0
    z[5] = torch.rand(L, generator=g) + 0.1  # a fully active row
    z[6, ::3] = -0.0
    z[7, 1] = torch.inf
    cases = {"sparse": z}
    nan = z.clone()
    nan[9, 2], nan[9, 3] = torch.nan, 1.0  # NaN beside an active entry in the same block
    cases["nan"] = nan
    cases["none active"] = -z.abs()
    for name, m in cases.items():
        got, want = active_entries(m), torch.nonzero(m > 0, as_tuple=True)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), name
    assert len(want[0]) == 0 and len(active_entries(nan)[0]) > L  # the last case is empty, the others not


def sparse_encode_with(W: torch.Tensor, b: torch.Tensor):
    """The same relu encoder returning a SparseCode, as `SAE.encode_sparse` does."""
    from saepipe.train.saes import SparseCode

    def enc(x):
        z = encode_with(W, b, torch.float32)(x)
        rows, lat = torch.nonzero(z > 0, as_tuple=True)
        return SparseCode(rows, lat, z[rows, lat], len(x))

    return enc


def test_sparse_codes_give_the_dense_reference_results(tiny_store, encoder):
    """Fast path fed sparse codes == simple reference fed dense codes: every field, reservoir and pool."""
    store = open_store(str(tiny_store))
    W, b = encoder
    kw = dict(batch_tokens=70, seed=3, progress=False, reservoir=3 * SAMPLES, pool_contexts=10)
    common = (store, HOOK)
    rest = (N_LATENTS, K, SAMPLES, torch.device("cpu"))
    fast = collect_stats(*common, sparse_encode_with(W, b), *rest, simple=False, **kw)
    simple = collect_stats(*common, encode_with(W, b, torch.float32), *rest, simple=True, **kw)
    dense_fast = collect_stats(*common, encode_with(W, b, torch.float32), *rest, simple=False, **kw)
    for name in ("n_active", "act_sum", "act_max", "histogram"):
        assert_identical(getattr(fast, name), getattr(simple, name), name)
    for part in ("top", "samples", "reservoir"):
        for field in ("values", "contexts", "positions", "window_tokens", "window_acts"):
            ref = getattr(getattr(simple, part), field)
            # values equal (a sparse lookup's 0.0 may be a dense code's -0.0), NaN where NaN
            np.testing.assert_array_equal(getattr(getattr(fast, part), field), ref, f"{part}.{field}")
            np.testing.assert_array_equal(getattr(getattr(dense_fast, part), field), ref, f"{part}.{field}")
    for field in ("contexts", "context", "position", "latent", "value"):
        assert_identical(getattr(fast.pool, field), getattr(simple.pool, field), f"pool.{field}")

    # the dashboard's samples are the first part of the reservoir (the same uniform draw)
    for lat in range(N_LATENTS):
        first = set(zip(fast.reservoir.contexts[lat, :SAMPLES], fast.reservoir.positions[lat, :SAMPLES]))
        shown = set(zip(fast.samples.contexts[lat], fast.samples.positions[lat]))
        assert first == shown
    # the pool holds every active entry of its contexts, and nothing else
    Z = encode_with(W, b, torch.float64)(torch.from_numpy(store.activations(HOOK)[:, 1:]).double()).numpy()
    pool = fast.pool
    assert len(pool.contexts) == 10 and (pool.contexts % 2 == 0).sum() == 5  # as many even as odd
    c, p, lat = np.nonzero(Z[pool.contexts] > 0)
    want = sorted(zip(pool.contexts[c].tolist(), (p + 1).tolist(), lat.tolist()))
    got = sorted(zip(pool.context.tolist(), pool.position.tolist(), pool.latent.tolist()))
    assert got == want and len(got) > 100
    ref = Z[pool.context, pool.position - 1, pool.latent]
    np.testing.assert_allclose(pool.value, ref, rtol=1e-4, atol=1e-6 * Z.max())


def test_sparse_code_windows_equal_dense_lookups():
    """SparseCodes.windows (two searches per window) == DenseCodes.windows (one lookup per slot) on every
    slot inside the context, windows at both context edges included."""
    from saepipe.analyze.stats_fast import DenseCodes, SparseCodes

    g = torch.Generator().manual_seed(5)
    C, P, L = 6, 23, 40
    z = torch.rand(C * P, L, generator=g)
    z[torch.rand(C * P, L, generator=g) < 0.85] = 0.0
    rows, lat = torch.nonzero(z > 0, as_tuple=True)
    dense, sparse = DenseCodes(z, P), SparseCodes(rows, lat, z[rows, lat], P, L, C * P)
    q_rows = torch.randint(0, C * P, (500,), generator=g)
    q_rows[:20] = torch.arange(20) % C * P  # first position of a context
    q_rows[20:40] = torch.arange(20) % C * P + P - 1  # last position
    q_lat = torch.randint(0, L, (500,), generator=g)
    d, s = dense.windows(q_rows, q_lat, 15, 4), sparse.windows(q_rows, q_lat, 15, 4)
    inside = (q_rows % P)[:, None] + torch.arange(-15, 5)
    inside = (inside >= 0) & (inside < P)
    assert torch.equal(d[inside], s[inside])
    assert (s[~inside] == 0).all() and (s[inside] > 0).sum() > 500  # not vacuous
