"""Activation norm statistics of a store: which positions, tokens and dimensions are outliers (issue 19).

Why: residual streams carry a few positions with norms many times the median (attention sinks: BOS,
document separators, some frequent tokens) and a few dimensions with huge mean magnitude. An SAE's MSE
is then mostly about those positions, which is one reason two seeds of one SAE disagree. The statistics
here make that visible (`saepipe cache info`) and give training its outlier threshold
(`saepipe train --drop-norm-above M` skips positions above M x `median`).

They are computed in one pass over the committed store, from the bytes written (`compute_norm_stats`),
when the harvest finishes (`StoreWriter.finish`), and recorded in the store metadata as
`norms[<hook>]`; a store harvested before they existed gets them computed on demand (`norm_stats`). The
pass is a pure function of the store's bytes, so a resumed or multi-process harvest records the same.

Norms are L2 norms of each position's activation vector in float32. "Ordinary" positions are all but
position 0 when it holds a prepended BOS and the positions holding one of the store's special tokens
(its tokenizer's BOS/EOS ids); the median, quantiles and outlier fractions are over ordinary positions.
Recorded, per hook:

    ordinary         number of ordinary positions
    median           median ordinary norm; quantiles {q: norm} for q in QUANTILES, and "max"
    outliers         per multiple m in MULTIPLES: fraction of ordinary positions above m x median and
                     their share of the summed squared norm
    bos              {count, median} of position 0 when a BOS was prepended
    special          per special token id in the body of contexts: {token, count, median}
    by_position      mean norm at each position 0..context_size-1 (all positions)
    outlier_positions  positions whose mean norm exceeds OUTLIER x median, with that mean
    dims             median over dimensions of mean |x|, and the TOP dimensions by mean |x|
    tokens           the TOP token ids by number of ordinary positions above OUTLIER x median:
                     {token, count, outliers, mean_norm}
"""

from __future__ import annotations

from typing import Any

import numpy as np

QUANTILES = (0.01, 0.1, 0.5, 0.9, 0.99, 0.999)
MULTIPLES = (2.0, 3.0, 4.0, 5.0)
OUTLIER = 3.0
"""The multiple of the median above which a position counts as an outlier when naming tokens/positions."""
TOP = 10


def row_norms(x: np.ndarray) -> np.ndarray:
    """L2 norm of each row of x [n, d], in float32 (the one definition loader and statistics share)."""
    x = np.asarray(x, dtype=np.float32)
    return np.sqrt(np.einsum("nd,nd->n", x, x))


def compute_norm_stats(store: Any, hook: str) -> dict[str, Any]:
    """The statistics above for one hook, from one pass over the committed contexts of `store`."""
    T, D = store.context_size, store.d_model
    first = 1 if store.settings["prepend_bos"] else 0
    special = np.asarray(store.special_token_ids, dtype=np.int64)
    vocab = int(store.settings.get("tokenizer", {}).get("vocab_size") or 0)
    ordinary, tokens_kept, bos, special_norms, special_tokens = [], [], [], [], []
    by_position = np.zeros(T, np.float64)
    abs_sum = np.zeros(D, np.float64)
    n_contexts = 0
    for a, b in store.chunk_bounds():
        acts = store.activations(hook, a, b)  # [n, T, D]
        toks = store.tokens(a, b)[:, first:].ravel()
        norms = row_norms(acts.reshape(-1, D)).reshape(b - a, T)
        by_position += norms.sum(0, dtype=np.float64)
        n_contexts += b - a
        if first:
            bos.append(norms[:, 0])
        body = norms[:, first:].ravel()
        is_special = np.isin(toks, special)
        special_norms.append(body[is_special])
        special_tokens.append(toks[is_special])
        ordinary.append(body[~is_special])
        tokens_kept.append(toks[~is_special])
        rows = acts[:, first:].reshape(-1, D)[~is_special]
        abs_sum += np.abs(rows.astype(np.float32)).sum(0, dtype=np.float64)
    norms = np.concatenate(ordinary) if ordinary else np.zeros(0, np.float32)
    toks = np.concatenate(tokens_kept) if tokens_kept else np.zeros(0, np.int64)
    if len(norms) == 0:
        return {"ordinary": 0}
    median = float(np.median(norms))
    sq = norms.astype(np.float64) ** 2
    outliers = [
        {
            "multiple": m,
            "fraction": float((norms > m * median).mean()),
            "sq_norm_share": float(sq[norms > m * median].sum() / sq.sum()),
        }
        for m in MULTIPLES
    ]
    mean_pos = by_position / max(n_contexts, 1)
    mean_abs = abs_sum / len(norms)
    top_dims = np.argsort(-mean_abs, kind="stable")[:TOP]
    high = norms > OUTLIER * median
    n_tok = max(vocab, int(toks.max()) + 1)
    count = np.bincount(toks, minlength=n_tok)
    n_high = np.bincount(toks[high], minlength=n_tok)
    norm_sum = np.bincount(toks, weights=norms.astype(np.float64), minlength=n_tok)
    top_tokens = [t for t in np.argsort(-n_high, kind="stable")[:TOP] if n_high[t] > 0]
    sp_norms = np.concatenate(special_norms)
    sp_toks = np.concatenate(special_tokens)
    return {
        "ordinary": len(norms),
        "median": median,
        "quantiles": {str(q): float(np.quantile(norms, q)) for q in QUANTILES} | {"max": float(norms.max())},
        "outliers": outliers,
        "bos": {"count": int(sum(len(x) for x in bos)), "median": float(np.median(np.concatenate(bos)))}
        if bos
        else None,
        "special": [
            {
                "token": int(t),
                "count": int((sp_toks == t).sum()),
                "median": float(np.median(sp_norms[sp_toks == t])),
            }
            for t in np.unique(sp_toks)
        ],
        "by_position": [float(v) for v in mean_pos],
        "outlier_positions": [
            {"position": int(p), "mean_norm": float(mean_pos[p])}
            for p in np.flatnonzero(mean_pos > OUTLIER * median)
        ],
        "dims": {
            "median_mean_abs": float(np.median(mean_abs)),
            "top": [{"dim": int(d), "mean_abs": float(mean_abs[d])} for d in top_dims],
        },
        "tokens": [
            {
                "token": int(t),
                "count": int(count[t]),
                "outliers": int(n_high[t]),
                "mean_norm": float(norm_sum[t] / count[t]),
            }
            for t in top_tokens
        ],
    }


def norm_stats(store: Any, hook: str) -> dict[str, Any]:
    """The store's recorded statistics for `hook`, or (for a store harvested before they were recorded,
    or one still being written) the same computed now."""
    recorded = (store.meta.get("norms") or {}).get(hook)
    if recorded is not None:
        return recorded
    cache = store.__dict__.setdefault("_norm_stats", {})
    if hook not in cache:
        cache[hook] = compute_norm_stats(store, hook)
    return cache[hook]


def median_norm(store: Any, hook: str) -> float:
    """Median norm of the ordinary positions of `hook` (the unit of `--drop-norm-above`)."""
    from saepipe.errors import SaepipeError

    stats = norm_stats(store, hook)
    if not stats.get("ordinary"):
        raise SaepipeError(f"store {store.path} has no ordinary positions to take a median norm from")
    return float(stats["median"])


def describe(stats: dict[str, Any], decode: Any = None) -> list[str]:
    """Human-readable lines for `saepipe cache info`; `decode(ids) -> texts` names tokens when given."""
    if not stats.get("ordinary"):
        return ["no ordinary positions"]
    name = (lambda t: repr(decode([t])[0])) if decode else (lambda t: f"token {t}")
    q = stats["quantiles"]
    lines = [
        f"norms of {stats['ordinary']:,} ordinary positions: median {stats['median']:.1f}, 1% {q['0.01']:.1f}, "
        f"99% {q['0.99']:.1f}, 99.9% {q['0.999']:.1f}, max {q['max']:.1f}",
        "outliers: "
        + "; ".join(
            f"> {o['multiple']:g}x median: {o['fraction']:.2%} of positions, {o['sq_norm_share']:.1%} of squared norm"
            for o in stats["outliers"]
        ),
    ]
    if stats.get("bos"):
        lines.append(
            f"BOS at position 0: median norm {stats['bos']['median']:.1f} ({stats['bos']['count']:,} positions)"
        )
    for s in stats["special"]:
        lines.append(
            f"special {name(s['token'])} in context bodies: {s['count']:,} positions, median norm {s['median']:.1f}"
        )
    if stats["outlier_positions"]:
        lines.append(
            "outlier positions (mean norm): "
            + ", ".join(f"{p['position']} ({p['mean_norm']:.1f})" for p in stats["outlier_positions"])
        )
    d = stats["dims"]
    lines.append(
        f"dimensions by mean |x| (median {d['median_mean_abs']:.2f}): "
        + ", ".join(f"{t['dim']} ({t['mean_abs']:.1f})" for t in d["top"][:5])
    )
    if stats["tokens"]:
        lines.append(
            f"tokens with most positions above {OUTLIER:g}x median: "
            + ", ".join(
                f"{name(t['token'])} ({t['outliers']:,} of {t['count']:,}, mean {t['mean_norm']:.0f})"
                for t in stats["tokens"]
            )
        )
    return lines
