"""The report directory (what `saepipe analyze` writes) and the Python API to query it.

Layout of REPORT_DIR (open formats only):

    report.json             metadata, written last (a report without it is unfinished): SAE dir and cfg,
                            store path and hook, tokens analyzed, top_k, window, histogram edges,
                            thresholds, rank_by, the ranking keys and their docs, and `ranking`: how
                            many latents the rank_by key ranks, how many of them share their score
                            with another (`tied`) and how many it cannot score (`unscored`)
    latents.parquet         one row per latent: latent, n_active, density, mean, mean_active, max,
                            dead, dense, one `score_<key>` column per ranking key, rank (by rank_by;
                            -1 for dead, ultra-dense and unscored latents), peak_token (most common top
                            token id), explanation (text) and its held-out scores (the `Scores` fields of
                            saepipe.analyze.scoring: detection_*, fuzzing_*, simulation, heldout_*), and
                            with --explainer the language model's `lm_explanation` and `lm_*` scores
    arrays.safetensors      per-latent arrays: top_values/top_contexts/top_positions [L, k] and
                            top_window_tokens [L, k, W] (see saepipe.analyze.stats); sample_* likewise
                            [L, samples] (smallest value first) and heldout_* [L, HELDOUT_SHOWN] (held-out
                            active windows, as scored); each set's activations on every window token
                            stored sparsely: <set>_acts_index (int64 flat index into [L, n, W] of every
                            slot inside a context whose value is not exactly 0, NaN included) and
                            <set>_acts_value (float32); slots outside a context (token -1) are NaN;
                            explanation_keys/predicted/share/precision [L, MAX_PATTERNS] (the n-grams of
                            saepipe.analyze.explain, key 0: none); histogram [L, bins], hist_edges
                            [bins + 1] (log10 activation), logit_top_ids/values and
                            logit_bottom_ids/values [L, n]
    vocab.json              {token id: text} for every token id the arrays mention, decoded with the
                            model's tokenizer, so readers need no tokenizer
    index.html, data/       the static dashboard (saepipe.analyze.dashboard)

`Report.open(dir).top_contexts(123)` gives latent 123's top contexts as text with the peak token marked;
`.explanation(123)` its explanation and scores.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from safetensors.numpy import load_file, save

from saepipe.analyze.contexts import WINDOW_AFTER, WINDOW_BEFORE, ContextSet
from saepipe.analyze.explain import decode_key
from saepipe.analyze.explanations import ExplanationTable, heldout_examples
from saepipe.analyze.logits import LogitEffects
from saepipe.analyze.ranking import RANKING_KEYS, classify, order, peak_tokens, scores, tied
from saepipe.analyze.scoring import Scores
from saepipe.analyze.stats import HIST_EDGES, LatentStats
from saepipe.errors import SaepipeError
from saepipe.files import write_atomic, write_bytes_atomic, write_text_atomic

MARK_OPEN, MARK_CLOSE = "«", "»"
HELDOUT_SHOWN = 8
"""Held-out active windows per latent kept in the report (for the dashboard)."""
CONTEXT_SETS = ("top", "sample", "heldout")


@dataclass(frozen=True)
class Context:
    """One token position of one latent with the window around it."""

    latent: int
    value: float
    """The latent's activation at the marked position."""
    context: int
    position: int
    tokens: list[str]
    token_ids: list[int]
    acts: list[float]
    """The latent's activation on each window token (NaN: no value, e.g. BOS)."""
    peak: int
    """Index into `tokens` of the marked position."""

    @property
    def text(self) -> str:
        """The window as text with the marked token «like this»."""
        return "".join(
            f"{MARK_OPEN}{t}{MARK_CLOSE}" if i == self.peak else t for i, t in enumerate(self.tokens)
        )


def write_report(
    out: str | Path,
    stats: LatentStats,
    effects: LogitEffects,
    decode: Any,
    meta: dict[str, Any],
    rank_by: str,
    dense_threshold: float,
    explanations: ExplanationTable | None = None,
    lm: dict[str, Any] | None = None,
) -> Path:
    """Write tables, arrays and vocab, then report.json last. `decode(ids) -> list[str]`; `lm`: the
    language-model explainer's columns (saepipe.analyze.lm_explainer.lm_columns), if it ran."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dead, dense = classify(stats, dense_threshold)
    key_scores = scores(stats, None if explanations is None else explanations.scores["score"])
    ranked = order(key_scores[rank_by], dead, dense)
    L = len(stats.n_active)
    rank_col = np.full(L, -1, dtype=np.int64)
    rank_col[ranked] = np.arange(len(ranked))
    peaks = peak_tokens(stats)
    heldout = heldout_examples(stats, HELDOUT_SHOWN)
    pattern_arrays = explanations.pattern_arrays() if explanations is not None else {}
    ids = np.unique(
        np.concatenate(
            [
                stats.top.window_tokens.ravel(),
                stats.samples.window_tokens.ravel(),
                heldout.window_tokens.ravel(),
            ]
            + [effects.top_ids.ravel(), effects.bottom_ids.ravel()]
            + [t.ravel() for t in decode_key(pattern_arrays.get("explanation_keys", np.zeros(0)))[1:]]
        )
    )
    ids = [int(i) for i in ids if i >= 0]
    vocab = dict(zip(ids, decode(ids)))
    columns: dict[str, Any] = {
        "latent": np.arange(L, dtype=np.int64),
        "n_active": stats.n_active.astype(np.int64),
        "density": stats.density.astype(np.float64),
        "mean": stats.mean.astype(np.float64),
        "mean_active": stats.act_sum / np.maximum(stats.n_active, 1),
        "max": stats.act_max.astype(np.float64),
        "dead": dead,
        "dense": dense,
        **{f"score_{k}": v for k, v in key_scores.items()},
        "rank": rank_col,
        "peak_token": np.array([_mode(row[row >= 0]) for row in peaks], dtype=np.int64),
    }
    if explanations is not None:
        columns["explanation"] = explanations.texts(lambda t: vocab.get(t, f"<{t}>") if t >= 0 else "")
        columns.update({k: v for k, v in explanations.scores.items() if k != "score"})
    columns.update(lm or {})
    write_atomic(out / "latents.parquet", lambda p: pq.write_table(pa.table(columns), str(p)))

    arrays = {
        **_context_arrays("top", stats.top),
        **_context_arrays("sample", stats.samples),
        **_context_arrays("heldout", heldout),
        **pattern_arrays,
        "histogram": stats.histogram.astype(np.int64),
        "hist_edges": HIST_EDGES.astype(np.float64),
        "logit_top_ids": effects.top_ids,
        "logit_top_values": effects.top_values,
        "logit_bottom_ids": effects.bottom_ids,
        "logit_bottom_values": effects.bottom_values,
    }
    write_bytes_atomic(
        out / "arrays.safetensors", save({k: np.ascontiguousarray(v) for k, v in arrays.items()})
    )
    text = json.dumps({str(k): v for k, v in vocab.items()}, ensure_ascii=False)
    write_text_atomic(out / "vocab.json", text)

    full = {
        **meta,
        "n_latents": L,
        "n_tokens": stats.n_tokens,
        "top_k": stats.top.values.shape[1],
        "samples": stats.samples.values.shape[1],
        "window": {"before": WINDOW_BEFORE, "after": WINDOW_AFTER},
        "rank_by": rank_by,
        "dense_threshold": dense_threshold,
        "ranking_keys": RANKING_KEYS,
        "ranking": {
            "key": rank_by,
            "ranked": len(ranked),
            "tied": tied(key_scores[rank_by], ranked),
            "unscored": int((~dead & ~dense & ~np.isfinite(key_scores[rank_by])).sum()),
        },
        "scores": Scores.names() if explanations is not None else [],
        "lm_explainer": bool(lm),
        "n_dead": int(dead.sum()),
        "n_dense": int(dense.sum()),
    }
    write_text_atomic(out / "report.json", json.dumps(full, indent=2))
    return out


def _mode(x: np.ndarray) -> int:
    if len(x) == 0:
        return -1
    vals, counts = np.unique(x, return_counts=True)
    return int(vals[np.argmax(counts)])


def _context_arrays(prefix: str, cs: ContextSet) -> dict[str, np.ndarray]:
    """A context set with its window activations stored sparsely (most window tokens are exactly 0)."""
    acts = cs.window_acts.astype(np.float32).ravel()
    # slots outside a context (token -1) have no value (NaN) by definition; the others are kept unless 0
    index = np.flatnonzero((acts != 0) & (cs.window_tokens.ravel() >= 0))
    return {
        f"{prefix}_values": cs.values.astype(np.float32),
        f"{prefix}_contexts": cs.contexts.astype(np.int64),
        f"{prefix}_positions": cs.positions.astype(np.int64),
        f"{prefix}_window_tokens": cs.window_tokens.astype(np.int32),
        f"{prefix}_acts_index": index.astype(np.int64),
        f"{prefix}_acts_value": acts[index],
    }


class Report:
    """Read access to a report directory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        manifest = self.path / "report.json"
        if not manifest.exists():
            raise SaepipeError(
                f"{path} holds no finished report (no report.json); run `saepipe analyze --out {path}`"
            )
        self.meta: dict[str, Any] = json.loads(manifest.read_text())
        self.table = pq.read_table(self.path / "latents.parquet")
        self.arrays = load_file(str(self.path / "arrays.safetensors"))
        self.vocab: dict[int, str] = {
            int(k): v for k, v in json.loads((self.path / "vocab.json").read_text()).items()
        }
        self._acts: dict[str, np.ndarray] = {}

    @classmethod
    def open(cls, path: str | Path) -> Report:
        return cls(path)

    @property
    def n_latents(self) -> int:
        return int(self.meta["n_latents"])

    def column(self, name: str) -> np.ndarray:
        return self.table.column(name).to_numpy()

    def stats(self, latent: int) -> dict[str, Any]:
        """The latent's row of latents.parquet as a dict."""
        self._check(latent)
        return {k: v[0] for k, v in self.table.slice(latent, 1).to_pydict().items()}

    def ranking(self, key: str | None = None) -> list[int]:
        """Live, not ultra-dense latents with a defined score, best first by `key` (default: rank_by)."""
        key = key or self.meta["rank_by"]
        if key not in RANKING_KEYS:
            raise SaepipeError(f"unknown ranking key {key!r}; choose one of {', '.join(RANKING_KEYS)}")
        if f"score_{key}" not in self.table.column_names:
            raise SaepipeError(
                f"report {self.path} has no {key} scores (an older saepipe wrote it); rerun analyze"
            )
        ids = order(self.column(f"score_{key}"), self.column("dead"), self.column("dense"))
        return [int(i) for i in ids]

    def window_acts(self, prefix: str) -> np.ndarray:
        """[L, n, W] float32 activations of a context set's windows, rebuilt from the sparse arrays."""
        if prefix not in self._acts and f"{prefix}_window_acts" in self.arrays:  # written before issue 14
            self._acts[prefix] = self.arrays[f"{prefix}_window_acts"]
        if prefix not in self._acts:
            tokens = self.arrays[f"{prefix}_window_tokens"]
            shape = tokens.shape
            acts = np.where(tokens.ravel() >= 0, np.float32(0), np.float32(np.nan))
            acts[self.arrays[f"{prefix}_acts_index"]] = self.arrays[f"{prefix}_acts_value"]
            self._acts[prefix] = acts.reshape(shape)
        return self._acts[prefix]

    def explanation(self, latent: int) -> dict[str, Any]:
        """{'explanation': text, 'patterns': [(n-gram, predicted, share, precision)] largest share first
        (an n-gram with context as "context ▸ token"), and every score}."""
        self._check(latent)
        row = self.stats(latent)
        out = {k: row[k] for k in ["explanation", *self.meta.get("scores", [])] if k in row}
        keys = self.arrays.get("explanation_keys")
        out["patterns"] = []
        if keys is not None:
            a = self.arrays
            js = np.flatnonzero(keys[latent])
            for j in js[np.argsort(-a["explanation_share"][latent, js], kind="stable")]:
                m, *toks = (int(v) for v in decode_key(keys[latent, j]))
                context = "".join(self.vocab.get(t, "") for t in reversed(toks[1 : m + 1]))
                text = (context + " ▸ " if m else "") + self.vocab.get(toks[0], "")
                out["patterns"].append(
                    (
                        text,
                        float(a["explanation_predicted"][latent, j]),
                        float(a["explanation_share"][latent, j]),
                        float(a["explanation_precision"][latent, j]),
                    )
                )
        return out

    @property
    def dead(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(self.column("dead"))]

    @property
    def dense(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(self.column("dense"))]

    def top_contexts(self, latent: int, n: int | None = None) -> list[Context]:
        """The latent's top activating positions, largest first, as windows with the peak token marked."""
        return self._contexts("top", latent, n)

    def sample_contexts(self, latent: int, max_quantile: float = 0.5) -> list[Context]:
        """Uniformly sampled active positions whose value lies below the sample's `max_quantile`,
        smallest first (what the latent does when weakly active)."""
        all_ = self._contexts("sample", latent, None)
        return all_[: int(np.ceil(len(all_) * max_quantile))]

    def heldout_contexts(self, latent: int) -> list[Context]:
        """Held-out windows where the latent is active (a uniform sample; what its explanation is scored
        on), in random order."""
        return self._contexts("heldout", latent, None)

    def logit_effects(self, latent: int) -> dict[str, list[tuple[str, float]]]:
        """{'promoted': [(token, effect)], 'suppressed': [...]}, strongest first."""
        self._check(latent)
        a = self.arrays
        pair = lambda ids, vals: [(self.vocab[int(i)], float(v)) for i, v in zip(ids[latent], vals[latent])]  # noqa: E731
        return {
            "promoted": pair(a["logit_top_ids"], a["logit_top_values"]),
            "suppressed": pair(a["logit_bottom_ids"], a["logit_bottom_values"]),
        }

    def histogram(self, latent: int) -> tuple[np.ndarray, np.ndarray]:
        """(edges in log10 activation [bins + 1], counts of active tokens [bins])."""
        self._check(latent)
        return self.arrays["hist_edges"], self.arrays["histogram"][latent]

    def _check(self, latent: int) -> None:
        if not 0 <= latent < self.n_latents:
            raise SaepipeError(f"latent {latent} out of range; this SAE has {self.n_latents} latents")

    def _contexts(self, prefix: str, latent: int, n: int | None) -> list[Context]:
        self._check(latent)
        a = self.arrays
        vals = a[f"{prefix}_values"][latent]
        out = []
        for j in np.flatnonzero(~np.isnan(vals))[:n]:
            toks = a[f"{prefix}_window_tokens"][latent, j]
            keep = np.flatnonzero(toks >= 0)
            out.append(
                Context(
                    latent=latent,
                    value=float(vals[j]),
                    context=int(a[f"{prefix}_contexts"][latent, j]),
                    position=int(a[f"{prefix}_positions"][latent, j]),
                    tokens=[self.vocab[int(t)] for t in toks[keep]],
                    token_ids=[int(t) for t in toks[keep]],
                    acts=[float(x) for x in self.window_acts(prefix)[latent, j][keep]],
                    peak=int(np.searchsorted(keep, WINDOW_BEFORE)),
                )
            )
        return out
