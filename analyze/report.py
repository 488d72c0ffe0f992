"""The report directory (what `saepipe analyze` writes) and the Python API to query it.

Layout of REPORT_DIR (open formats only):

    report.json             metadata, written last (a report without it is unfinished): SAE dir and cfg,
                            store path and hook, tokens analyzed, top_k, window, histogram edges,
                            thresholds, rank_by, the ranking keys and their docs
    latents.parquet         one row per latent: latent, n_active, density, mean, mean_active, max,
                            dead, dense, one `score_<key>` column per ranking key, rank (by rank_by;
                            -1 for dead and ultra-dense latents), peak_token (most common top token id)
    arrays.safetensors      per-latent arrays: top_values/top_contexts/top_positions [L, k],
                            top_window_tokens/top_window_acts [L, k, W] (see saepipe.analyze.stats),
                            sample_* likewise [L, samples] (smallest value first), histogram [L, bins],
                            hist_edges [bins + 1] (log10 activation), logit_top_ids/values and
                            logit_bottom_ids/values [L, n]
    vocab.json              {token id: text} for every token id the arrays mention, decoded with the
                            model's tokenizer, so readers need no tokenizer
    index.html, data/       the static dashboard (saepipe.analyze.dashboard)

`Report.open(dir).top_contexts(123)` gives latent 123's top contexts as text with the peak token marked.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from safetensors.numpy import load_file, save_file

from saepipe.analyze.logits import LogitEffects
from saepipe.analyze.ranking import RANKING_KEYS, classify, peak_tokens, rank
from saepipe.analyze.stats import HIST_EDGES, WINDOW_AFTER, WINDOW_BEFORE, ContextSet, LatentStats
from saepipe.errors import SaepipeError

MARK_OPEN, MARK_CLOSE = "«", "»"


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
) -> Path:
    """Write tables, arrays and vocab, then report.json last. `decode(ids) -> list[str]`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dead, dense = classify(stats, dense_threshold)
    ranked = rank(stats, rank_by, dense_threshold)
    L = len(stats.n_active)
    rank_col = np.full(L, -1, dtype=np.int64)
    rank_col[ranked] = np.arange(len(ranked))
    peaks = peak_tokens(stats)
    columns: dict[str, Any] = {
        "latent": np.arange(L, dtype=np.int64),
        "n_active": stats.n_active.astype(np.int64),
        "density": stats.density.astype(np.float64),
        "mean": stats.mean.astype(np.float64),
        "mean_active": stats.act_sum / np.maximum(stats.n_active, 1),
        "max": stats.act_max.astype(np.float64),
        "dead": dead,
        "dense": dense,
        **{f"score_{k}": fn(stats).astype(np.float64) for k, fn in RANKING_KEYS.items()},
        "rank": rank_col,
        "peak_token": np.array([_mode(row[row >= 0]) for row in peaks], dtype=np.int64),
    }
    _atomic(out / "latents.parquet", lambda p: pq.write_table(pa.table(columns), p))

    arrays = {
        **_context_arrays("top", stats.top),
        **_context_arrays("sample", stats.samples),
        "histogram": stats.histogram.astype(np.int64),
        "hist_edges": HIST_EDGES.astype(np.float64),
        "logit_top_ids": effects.top_ids,
        "logit_top_values": effects.top_values,
        "logit_bottom_ids": effects.bottom_ids,
        "logit_bottom_values": effects.bottom_values,
    }
    _atomic(
        out / "arrays.safetensors",
        lambda p: save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, p),
    )

    ids = np.unique(
        np.concatenate(
            [
                a.ravel()
                for a in (
                    stats.top.window_tokens,
                    stats.samples.window_tokens,
                    effects.top_ids,
                    effects.bottom_ids,
                )
            ]
        )
    )
    ids = [int(i) for i in ids if i >= 0]
    vocab = dict(zip((str(i) for i in ids), decode(ids)))
    _atomic(out / "vocab.json", lambda p: Path(p).write_text(json.dumps(vocab, ensure_ascii=False)))

    full = {
        **meta,
        "n_latents": L,
        "n_tokens": stats.n_tokens,
        "top_k": stats.top.values.shape[1],
        "samples": stats.samples.values.shape[1],
        "window": {"before": WINDOW_BEFORE, "after": WINDOW_AFTER},
        "rank_by": rank_by,
        "dense_threshold": dense_threshold,
        "ranking_keys": list(RANKING_KEYS),
        "n_dead": int(dead.sum()),
        "n_dense": int(dense.sum()),
    }
    _atomic(out / "report.json", lambda p: Path(p).write_text(json.dumps(full, indent=2)))
    return out


def _mode(x: np.ndarray) -> int:
    if len(x) == 0:
        return -1
    vals, counts = np.unique(x, return_counts=True)
    return int(vals[np.argmax(counts)])


def _context_arrays(prefix: str, cs: ContextSet) -> dict[str, np.ndarray]:
    return {
        f"{prefix}_values": cs.values.astype(np.float32),
        f"{prefix}_contexts": cs.contexts.astype(np.int64),
        f"{prefix}_positions": cs.positions.astype(np.int64),
        f"{prefix}_window_tokens": cs.window_tokens.astype(np.int32),
        f"{prefix}_window_acts": cs.window_acts.astype(np.float32),
    }


def _atomic(path: Path, write: Any) -> None:
    """Write to a temporary name and rename, so a reader never sees half a file."""
    tmp = path.with_name(path.name + f".partial{os.getpid()}")
    write(str(tmp))
    os.replace(tmp, path)


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
        """Live, not ultra-dense latents best first by `key` (default: the report's rank_by)."""
        key = key or self.meta["rank_by"]
        if key not in RANKING_KEYS:
            raise SaepipeError(f"unknown ranking key {key!r}; choose one of {', '.join(RANKING_KEYS)}")
        score = self.column(f"score_{key}")
        ids = np.flatnonzero(~self.column("dead") & ~self.column("dense"))
        return [int(i) for i in ids[np.lexsort((ids, -score[ids]))]]

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
                    acts=[float(x) for x in a[f"{prefix}_window_acts"][latent, j][keep]],
                    peak=int(np.searchsorted(keep, WINDOW_BEFORE)),
                )
            )
        return out
