"""The batched path of saepipe.analyze.explanations: every latent explained and scored at once.

The simple path (`explanations.explain_and_score`) loops over latents and costs ~10-40 ms each on 2
shared cores, minutes at width 16k; this path does the same arithmetic on flat arrays of (latent, ...)
rows with sorts and bincounts, so its cost is a few passes over the material. Identical choices and
scores (to float rounding) are checked by tests/test_explanations.py; `SAEPIPE_SIMPLE_STATS=1` runs the
simple path instead.

Layout: rows are grouped by latent; a (latent, n-gram) pair is made one int64 by replacing the n-gram key
(~49 bits) with its index among the distinct keys in play (`_pair`).
"""

from __future__ import annotations

import itertools

import numpy as np

from saepipe.analyze.contexts import WINDOW, WINDOW_BEFORE, ContextSet
from saepipe.analyze.explain import (
    MAX_PATTERNS,
    MIN_SHARE,
    Explanation,
    decode_key,
    f_score,
    ngram_key,
)
from saepipe.analyze.heldout import SCORED_SLOTS, Split, is_build
from saepipe.analyze.scoring import Scores


def _flat_windows(cs: ContextSet, keep) -> tuple[np.ndarray, ...]:
    """(latent, tokens [n, W], acts [n, W], contexts, positions) of the filled slots that `keep` accepts."""
    sel = (cs.contexts >= 0) & keep(cs.contexts)
    lat, j = np.nonzero(sel)
    return (
        lat,
        cs.window_tokens[lat, j].astype(np.int64),
        cs.window_acts[lat, j].astype(np.float64),
        cs.contexts[lat, j].astype(np.int64),
        cs.positions[lat, j].astype(np.int64),
    )


def _pair(lat: np.ndarray, keys: np.ndarray, universe: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(latent, key) as one int64 (-1 where the key is not in the sorted `universe`), and the hit mask."""
    i = np.searchsorted(universe, keys).clip(max=max(len(universe) - 1, 0))
    hit = (universe[i] == keys) if len(universe) else np.zeros(keys.shape, dtype=bool)
    return np.where(hit, lat * len(universe) + i, -1), hit


def _lookup(table: np.ndarray, values: np.ndarray, queries: np.ndarray, default: float = 0.0) -> np.ndarray:
    """values[j] where table[j] == query (table sorted, distinct), else `default`."""
    if len(table) == 0:
        return np.full(queries.shape, default)
    j = np.searchsorted(table, queries).clip(max=len(table) - 1)
    return np.where((table[j] == queries) & (queries >= 0), values[j], default)


def slot_keys(tokens_NW: np.ndarray, n: np.ndarray, w: np.ndarray) -> np.ndarray:
    """[len(n), 3] n-gram keys at slots (n, w) with w >= 2: `window_keys(tokens)[n, w]` without the rest."""
    t0, t1, t2 = tokens_NW[n, w], tokens_NW[n, w - 1], tokens_NW[n, w - 2]
    return np.stack([ngram_key(np.full(len(n), m), t0, t1, t2) for m in range(3)], 1)


def segment_auroc(
    lat_pos: np.ndarray,
    v_pos: np.ndarray,
    w_pos: np.ndarray,
    lat_neg: np.ndarray,
    v_neg: np.ndarray,
    w_neg: np.ndarray,
    L: int,
) -> np.ndarray:
    """Per latent AUROC of weighted positives against weighted negatives (ties one half; a weight is a
    count of equal entries, so a block of zero predictions is one entry); NaN without either class."""
    lat = np.concatenate([lat_pos, lat_neg])
    val = np.concatenate([v_pos, v_neg]).astype(np.float64)
    wp = np.concatenate([w_pos.astype(np.float64), np.zeros(len(lat_neg))])
    wn = np.concatenate([np.zeros(len(lat_pos)), w_neg.astype(np.float64)])
    order = np.lexsort((val, lat))
    lat, val, wp, wn = lat[order], val[order], wp[order], wn[order]
    # groups of equal (latent, value): negatives below the group (within the latent) and inside it
    new = np.ones(len(lat), bool)
    new[1:] = (lat[1:] != lat[:-1]) | (val[1:] != val[:-1])
    gid = np.cumsum(new) - 1
    g_neg, g_pos = np.bincount(gid, weights=wn), np.bincount(gid, weights=wp)
    g_lat = lat[new]
    cum = np.cumsum(g_neg) - g_neg  # negatives before each group, over all latents
    lat_start = np.searchsorted(g_lat, np.arange(L))
    before = cum - np.concatenate([cum, [0.0]])[lat_start][g_lat]
    u = np.bincount(g_lat, weights=g_pos * (before + g_neg / 2), minlength=L)
    n_pos = np.bincount(lat_pos, weights=w_pos, minlength=L)
    n_neg = np.bincount(lat_neg, weights=w_neg, minlength=L)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((n_pos > 0) & (n_neg > 0), u / (n_pos * n_neg), np.nan)


def _lat_tok(lat: np.ndarray, tok: np.ndarray) -> np.ndarray:
    """(latent, token) as one int64 (tokens below 2^20, as n-gram keys require)."""
    return (lat.astype(np.int64) << 21) | (tok.astype(np.int64) + 2)


def _dedup_positions(lat: np.ndarray, ctx: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Indices of the first of each (latent, context, position), ordered by (latent, context, position)."""
    bits_p, bits_c = int(pos.max(initial=1)).bit_length(), int(ctx.max(initial=1)).bit_length()
    if int(lat.max(initial=1)).bit_length() + bits_c + bits_p <= 62:
        _, first = np.unique((lat << (bits_c + bits_p)) | (ctx << bits_p) | pos, return_index=True)
        return first
    order = np.lexsort((pos, ctx, lat))
    same = (np.diff(lat[order]) == 0) & (np.diff(ctx[order]) == 0) & (np.diff(pos[order]) == 0)
    return order[np.concatenate([[True], ~same])]


def build_candidates(split: Split) -> dict[str, np.ndarray]:
    """Every latent's candidate n-grams with their build counts, as flat arrays sorted by (latent, key)."""
    s, L = split.stats, len(split.stats.n_active)
    pool_ctx = split.build_contexts
    keep = lambda c: is_build(c) & ~np.isin(c, pool_ctx)  # noqa: E731
    parts = [_flat_windows(s.top, keep), _flat_windows(s.reservoir, keep)]
    lat, toks, acts, ctx, pos = (np.concatenate(x) for x in zip(*parts))
    ok = (toks >= 0) & np.isfinite(acts)
    ok[:, : SCORED_SLOTS.start] = False
    n, w = np.nonzero(ok)
    # each (latent, context, position) once, ordered by latent then (context, position) as the simple path
    first = _dedup_positions(lat[n], ctx[n], pos[n] + w - WINDOW_BEFORE)
    n, w = n[first], w[first]
    wlat, wtok, wacts = lat[n], toks[n, w], acts[n, w]

    # pool actives in build contexts (grouped by latent, stream order within, as Split keeps them)
    b = is_build(split.code_ctx)
    prow, ppos = np.searchsorted(s.pool.contexts, split.code_ctx[b]), split.code_pos[b]
    plat, pacts = split.code_lat[b], split.code_val[b].astype(np.float64)

    # actives: per latent, window positions first, then pool positions (a stable sort by latent)
    a = np.flatnonzero(wacts > 0)
    alat = np.concatenate([wlat[a], plat])
    atok = np.concatenate([wtok[a], s.pool.tokens[prow, ppos]])
    aacts = np.concatenate([wacts[a], pacts])
    src = np.concatenate([a, -1 - np.arange(len(plat))])  # window slot index, or -1 - pool active index
    order = np.argsort(alat, kind="stable")
    alat, atok, aacts, src = alat[order], atok[order], aacts[order], src[order]
    total = np.bincount(alat, weights=aacts, minlength=L)
    # an n-gram covers no more than its last token does: drop actives whose token is below MIN_SHARE
    lt_u, lt_i = np.unique(_lat_tok(alat, atok), return_inverse=True)
    lt_mass = np.bincount(lt_i, weights=aacts, minlength=len(lt_u))
    big = lt_mass[lt_i] >= MIN_SHARE * total[alat]
    alat, aacts, src = alat[big], aacts[big], src[big]
    in_w = src >= 0
    akeys = np.empty((len(src), 3), dtype=np.int64)
    akeys[in_w] = slot_keys(toks, n[src[in_w]], w[src[in_w]])
    pi = -1 - src[~in_w]
    akeys[~in_w] = split.pool_keys[prow[pi], ppos[pi]]

    universe, idx = np.unique(akeys.ravel(), return_inverse=True)
    cand_pair, inverse = np.unique(np.repeat(alat, 3) * len(universe) + idx, return_inverse=True)
    n_act = np.bincount(inverse, minlength=len(cand_pair)).astype(np.float64)
    mass = np.bincount(inverse, weights=np.repeat(aacts, 3), minlength=len(cand_pair))
    c_lat, c_key = cand_pair // max(len(universe), 1), universe[cand_pair % max(len(universe), 1)]
    big = mass >= MIN_SHARE * total[c_lat]
    c_lat, c_key, n_act, mass = c_lat[big], c_key[big], n_act[big], mass[big]

    # matches: the pool's counts plus the latent's own scored window positions (active or not) whose
    # token ends some candidate of that latent
    n_match = np.zeros(len(c_key))
    if len(split.count_keys):
        n_match += _lookup(split.count_keys, split.counts.astype(np.float64), c_key)
    c_universe = np.unique(c_key)
    c_pair, _ = _pair(c_lat, c_key, c_universe)
    near = np.flatnonzero(np.isin(_lat_tok(wlat, wtok), _lat_tok(c_lat, decode_key(c_key)[1])))
    wpair, hit = _pair(np.repeat(wlat[near], 3), slot_keys(toks, n[near], w[near]).ravel(), c_universe)
    wp, wc = np.unique(wpair[hit], return_counts=True)
    n_match += _lookup(wp, wc.astype(np.float64), c_pair)
    return {"lat": c_lat, "key": c_key, "n_act": n_act, "mass": mass, "n_match": n_match, "total": total}


def choose_all(c: dict[str, np.ndarray], L: int) -> list[Explanation]:
    """The greedy cover of explain.choose for every latent at once, step by step.

    The tie-break of explain.choose (fewer context tokens, then more mass, then the smaller key) does not
    depend on the step, so candidates are put in that order once; each step then takes, per latent, the
    first candidate with the largest F: two segment reductions instead of a sort.
    """
    perm = np.lexsort((c["key"], -c["mass"], decode_key(c["key"])[0], c["lat"]))
    lat, key, n_act, mass, n_match = (c[k][perm] for k in ("lat", "key", "n_act", "mass", "n_match"))
    total = c["total"]
    m, a, b, cc = decode_key(key)
    counts = np.stack([n_act, mass, n_match], 1)
    N = len(key)
    starts = np.flatnonzero(np.r_[True, lat[1:] != lat[:-1]]) if N else np.zeros(0, np.int64)
    seg = np.cumsum(np.r_[True, lat[1:] != lat[:-1]]) - 1 if N else np.zeros(0, np.int64)
    seg_lat = lat[starts]
    lt_all = _lat_tok(lat, a)
    chosen = np.full((L, MAX_PATTERNS), -1, dtype=np.int64)  # candidate indices, -1 empty
    cur = np.zeros((L, 3))
    best_f = np.zeros(L)
    live = np.ones(L, bool)
    for _ in range(MAX_PATTERNS):
        rows = np.flatnonzero(live[lat])  # candidates of latents still growing (segments stay contiguous)
        if len(rows) == 0:
            break
        rl = lat[rows]
        new = cur[rl] + counts[rows]
        implied = np.zeros(len(rows), bool)
        # only a candidate ending in the same token as a chosen n-gram can replace or be implied by it
        ch_l, ch_p = np.nonzero(chosen >= 0)
        near = np.flatnonzero(
            _lookup(np.unique(lt_all[chosen[ch_l, ch_p]]), np.ones(len(ch_l)), lt_all[rows])
        )
        if len(near):
            r = rows[near]
            chc = chosen[lat[r]]  # [n, P]
            valid = chc >= 0
            chc = np.where(valid, chc, 0)
            sa, sb, sc = (x[r][:, None] == x[chc] for x in (a, b, cc))
            mr, mc = m[r][:, None], m[chc]
            # candidate is a suffix of a chosen one / a chosen one is a suffix of the candidate
            sub = valid & (mr <= mc) & sa & ((mr < 1) | sb) & ((mr < 2) | sc)
            imp = valid & (mc <= mr) & sa & ((mc < 1) | sb) & ((mc < 2) | sc)
            new[near] -= np.einsum("rp,rpk->rk", sub.astype(np.float64), counts[chc])
            implied[near] = imp.any(1)
        f = f_score(new[:, 0], new[:, 1], new[:, 2], total[rl])
        f[implied] = -1.0
        first = np.r_[True, rl[1:] != rl[:-1]]
        starts, seg = np.flatnonzero(first), np.cumsum(first) - 1
        top = np.maximum.reduceat(f, starts)
        best = np.minimum.reduceat(np.where(f == top[seg], np.arange(len(rows)), len(rows)), starts)
        seg_lat = rl[starts]  # first in tie order of each latent's best, above
        grow = top > best_f[seg_lat] + 1e-12
        live[seg_lat[~grow]] = False
        best, bl = best[grow], seg_lat[grow]
        cand = rows[best]
        chc = chosen[bl]
        valid = chc >= 0
        c0 = np.where(valid, chc, 0)
        mr, mc = m[cand][:, None], m[c0]
        sa, sb, sc = (x[cand][:, None] == x[c0] for x in (a, b, cc))
        sub = valid & (mr <= mc) & sa & ((mr < 1) | sb) & ((mr < 2) | sc)
        keep = valid & ~sub  # chosen n-grams the new one does not replace
        packed = np.full((len(bl), MAX_PATTERNS), -1, dtype=np.int64)
        k = np.cumsum(keep, 1) - 1
        rr, pp = np.nonzero(keep)
        packed[rr, k[rr, pp]] = chc[rr, pp]
        packed[np.arange(len(bl)), keep.sum(1)] = cand
        chosen[bl] = packed
        cur[bl], best_f[bl] = new[best], f[best]
        live &= (chosen >= 0).sum(1) < MAX_PATTERNS
    # each latent's n-grams sorted by key
    ck = np.where(chosen >= 0, key[chosen.clip(0)], np.iinfo(np.int64).max)
    chosen = np.take_along_axis(chosen, np.argsort(ck, 1), 1)
    sizes = (chosen >= 0).sum(1)
    flat = chosen[chosen >= 0]
    k_, p_, s_, r_ = (
        key[flat],
        mass[flat] / n_match[flat],
        mass[flat] / total[np.repeat(np.arange(L), sizes)],
        n_act[flat] / n_match[flat],
    )
    bounds = np.r_[0, np.cumsum(sizes)]
    return [
        Explanation(k_[x:y], p_[x:y], s_[x:y], r_[x:y]) if y > x else Explanation.empty()
        for x, y in itertools.pairwise(bounds)
    ]


def score_all(split: Split, explanations: list[Explanation]) -> dict[str, np.ndarray]:
    """`scoring.score_predictions` for every latent at once; returns one array per `Scores` field."""
    s, L = split.stats, len(explanations)
    sizes = np.array([len(e.keys) for e in explanations])
    e_lat = np.repeat(np.arange(L), sizes)
    e_key = np.concatenate([e.keys for e in explanations]) if sizes.sum() else np.zeros(0, np.int64)
    e_pred = np.concatenate([e.predicted for e in explanations]) if sizes.sum() else np.zeros(0)
    universe = np.unique(e_key)
    e_pair, _ = _pair(e_lat, e_key, universe)
    order = np.argsort(e_pair)
    table, table_pred = e_pair[order], e_pred[order]

    # held-out positives: reservoir windows in odd contexts. Predictions are sparse: only slots whose
    # token ends one of the latent's n-grams can match, so only those get keys and a lookup.
    plat, ptok, pacts, _, _ = _flat_windows(s.reservoir, lambda c: ~is_build(c))
    pok = (ptok >= 0) & np.isfinite(pacts)
    pok[:, : SCORED_SLOTS.start] = False
    e_last = decode_key(e_key)[1]
    ends = np.zeros(max(int(ptok.max(initial=0)), int(e_last.max(initial=0))) + 2, bool)
    ends[e_last] = True
    n, w = np.nonzero(pok & ends[ptok.clip(0)])
    near = np.isin(_lat_tok(plat[n], ptok[n, w]), _lat_tok(e_lat, e_last))
    n, w = n[near], w[near]
    pq, _ = _pair(np.repeat(plat[n], 3), slot_keys(ptok, n, w).ravel(), universe)
    m_pred = _lookup(table, table_pred, pq).reshape(-1, 3).max(1)  # at most one n-gram matches
    hit = m_pred > 0
    m_n, m_w, m_pred = n[hit], w[hit], m_pred[hit]
    win_pos = np.zeros(len(plat))
    np.maximum.at(win_pos, m_n, m_pred)

    # held-out pool windows: where each explanation matches, and where each latent is active
    n_win = len(split.pool_windows.tokens)
    wok = split.pool_windows.scored
    pool_keys = split.pool_window_keys[wok]  # [S, 3]
    slot_flat = np.flatnonzero(wok.ravel())  # flat (window * W + slot) of each scored slot
    sk = pool_keys.ravel()
    sk_order = np.argsort(sk, kind="stable")
    sk_sorted = sk[sk_order]
    lo, hi = np.searchsorted(sk_sorted, e_key), np.searchsorted(sk_sorted, e_key, side="right")
    cnt = hi - lo
    occ = np.repeat(lo - np.cumsum(cnt) + cnt, cnt) + np.arange(cnt.sum())
    o_lat, o_pred = np.repeat(e_lat, cnt), np.repeat(e_pred, cnt)
    o_flat = slot_flat[sk_order[occ] // 3]
    h = ~is_build(split.code_ctx)
    rank = np.searchsorted(split.heldout_rows, np.searchsorted(s.pool.contexts, split.code_ctx[h]))
    piece, slot = np.divmod(split.code_pos[h] - split.first, WINDOW)
    inside = piece < split.per_context
    a_lat = split.code_lat[h][inside]
    a_flat = (rank[inside] * split.per_context + piece[inside]) * WINDOW + slot[inside]
    a_val = split.code_val[h][inside].astype(np.float64)
    a_scored = wok.ravel()[a_flat]

    # detection: positives against windows inactive throughout
    act_win = np.unique(a_lat * n_win + a_flat // WINDOW)
    n_neg = n_win - np.bincount(act_win // n_win, minlength=L)
    ow = o_lat * n_win + o_flat // WINDOW
    wmax_keys, wi = np.unique(ow, return_inverse=True)
    wmax = np.full(len(wmax_keys), -np.inf)
    np.maximum.at(wmax, wi, o_pred)
    neg = ~np.isin(wmax_keys, act_win) & (wmax > 0)
    nz_lat, nz_val = wmax_keys[neg] // n_win, wmax[neg]
    n_nz = np.bincount(nz_lat, minlength=L)
    lat_neg = np.concatenate([nz_lat, np.arange(L)])
    v_neg = np.concatenate([nz_val, np.zeros(L)])
    w_neg = np.concatenate([np.ones(len(nz_lat)), n_neg - n_nz])
    det_auc = segment_auroc(plat, win_pos, np.ones(len(plat)), lat_neg, v_neg, w_neg, L)
    n_pos = np.bincount(plat, minlength=L).astype(np.float64)
    tp = np.bincount(plat, weights=win_pos > 0, minlength=L)
    det = _binary(tp, n_pos, n_nz.astype(np.float64), n_neg.astype(np.float64))

    # fuzzing: the scored slots of the positive windows (unmatched slots enter as one zero block per class)
    n_act_slots = np.bincount(plat, weights=(pok & (np.nan_to_num(pacts) > 0)).sum(1), minlength=L)
    n_all_slots = np.bincount(plat, weights=pok.sum(1), minlength=L)
    m_lat, m_act = plat[m_n], pacts[m_n, m_w]
    m_lab = m_act > 0
    f_tp = np.bincount(m_lat[m_lab], minlength=L).astype(np.float64)
    f_fp = np.bincount(m_lat[~m_lab], minlength=L).astype(np.float64)
    n_inact_slots = n_all_slots - n_act_slots
    ar = np.arange(L)
    fuzz_auc = segment_auroc(
        np.concatenate([m_lat[m_lab], ar]), np.concatenate([m_pred[m_lab], np.zeros(L)]),
        np.concatenate([np.ones(m_lab.sum()), n_act_slots - f_tp]),
        np.concatenate([m_lat[~m_lab], ar]), np.concatenate([m_pred[~m_lab], np.zeros(L)]),
        np.concatenate([np.ones((~m_lab).sum()), n_inact_slots - f_fp]), L,
    )  # fmt: skip
    fuzz = _binary(f_tp, n_act_slots, f_fp, n_inact_slots)

    # simulation: Pearson over positive-window slots and every scored pool slot (sums of both parts)
    n_pool_slots = float(wok.sum())
    f_act = np.where(pok, np.nan_to_num(pacts), 0.0)
    sums = {
        "n": n_all_slots + n_pool_slots,
        "p": np.bincount(m_lat, weights=m_pred, minlength=L)
        + np.bincount(o_lat, weights=o_pred, minlength=L),
        "pp": np.bincount(m_lat, weights=m_pred**2, minlength=L)
        + np.bincount(o_lat, weights=o_pred**2, minlength=L),
        "a": np.bincount(plat, weights=f_act.sum(1), minlength=L)
        + np.bincount(a_lat[a_scored], weights=a_val[a_scored], minlength=L),
        "aa": np.bincount(plat, weights=(f_act**2).sum(1), minlength=L)
        + np.bincount(a_lat[a_scored], weights=a_val[a_scored] ** 2, minlength=L),
    }
    both_o = o_lat * (n_win * WINDOW) + o_flat
    both_a = a_lat * (n_win * WINDOW) + a_flat
    _, io, ia = np.intersect1d(both_o, both_a, return_indices=True)
    sums["pa"] = np.bincount(m_lat, weights=m_pred * m_act, minlength=L) + np.bincount(
        o_lat[io], weights=o_pred[io] * a_val[ia], minlength=L
    )
    n = sums["n"]
    cov = sums["pa"] - sums["p"] * sums["a"] / n
    # a constant prediction (or activation) has no variance: rounding must not make it look like some
    vp = sums["pp"] - sums["p"] ** 2 / n
    vp = np.where(vp > 1e-12 * sums["pp"], vp, 0.0)
    va = sums["aa"] - sums["a"] ** 2 / n
    va = np.where(va > 1e-12 * sums["aa"], va, 0.0)
    den = np.sqrt(vp * va)
    with np.errstate(invalid="ignore", divide="ignore"):
        sim = np.where(den > 0, cov / den, 0.0)
    sim = np.where(n_pos > 0, sim, np.nan)

    parts = np.stack([2 * det_auc - 1, 2 * fuzz_auc - 1, sim])
    fin = np.isfinite(parts)
    score = np.where(fin.any(0), np.where(fin, parts, 0).sum(0) / np.maximum(fin.sum(0), 1), np.nan)
    out = {
        "score": np.where(n_pos > 0, score, np.nan),
        "detection_auroc": det_auc,
        "detection_precision": det[0],
        "detection_recall": det[1],
        "detection_balanced_accuracy": det[2],
        "fuzzing_auroc": fuzz_auc,
        "fuzzing_precision": fuzz[0],
        "fuzzing_recall": fuzz[1],
        "fuzzing_balanced_accuracy": fuzz[2],
        "simulation": sim,
        "heldout_active": n_pos,
        "heldout_inactive": np.where(n_pos > 0, n_neg, 0).astype(np.float64),
    }
    assert list(out) == Scores.names()
    for k in out:
        if k not in ("heldout_active", "heldout_inactive"):
            out[k] = np.where(n_pos > 0, out[k], np.nan)
    return out


def _binary(tp, n_pos, fp, n_neg) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), np.nan)
        recall = np.where(n_pos > 0, tp / n_pos, np.nan)
        spec = np.where(n_neg > 0, 1 - fp / n_neg, np.nan)
    return precision, recall, (recall + spec) / 2
