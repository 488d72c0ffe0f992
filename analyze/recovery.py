"""Ground-truth recovery: score an SAE trained on a synthetic set against its true features (issue 5).

Why: on data with known features we can ask what reconstruction and sparsity cannot answer: which true
features an SAE found, which rare ones it lost, which it spread across several latents, and where a child
latent absorbed its parent. Every metric is a pure function of arrays (true directions [n, d], decoder
[d_sae, d], true codes CSR [N, n], latent activations [N, d_sae]); `RecoveryAccumulator` sums the only
token-dependent quantities (counts) over streamed batches, so a store of any size is scored in one pass.

Metrics (per true feature j, per latent i):
- direction: cos(i, j) between decoder row i and direction j; best_cos[j] = max_i (its mean is the MMCS,
  Sharkey et al. 2022); matched_cos[j] from the one-to-one Hungarian assignment maximising total cosine
  (0 for features left unmatched), its mean the matched score;
- firing: co[i, j] = tokens where latent i fires (activation > 0) and feature j is present; precision =
  co / fires_i, recall = co / present_j, F1; per latent its best-F1 feature, per feature its best F1;
- spread[j] (splitting): latents with cos(i, j) >= split_cos whose firing lies mostly on j
  (precision >= split_precision); 1 is one latent per feature, 2 or more is a split;
- MCC (SynthSAEBench; O'Neill et al. 2024): the mean |cos| over the one-to-one Hungarian matching of
  latents to features (min(n, d_sae) pairs);
- F1 as SynthSAEBench reports it: each latent a classifier of its best-|cos| feature, averaged over
  latents that fire;
- absorption (Chanin et al. 2024) per parent feature: how often its latent is silent where a child of it
  is present, and which latents fire in its place (analyze/absorption.py);
- by frequency: the features cut into `n_bins` equal-count bins by true frequency (most frequent first),
  each with its means of the above.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from scipy.optimize import linear_sum_assignment

from saepipe.analyze.absorption import AbsorptionAccumulator, absorption_report
from saepipe.analyze.absorption_page import write_absorption_page
from saepipe.analyze.config import RecoveryConfig
from saepipe.errors import SaepipeError

Latents = np.ndarray | sp.spmatrix
"""Latent activations [N, d_sae], dense or scipy sparse; a latent fires where its value is > 0."""


def cosine_matrix(directions: np.ndarray, decoder: np.ndarray) -> np.ndarray:
    """cos [n, d_sae] between true directions [n, d] and decoder rows [d_sae, d] (zero rows give 0)."""
    a = directions / np.maximum(np.linalg.norm(directions, axis=1, keepdims=True), 1e-12)
    b = decoder / np.maximum(np.linalg.norm(decoder, axis=1, keepdims=True), 1e-12)
    return a.astype(np.float64) @ b.astype(np.float64).T


@dataclass(frozen=True)
class DirectionMatch:
    best_latent: np.ndarray  # [n] int64
    best_cos: np.ndarray  # [n]
    matched_latent: np.ndarray  # [n] int64, -1 where the assignment left the feature unmatched
    matched_cos: np.ndarray  # [n], 0 where unmatched
    mmcs: float
    """Mean over true features of the best cosine."""
    matched_score: float
    """Mean over true features of the one-to-one matched cosine (unmatched count as 0)."""
    mcc: float
    """SynthSAEBench's MCC: mean |cos| over the one-to-one matching that maximises total |cos|."""


def match_directions(cos: np.ndarray) -> DirectionMatch:
    """Best-cosine and Hungarian (one-to-one, maximum total cosine) matches of features to latents."""
    n = cos.shape[0]
    best_latent = cos.argmax(axis=1)
    best_cos = cos[np.arange(n), best_latent]
    rows, cols = linear_sum_assignment(cos, maximize=True)
    matched_latent = np.full(n, -1)
    matched_cos = np.zeros(n)
    matched_latent[rows] = cols
    matched_cos[rows] = cos[rows, cols]
    abs_rows, abs_cols = linear_sum_assignment(np.abs(cos), maximize=True)
    mcc = float(np.abs(cos[abs_rows, abs_cols]).mean()) if len(abs_rows) else 0.0
    return DirectionMatch(
        best_latent,
        best_cos,
        matched_latent,
        matched_cos,
        float(best_cos.mean()),
        float(matched_cos.mean()),
        mcc,
    )


@dataclass
class FiringCounts:
    """Token counts, additive over batches."""

    n_tokens: int
    latent_fires: np.ndarray  # [d_sae] int64
    feature_present: np.ndarray  # [n] int64
    co: sp.csr_matrix  # [d_sae, n] int64: latent fires and feature present on the same token

    def __add__(self, other: FiringCounts) -> FiringCounts:
        return FiringCounts(
            self.n_tokens + other.n_tokens,
            self.latent_fires + other.latent_fires,
            self.feature_present + other.feature_present,
            (self.co + other.co).tocsr(),
        )


def firing_counts(codes: sp.csr_matrix, latent_acts: Latents) -> FiringCounts:
    """Counts over one batch: codes CSR [N, n] (nonzero = present), latent_acts [N, d_sae] (> 0 = fires)."""
    fires = sp.csr_matrix(latent_acts > 0).astype(np.int64)
    present = sp.csr_matrix(codes != 0).astype(np.int64)
    return FiringCounts(
        codes.shape[0],
        np.asarray(fires.sum(axis=0)).ravel(),
        np.asarray(present.sum(axis=0)).ravel(),
        (fires.T @ present).tocsr(),
    )


@dataclass(frozen=True)
class FiringScores:
    latent_feature: np.ndarray  # [d_sae] int64: best-F1 feature, -1 for a latent that never co-fires
    latent_precision: np.ndarray  # [d_sae] against that feature
    latent_recall: np.ndarray  # [d_sae]
    latent_f1: np.ndarray  # [d_sae]
    feature_best_f1: np.ndarray  # [n]: best F1 of any latent against the feature
    feature_best_f1_latent: np.ndarray  # [n] int64, -1 if none
    precision: sp.csr_matrix  # [d_sae, n], entries where co > 0


def _best_per(idx: np.ndarray, score: np.ndarray, size: int) -> np.ndarray:
    """For each value v in [0, size): the position in `idx` of v's highest score, -1 where v is absent."""
    best = np.full(size, -1)
    if len(idx):
        order = np.lexsort((-score, idx))  # by index, then highest score first
        first = np.r_[True, idx[order][1:] != idx[order][:-1]]
        best[idx[order][first]] = order[first]
    return best


def _take(values: np.ndarray, pos: np.ndarray, fill: float) -> np.ndarray:
    return np.where(pos >= 0, values[np.maximum(pos, 0)], fill) if len(values) else np.full(len(pos), fill)


def firing_scores(counts: FiringCounts) -> FiringScores:
    """Precision, recall and F1 of every co-firing (latent, feature) pair, and the best per latent/feature."""
    co = counts.co.tocoo()
    i, j, c = co.row.astype(np.int64), co.col.astype(np.int64), co.data.astype(np.float64)
    prec = c / counts.latent_fires[i]
    rec = c / counts.feature_present[j]
    f1 = 2 * c / (counts.latent_fires[i] + counts.feature_present[j])
    m, n = counts.co.shape
    lb, fb = _best_per(i, f1, m), _best_per(j, f1, n)
    return FiringScores(
        latent_feature=_take(j, lb, -1).astype(np.int64),
        latent_precision=_take(prec, lb, 0.0),
        latent_recall=_take(rec, lb, 0.0),
        latent_f1=_take(f1, lb, 0.0),
        feature_best_f1=_take(f1, fb, 0.0),
        feature_best_f1_latent=_take(i, fb, -1).astype(np.int64),
        precision=sp.csr_matrix((prec, (i, j)), shape=(m, n)),
    )


def cos_matched_f1(counts: FiringCounts, cos: np.ndarray) -> dict[str, np.ndarray]:
    """Each latent as a classifier of its best-|cos| feature: feature [d_sae], precision, recall, F1."""
    feature = np.abs(cos).argmax(axis=0)
    latents = np.arange(cos.shape[1])
    co = np.asarray(counts.co[latents, feature]).ravel().astype(np.float64)
    fires, present = (
        counts.latent_fires.astype(np.float64),
        counts.feature_present[feature].astype(np.float64),
    )
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(fires > 0, co / fires, 0.0)
        recall = np.where(present > 0, co / present, 0.0)
        f1 = np.where(fires + present > 0, 2 * co / (fires + present), 0.0)
    return {"feature": feature, "precision": precision, "recall": recall, "f1": f1}


def spread(cos: np.ndarray, precision: sp.csr_matrix, split_cos: float, split_precision: float) -> np.ndarray:
    """[n] number of latents per feature that point along it and fire mostly on it (splitting)."""
    p = precision.tocoo()
    keep = (p.data >= split_precision) & (cos[p.col, p.row] >= split_cos)
    return np.bincount(p.col[keep], minlength=cos.shape[0])


@dataclass(frozen=True)
class Thresholds:
    recovered_cos: float = 0.9
    """A feature counts as recovered when its best latent's cosine reaches this."""
    split_cos: float = 0.5
    split_precision: float = 0.5
    n_bins: int = 10


@dataclass(frozen=True)
class RecoveryReport:
    mmcs: float
    matched_score: float
    mcc: float
    """SynthSAEBench's MCC (mean |cos| over the one-to-one matching)."""
    f1: float
    """SynthSAEBench's F1: each firing latent against its best-|cos| feature, averaged."""
    absorption_rate: float
    """Mean over parent features of how often their latent is silent where a child is present."""
    fraction_recovered: float
    mean_feature_best_f1: float
    mean_latent_f1: float
    """Over latents that fire at all."""
    dead_latents: int
    split_features: int
    """True features spread over two or more latents."""
    by_frequency: list[dict]
    per_feature: dict[str, list]
    per_latent: dict[str, list]
    absorption: list[dict]
    """Per parent feature: its latent, absorption rate and the latents that fired in its place."""

    def summary(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("per_feature", "per_latent")}


def frequency_bins(frequencies: np.ndarray, n_bins: int) -> list[np.ndarray]:
    """Feature indices cut into `n_bins` equal-count bins by frequency, most frequent bin first."""
    order = np.argsort(-frequencies, kind="stable")
    return [b for b in np.array_split(order, min(n_bins, len(order))) if len(b)]


class RecoveryAccumulator:
    """Streams batches of (true codes, latent activations) and reports every metric at the end."""

    def __init__(self, directions: np.ndarray, parent: np.ndarray, decoder: np.ndarray):
        self.cos = cosine_matrix(directions, decoder)
        self.match = match_directions(self.cos)
        self.parent = parent
        self.absorb = AbsorptionAccumulator(parent, self.match.best_latent, decoder.shape[0])
        self.counts: FiringCounts | None = None

    def update(self, codes: sp.csr_matrix, latent_acts: Latents) -> None:
        batch = firing_counts(codes, latent_acts)
        self.counts = batch if self.counts is None else self.counts + batch
        self.absorb.update(codes, latent_acts)

    def report(self, frequencies: np.ndarray, th: Thresholds = Thresholds()) -> RecoveryReport:
        if self.counts is None:
            raise ValueError("no batches were given")
        c, m = self.counts, self.match
        fs = firing_scores(c)
        spr = spread(self.cos, fs.precision, th.split_cos, th.split_precision)
        emp = c.feature_present / max(c.n_tokens, 1)
        bins = []
        for b in frequency_bins(frequencies, th.n_bins):
            bins.append(
                {
                    "n_features": len(b),
                    "freq_max": float(frequencies[b].max()),
                    "freq_min": float(frequencies[b].min()),
                    "mean_best_cos": float(m.best_cos[b].mean()),
                    "fraction_recovered": float((m.best_cos[b] >= th.recovered_cos).mean()),
                    "mean_matched_cos": float(m.matched_cos[b].mean()),
                    "mean_best_f1": float(fs.feature_best_f1[b].mean()),
                    "mean_spread": float(spr[b].mean()),
                    "never_present": int((c.feature_present[b] == 0).sum()),
                }
            )
        matched = cos_matched_f1(c, self.cos)
        absorption, absorption_rate = absorption_report(self.absorb.counts, self.cos, matched["feature"])
        alive = c.latent_fires > 0
        return RecoveryReport(
            mmcs=m.mmcs,
            matched_score=m.matched_score,
            mcc=m.mcc,
            f1=float(matched["f1"][alive].mean()) if alive.any() else 0.0,
            absorption_rate=absorption_rate,
            fraction_recovered=float((m.best_cos >= th.recovered_cos).mean()),
            mean_feature_best_f1=float(fs.feature_best_f1.mean()),
            mean_latent_f1=float(fs.latent_f1[alive].mean()) if alive.any() else 0.0,
            dead_latents=int((~alive).sum()),
            split_features=int((spr >= 2).sum()),
            by_frequency=bins,
            per_feature={
                "frequency": frequencies.tolist(),
                "empirical_frequency": emp.tolist(),
                "best_latent": m.best_latent.tolist(),
                "best_cos": m.best_cos.tolist(),
                "matched_latent": m.matched_latent.tolist(),
                "matched_cos": m.matched_cos.tolist(),
                "best_f1": fs.feature_best_f1.tolist(),
                "spread": spr.tolist(),
            },
            per_latent={
                "fires": c.latent_fires.tolist(),
                "feature": fs.latent_feature.tolist(),
                "precision": fs.latent_precision.tolist(),
                "recall": fs.latent_recall.tolist(),
                "f1": fs.latent_f1.tolist(),
                "cos_feature": matched["feature"].tolist(),
                "cos_precision": matched["precision"].tolist(),
                "cos_recall": matched["recall"].tolist(),
                "cos_f1": matched["f1"].tolist(),
            },
            absorption=absorption,
        )


def recovery_metrics(
    directions: np.ndarray,
    frequencies: np.ndarray,
    parent: np.ndarray,
    decoder: np.ndarray,
    codes: sp.csr_matrix,
    latent_acts: Latents,
    th: Thresholds = Thresholds(),
) -> RecoveryReport:
    """Every recovery metric over one in-memory batch (the reference the streaming command must equal)."""
    acc = RecoveryAccumulator(directions, parent, decoder)
    acc.update(codes, latent_acts)
    return acc.report(frequencies, th)


def format_bins(bins: list[dict]) -> str:
    """The by-frequency table as fixed-width text."""
    head = f"{'bin':>3} {'freq range':>19} {'n':>5} {'bestcos':>7} {'recov':>6} {'matched':>7} {'F1':>6} {'spread':>6}"
    lines = [head]
    for k, b in enumerate(bins):
        lines.append(
            f"{k + 1:>3} {b['freq_max']:>9.2e}..{b['freq_min']:<8.2e} {b['n_features']:>5} "
            f"{b['mean_best_cos']:>7.3f} {b['fraction_recovered']:>6.2f} {b['mean_matched_cos']:>7.3f} "
            f"{b['mean_best_f1']:>6.3f} {b['mean_spread']:>6.2f}"
        )
    return "\n".join(lines)


def score_recovery(cfg: RecoveryConfig, progress: bool = True) -> RecoveryReport:
    """Stream the store through the SAE and score it against the synthetic set's truth."""
    from tqdm import tqdm

    from saepipe.analyze.inputs import resolve_hook
    from saepipe.analyze.reconstruction import encode_stream
    from saepipe.harvest import open_store
    from saepipe.harvest.synthetic import open_truth
    from saepipe.train import load_sae
    from saepipe.train.sae_dir import SAERecord

    truth = open_truth(cfg.truth)
    store = open_store(cfg.store or truth.store_path)
    if store.info.model_fingerprint != truth.fingerprint:
        raise SaepipeError(
            f"store {store.path} was not generated from the synthetic set {cfg.truth}; give its store"
        )
    sae = load_sae(cfg.sae, device=cfg.device)
    SAERecord.of(sae).compatible_with(store, cfg.sae)
    hook = resolve_hook(store, [sae], None)
    acc = RecoveryAccumulator(truth.directions, truth.parent, sae.W_dec.detach().float().cpu().numpy())
    T = store.context_size
    total = min(store.n_tokens, cfg.max_tokens or store.n_tokens)
    with tqdm(total=total, unit="tok", unit_scale=True, desc="recovery", disable=not progress) as bar:
        for batch in encode_stream([sae], store, hook, cfg.batch_tokens, cfg.max_tokens):
            c0, c1 = int(batch.addr[:, 0].min()), int(batch.addr[:, 0].max()) + 1
            codes = truth.codes(c0, c1)[(batch.addr[:, 0] - c0) * T + batch.addr[:, 1]]
            acc.update(codes, batch.latents[0])
            bar.update(len(batch.x))
    th = Thresholds(cfg.recovered_cos, cfg.split_cos, cfg.split_precision, cfg.n_bins)
    return acc.report(truth.frequencies, th)


def run(cfg: RecoveryConfig) -> int:
    report = score_recovery(cfg)
    print(
        f"recovery of {cfg.sae} against {cfg.truth}: recovered {report.fraction_recovered:.1%} "
        f"(cos >= {cfg.recovered_cos}), MCC {report.mcc:.3f}, F1 {report.f1:.3f}, absorption "
        f"{report.absorption_rate:.3f}, MMCS {report.mmcs:.3f}, feature best F1 "
        f"{report.mean_feature_best_f1:.3f}, {report.split_features} split features, "
        f"{report.dead_latents} dead latents"
    )
    print(format_bins(report.by_frequency))
    if cfg.out:
        path = Path(cfg.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**asdict(report), "sae": cfg.sae, "truth": cfg.truth}))
        page = write_absorption_page(json.loads(path.read_text()), path, Path(cfg.sae).name)
        print(f"report written to {path}; absorption page {page}")
    return 0
