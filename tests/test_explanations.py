"""Explanations scored on held-out contexts find what was planted.

A hand-built store (real tokens of the default tokenizer, activations written with StoreWriter) and a
hand-set ReLU SAE (identity encoder, written as a real SAE dir) plant three kinds of latents:

- exact token detectors: active on every occurrence of one token;
- context-dependent detectors: active on a token only right after a given other token (which also occurs
  without it);
- noise: active at random positions.

`saepipe analyze` must rank every detector above every noise latent, name the context of the
context-dependent ones, and give scores equal to a hand computation; the batched path must equal the
simple one, and both must equal a brute-force recomputation from the raw store.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import write_relu_sae

from saepipe.analyze.contexts import WINDOW, WINDOW_BEFORE
from saepipe.analyze.explain import decode_key
from saepipe.analyze.explanations import explain_and_score, explain_and_score_fast
from saepipe.analyze.heldout import is_build
from saepipe.analyze.report import Report
from saepipe.analyze.stats import collect_stats
from saepipe.cli import main
from saepipe.harvest import open_store
from saepipe.harvest.store import StoreWriter

C, T, D = 160, 64, 64  # contexts, context size (with BOS), d_model of the tiny model
N_TOKEN, N_CONTEXT, N_NOISE = 8, 6, 12
HOOK = "blocks.0.hook_resid_post"
WORDS = [" apple", " river", " stone", " cloud", " green", " horse", " table", " bread", " music", " light",
         " water", " night", " paper", " dream", " house", " storm", " glass", " field", " sword", " crown",
         " honey", " ocean", " tiger", " candle", " winter", " silver", " garden", " window", " mirror",
         " forest", " thunder", " castle"]  # fmt: skip


@pytest.fixture(scope="module")
def planted(tmp_path_factory, tiny_store, tiny_model_dir):
    """(store path, SAE dir, tokens [C, T], codes [C, T, L] (0 at BOS), plan)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = [tok.encode(w, add_special_tokens=False) for w in WORDS]
    words = [i[0] for i in ids if len(i) == 1]
    assert len(words) >= N_TOKEN + 2 * N_CONTEXT + 4, "too few single-token words"
    targets = words[:N_TOKEN]  # exact token detectors
    ctx_tok = words[N_TOKEN : N_TOKEN + N_CONTEXT]  # fire on these ...
    ctx_prev = words[N_TOKEN + N_CONTEXT : N_TOKEN + 2 * N_CONTEXT]  # ... only right after these
    rng = np.random.default_rng(0)
    tokens = rng.choice(words, size=(C, T)).astype(np.int32)
    for j in range(N_CONTEXT):  # make "prev tok" pairs common, and "tok" common without "prev" too
        c, p = rng.integers(0, C, 60), rng.integers(2, T - 1, 60)
        tokens[c, p - 1], tokens[c, p] = ctx_prev[j], ctx_tok[j]
    tokens[:, 0] = tok.bos_token_id
    L = D
    Z = np.zeros((C, T, L), dtype=np.float32)
    prev = np.concatenate([np.full((C, 1), -1), tokens[:, :-1]], 1)
    mag = lambda shape: rng.uniform(0.5, 2.0, shape)  # noqa: E731
    for j, t in enumerate(targets):
        # the first two fire with a constant magnitude: their scores are computable by hand
        Z[..., j] = np.where(tokens == t, 1.0 if j < 2 else mag(tokens.shape), 0)
    for j in range(N_CONTEXT):
        on = (tokens == ctx_tok[j]) & (prev == ctx_prev[j])
        Z[..., N_TOKEN + j] = np.where(on, 2.0 if j == 0 else mag(tokens.shape), 0)
    for j in range(N_NOISE):
        Z[..., N_TOKEN + N_CONTEXT + j] = np.where(rng.random(tokens.shape) < 0.03, mag(tokens.shape), 0)
    Z[:, 0] = 0
    x = Z[..., :D].copy()  # identity SAE: the store holds the codes themselves
    x[:, 0] = rng.normal(size=(C, D))  # BOS rows are never encoded

    root = tmp_path_factory.mktemp("planted")
    settings = dict(open_store(str(tiny_store)).settings)
    settings.update(
        hooks=[HOOK], context_size=T, n_contexts_target=C, contexts_per_chunk=8, chunks_per_shard=2
    )
    w = StoreWriter(str(root / "store"), settings)
    for s in range(0, C, 16):
        w.write_shard(s, tokens[s : s + 16], {HOOK: x[s : s + 16].astype(settings["dtype"])}, 1)
    w.finish()
    eye = np.eye(D, dtype=np.float32)
    sae = write_relu_sae(root / "sae", root / "store", HOOK, eye, np.zeros(D) - 1e-4, eye, np.zeros(D))
    plan = {"targets": targets, "ctx_tok": ctx_tok, "ctx_prev": ctx_prev}
    Z = np.maximum(Z - 1e-4, 0)  # the SAE's encoding: relu(x - 1e-4)
    Z[:, 0] = 0
    return root / "store", sae, tokens, Z, plan


@pytest.fixture(scope="module")
def report(planted, tmp_path_factory):
    store, sae, *_ = planted
    out = tmp_path_factory.mktemp("planted_report") / "report"
    args = ["analyze", "--sae", str(sae), "--store", str(store), "--out", str(out), "--device", "cpu",
            "--score-samples", "48", "--score-contexts", "64", "--batch-tokens", "256", "--no-dashboard"]  # fmt: skip
    assert main(args) == 0
    return Report.open(out)


def test_detectors_rank_above_noise_and_name_their_context(report, planted, tiny_model_dir):
    *_, plan = planted
    score = report.column("score_explanation")
    detectors = np.arange(N_TOKEN + N_CONTEXT)
    noise = np.arange(N_TOKEN + N_CONTEXT, N_TOKEN + N_CONTEXT + N_NOISE)
    assert score[detectors].min() > score[noise].max() + 0.3, (score[detectors], score[noise])
    ranking = report.ranking()
    assert set(ranking[: len(detectors)]) == set(detectors.tolist())
    assert report.meta["rank_by"] == "explanation" and report.meta["ranking"]["ranked"] == len(ranking)

    for j, t in enumerate(plan["targets"]):
        keys = report.arrays["explanation_keys"][j]
        m, t0, _, _ = decode_key(keys[keys != 0])
        assert (m == 0).any() and t in t0[m == 0], f"token detector {j} is not explained by its token"
    for j in range(N_CONTEXT):
        lat = N_TOKEN + j
        keys = report.arrays["explanation_keys"][lat]
        m, t0, t1, _ = decode_key(keys[keys != 0])
        main_ = np.argmax(report.arrays["explanation_share"][lat][keys != 0])
        assert m[main_] >= 1 and t0[main_] == plan["ctx_tok"][j] and t1[main_] == plan["ctx_prev"][j]
        text = report.stats(lat)["explanation"]
        prev_text, tok_text = report.vocab[plan["ctx_prev"][j]], report.vocab[plan["ctx_tok"][j]]
        assert f'"{tok_text}" after' in text and prev_text in text, text


def test_scores_equal_a_hand_computation(report):
    """Constant-magnitude detectors: the explanation predicts exactly their value, matches exactly where
    they fire, so every measure is perfect and the score is exactly 1; the rest are below 1."""
    for lat, value in ((0, 1.0 - 1e-4), (1, 1.0 - 1e-4), (N_TOKEN, 2.0 - 1e-4)):
        e = report.explanation(lat)
        assert len(e["patterns"]) == 1
        _, predicted, share, precision = e["patterns"][0]
        assert predicted == pytest.approx(value, rel=1e-6) and share == 1.0 and precision == 1.0
        for k in ("detection_auroc", "fuzzing_auroc", "detection_precision", "detection_recall",
                  "fuzzing_precision", "fuzzing_recall", "simulation"):  # fmt: skip
            assert e[k] == pytest.approx(1.0, abs=1e-9), (lat, k, e[k])
        assert report.column("score_explanation")[lat] == pytest.approx(1.0, abs=1e-9)
    varying = report.column("simulation")[2:N_TOKEN]  # magnitudes vary: detection perfect, simulation not
    assert (varying < 0.999).all() and (report.column("detection_auroc")[2:N_TOKEN] == 1).all()


def brute_force_scores(stats, expl, tokens, Z, lat) -> dict[str, float]:
    """Detection, fuzzing and simulation of one latent straight from the raw store and codes, with
    pairwise comparisons, explicit n-gram matching and np.corrcoef."""
    pats = [(int(m), int(t0), int(t1), int(t2), p) for (m, t0, t1, t2), p in
            zip(zip(*decode_key(expl.keys)), expl.predicted)]  # fmt: skip

    def window(c, center):
        pos = center + np.arange(-WINDOW_BEFORE, WINDOW - WINDOW_BEFORE)
        inside = (pos >= 0) & (pos < T)
        toks = np.where(inside, tokens[c, pos.clip(0, T - 1)], -1)
        acts = np.where(inside & (pos >= 1), Z[c, pos.clip(0, T - 1), lat], np.nan)
        return toks, acts

    def predict(toks):
        out = np.zeros(WINDOW)
        for s in range(2, WINDOW):
            for m, t0, t1, t2, p in pats:
                if toks[s] == t0 and (m < 1 or toks[s - 1] == t1) and (m < 2 or toks[s - 2] == t2):
                    out[s] = p
        return out

    def auc(pos, neg):
        if not len(pos) or not len(neg):
            return np.nan
        return float(np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg]))

    res = stats.reservoir
    pos = [window(c, p) for c, p in zip(res.contexts[lat], res.positions[lat]) if c >= 0 and c % 2]
    pool = stats.pool.contexts[stats.pool.contexts % 2 == 1]
    negs = [window(c, 1 + WINDOW * k + WINDOW_BEFORE) for c in pool for k in range((T - 1) // WINDOW)]
    det_pos, det_neg, tok_p, tok_a, sim_p, sim_a = [], [], [], [], [], []
    for toks, acts in pos:
        pr, ok = predict(toks), (toks >= 0) & np.isfinite(acts)
        ok[:2] = False
        det_pos.append(pr[ok].max())
        tok_p += pr[ok].tolist()
        tok_a += acts[ok].tolist()
    for toks, acts in negs:
        pr = predict(toks)
        if not (acts > 0).any():
            det_neg.append(pr[2:].max())
        sim_p += pr[2:].tolist()
        sim_a += acts[2:].tolist()
    tok_p, tok_a = np.array(tok_p), np.array(tok_a)
    lab = tok_a > 0
    return {
        "detection_auroc": auc(det_pos, det_neg),
        "detection_recall": float(np.mean(np.array(det_pos) > 0)),
        "fuzzing_auroc": auc(tok_p[lab], tok_p[~lab]),
        "fuzzing_recall": float(np.mean(tok_p[lab] > 0)),
        "simulation": float(np.corrcoef(np.r_[tok_p, sim_p], np.r_[tok_a, sim_a])[0, 1]),
        "heldout_inactive": len(det_neg),
    }


@pytest.fixture(scope="module")
def small_stats(planted):
    store, sae_dir, *_ = planted
    from saepipe.train import load_sae

    sae = load_sae(str(sae_dir), torch.device("cpu"))
    return collect_stats(
        open_store(str(store)), HOOK, sae.encode_sparse, D, 10, 8, torch.device("cpu"),
        batch_tokens=200, progress=False, reservoir=40, pool_contexts=40,
    )  # fmt: skip


def test_batched_path_equals_simple_path_and_brute_force(planted, small_stats):
    _, _, tokens, Z, _ = planted
    fast = explain_and_score_fast(small_stats, 1)
    simple = explain_and_score(small_stats, 1)
    L = len(small_stats.n_active)
    for i in range(L):
        a, b = fast.explanations[i], simple.explanations[i]
        assert np.array_equal(a.keys, b.keys), i
        np.testing.assert_allclose(a.predicted, b.predicted, rtol=1e-12)
    for k, v in simple.scores.items():
        np.testing.assert_allclose(fast.scores[k], v, rtol=1e-9, atol=1e-12, equal_nan=True, err_msg=k)
    checked = 0
    for lat in range(N_TOKEN + N_CONTEXT + N_NOISE):
        want = brute_force_scores(small_stats, simple.explanations[lat], tokens, Z, lat)
        for k, v in want.items():
            assert simple.scores[k][lat] == pytest.approx(v, abs=1e-9, nan_ok=True), (lat, k)
        checked += np.isfinite(want["detection_auroc"]) and 0 < want["detection_auroc"] < 1
    assert checked >= 5, "brute-force check only saw perfect or undefined detection scores"
    assert (simple.scores["heldout_active"][: N_TOKEN + N_CONTEXT + N_NOISE] > 3).all()


def test_explanations_are_built_without_held_out_contexts(planted, small_stats):
    """Changing every held-out (odd) context's codes changes no explanation."""
    import copy

    base = explain_and_score_fast(small_stats, 1)
    moved = copy.deepcopy(small_stats)
    for cs in (moved.top, moved.reservoir):
        odd = (cs.contexts >= 0) & ~is_build(cs.contexts)
        cs.window_acts[odd] *= 3.0
        cs.window_tokens[odd] = cs.window_tokens[odd][..., ::-1]
    odd = ~is_build(moved.pool.context)
    moved.pool.value[odd] *= 5.0
    again = explain_and_score_fast(moved, 1)
    for a, b in zip(base.explanations, again.explanations):
        assert np.array_equal(a.keys, b.keys) and np.allclose(a.predicted, b.predicted)
    assert not np.allclose(base.scores["simulation"], again.scores["simulation"], equal_nan=True)


def test_report_stores_window_activations_sparsely(report, planted):
    Z = planted[3]
    arrays = report.arrays
    for prefix in ("top", "sample", "heldout"):
        n_slots = arrays[f"{prefix}_window_tokens"].size
        assert len(arrays[f"{prefix}_acts_index"]) < n_slots / 3  # most window tokens are 0
    checked = 0
    for lat in range(N_TOKEN + N_CONTEXT):
        for ctx in report.top_contexts(lat) + report.heldout_contexts(lat):
            first = ctx.position - ctx.peak
            want = Z[ctx.context, first : first + len(ctx.tokens), lat]
            got = np.array(ctx.acts)
            assert np.array_equal(np.isnan(got), np.arange(first, first + len(got)) == 0)
            np.testing.assert_allclose(got[~np.isnan(got)], want[~np.isnan(got)], rtol=1e-6)
            checked += (want > 0).sum() > 0
    assert checked > 50
    assert json.loads((report.path / "report.json").read_text())["ranking"]["tied"] >= 0
