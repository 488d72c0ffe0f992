"""Synthetic activations with known features: the ground truth the feature-splitting lab scores against.

Why: reconstruction and sparsity are proxies; only data whose true features we know can say whether an
SAE found them, which rare ones it lost, and which it split or absorbed (issue 5). The generator writes an
ORDINARY activation store (so `saepipe train` needs nothing special) plus a truth dir beside it:

    <out>/store/                         the activation store (`saepipe.harvest.store`), one hook `synthetic`,
                                         prepend_bos false; model name `synthetic`, n_layers 0, fingerprint =
                                         sha256 of the true features below
    <out>/truth/config.json              format `saepipe.synthetic`, schema_version, the SynthConfig used
                                         (without `out`), `alpha` (the power-law exponent), `shard_contexts`
    <out>/truth/features.safetensors     directions [n, d] float32 (unit rows), frequencies [n] float64 (the
                                         exact marginal probability of each feature per token), parent [n]
                                         int64 (-1 for none), group [n] int64 (correlation group, -1 for none)
    <out>/truth/codes/shard-NNNNNN.safetensors   one per store shard, the true codes of its tokens:
                                         token int64 (flat index context * context_size + position), feature
                                         int32, value float32; sorted by (token, feature)

The model of the data (each choice is a knob in `SynthConfig`):
- frequencies follow a power law in rank, p_r = freq_max * (r + 1) ** -alpha, with alpha chosen so the
  rarest feature has freq_min (three orders of magnitude by default); feature index = frequency rank;
- hierarchy (Chanin et al. 2024, "A is for Absorption"): `n_parents` random features get
  `children_per_parent` children each; a child fires only with its parent and siblings are mutually
  exclusive; a present parent carries one child with probability `child_coverage`, shared among the
  children in proportion to their power-law frequencies (so a child's marginal frequency is derived);
- correlation: root features are put in random groups; a group fires a shared event with the frequency of
  its most frequent member, and a fraction `correlation` of each member's occurrences is drawn from the
  group's events; the independent remainder is scaled so every marginal stays exactly p_i;
- magnitudes are mean-1 draws (constant, uniform or lognormal with a given coefficient of variation);
- x = sum_i value_i * direction_i (+ optional isotropic Gaussian noise).
Token ids carry a hint for dashboards: 1 + the feature with the largest value at that position, 0 for none.

Every shard is drawn from its own seeded generator, its codes file is written (atomically) before the
store commits the shard, so a killed run resumes at the first uncommitted shard and ends byte-identical.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import scipy.sparse as sp
from pydantic import Field, model_validator
from safetensors.numpy import load_file, save_file
from tqdm import tqdm

from saepipe.config import StageConfig
from saepipe.errors import SaepipeError
from saepipe.harvest.store import StoreWriter, n_contexts_for

FORMAT = "saepipe.synthetic"
SCHEMA_VERSION = 1
HOOK = "synthetic"


class SynthConfig(StageConfig):
    out: str
    """Directory to write: the activation store goes to OUT/store, the true features and codes to OUT/truth."""
    n_features: int = Field(1024, gt=1)
    """Number of true feature directions (more than --d-model gives superposition)."""
    d_model: int = Field(128, gt=0)
    """Dimension of the activations."""
    tokens: int = Field(262_144, gt=0)
    """Number of tokens to generate (rounded up to whole contexts)."""
    context_size: int = Field(128, gt=0)
    """Tokens per context (positions are independent draws; contexts only give the store its grid)."""
    freq_max: float = Field(0.1, gt=0, le=1)
    """Per-token probability of the most frequent feature."""
    freq_min: float = Field(1e-4, gt=0, le=1)
    """Per-token probability of the rarest feature; frequencies follow a power law in rank between the two."""
    magnitude: Literal["constant", "uniform", "lognormal"] = "lognormal"
    """Distribution of a present feature's value (mean 1)."""
    magnitude_cv: float = Field(0.3, ge=0)
    """Coefficient of variation of the value (std / mean); uniform allows at most 1/sqrt(3)."""
    n_parents: int = Field(0, ge=0)
    """Parent features in the hierarchy (0: no hierarchy)."""
    children_per_parent: int = Field(2, ge=1)
    """Mutually exclusive children of each parent; a child fires only together with its parent."""
    child_coverage: float = Field(1.0, gt=0, le=1)
    """Probability that a present parent carries one of its children."""
    correlation: float = Field(0.0, ge=0, lt=1)
    """Fraction of each root feature's occurrences drawn from its group's shared events (0: independent)."""
    correlation_group_size: int = Field(4, ge=2)
    """Features per correlation group."""
    noise_std: float = Field(0.0, ge=0)
    """Std of isotropic Gaussian noise added to every coordinate."""
    dtype: Literal["float16", "float32"] = "float32"
    """Storage dtype of the activations."""
    contexts_per_chunk: int = Field(32, gt=0)
    """Contexts per Zarr chunk."""
    chunks_per_shard: int = Field(8, gt=0)
    """Chunks per shard file (the unit generated, written and committed at once)."""
    seed: int = 0
    """Seed of the features and of every shard's draws."""

    @model_validator(mode="after")
    def _check(self) -> SynthConfig:
        if self.freq_min > self.freq_max:
            raise ValueError("freq_min must be at most freq_max")
        if self.n_parents * (1 + self.children_per_parent) > self.n_features:
            raise ValueError("n_parents * (1 + children_per_parent) must be at most n_features")
        if self.magnitude == "uniform" and self.magnitude_cv > 1 / math.sqrt(3):
            raise ValueError("uniform magnitudes allow magnitude_cv at most 1/sqrt(3) ~ 0.577")
        return self


@dataclass(frozen=True)
class Features:
    """The true features; arrays are indexed by feature (index = power-law frequency rank)."""

    directions: np.ndarray  # [n, d] float32, unit rows
    frequencies: np.ndarray  # [n] float64, exact marginal per-token probability
    parent: np.ndarray  # [n] int64, -1 for none
    group: np.ndarray  # [n] int64, -1 for none
    share: np.ndarray  # [n] float64: P(this child | parent present); 0 for non-children
    alpha: float

    def fingerprint(self) -> str:
        return features_fingerprint(self.directions, self.frequencies, self.parent, self.group)


def features_fingerprint(
    directions: np.ndarray, frequencies: np.ndarray, parent: np.ndarray, group: np.ndarray
) -> str:
    """sha256 over the true features: the store's `model.fingerprint`, so an SAE can't be scored on the wrong set."""
    h = hashlib.sha256()
    for a in (
        directions.astype(np.float32),
        frequencies.astype(np.float64),
        parent.astype(np.int64),
        group.astype(np.int64),
    ):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def make_features(cfg: SynthConfig) -> Features:
    """Directions, power-law frequencies, hierarchy and groups: a pure function of the config."""
    n, rng = cfg.n_features, np.random.default_rng([cfg.seed, 0])
    directions = rng.standard_normal((n, cfg.d_model))
    directions = (directions / np.linalg.norm(directions, axis=1, keepdims=True)).astype(np.float32)
    alpha = math.log(cfg.freq_max / cfg.freq_min) / math.log(n)
    freq = cfg.freq_max * (np.arange(1, n + 1, dtype=np.float64) ** -alpha)
    parent, group, share = np.full(n, -1), np.full(n, -1), np.zeros(n)
    perm = rng.permutation(n)
    k, n_par = cfg.children_per_parent, cfg.n_parents
    for g, p in enumerate(perm[:n_par]):
        kids = perm[n_par + g * k : n_par + (g + 1) * k]
        parent[kids] = p
        share[kids] = cfg.child_coverage * freq[kids] / freq[kids].sum()
        freq[kids] = freq[p] * share[kids]
    if cfg.correlation > 0:
        roots = rng.permutation(np.flatnonzero(parent < 0))
        group[roots] = np.arange(len(roots)) // cfg.correlation_group_size
    return Features(directions, freq, parent, group, share, alpha)


def _bernoulli_positions(rng: np.random.Generator, n: int, p: float) -> np.ndarray:
    """Sorted positions in [0, n) of independent Bernoulli(p) successes, in O(successes)."""
    return np.sort(rng.choice(n, size=rng.binomial(n, p), replace=False))


def _magnitudes(rng: np.random.Generator, cfg: SynthConfig, size: int) -> np.ndarray:
    c = cfg.magnitude_cv
    if cfg.magnitude == "constant" or c == 0:
        return np.ones(size)
    if cfg.magnitude == "uniform":
        return rng.uniform(1 - c * math.sqrt(3), 1 + c * math.sqrt(3), size)
    s2 = math.log1p(c * c)
    return rng.lognormal(-s2 / 2, math.sqrt(s2), size)


def sample_codes(
    features: Features, cfg: SynthConfig, n_tokens: int, rng: np.random.Generator
) -> sp.csr_matrix:
    """True codes of `n_tokens` tokens: CSR [n_tokens, n_features] float32 of the present features' values."""
    n = len(features.frequencies)
    present: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * n
    rho, freq = cfg.correlation, features.frequencies
    events = {}
    if rho > 0:
        for g in np.unique(features.group[features.group >= 0]):
            events[g] = _bernoulli_positions(rng, n_tokens, freq[features.group == g].max())
    for i in np.flatnonzero(features.parent < 0):
        g = features.group[i]
        if g < 0:
            present[i] = _bernoulli_positions(rng, n_tokens, freq[i])
            continue
        # Thin the group's events to rho * p_i, then add independent draws scaled so P(union) = p_i.
        ev = events[g]
        shared = ev[rng.random(len(ev)) < rho * freq[i] / freq[features.group == g].max()]
        own = _bernoulli_positions(rng, n_tokens, (1 - rho) * freq[i] / (1 - rho * freq[i]))
        present[i] = np.union1d(shared, own)
    for p in np.unique(features.parent[features.parent >= 0]):
        kids = np.flatnonzero(features.parent == p)
        u = rng.random(len(present[p]))  # one draw per parent occurrence picks at most one child
        edges = np.cumsum(features.share[kids])
        which = np.searchsorted(edges, u, side="right")
        for j, kid in enumerate(kids):
            present[kid] = present[p][which == j]
    rows = np.concatenate(present)
    cols = np.repeat(np.arange(n), [len(x) for x in present])
    vals = _magnitudes(rng, cfg, len(rows)).astype(np.float32)
    codes = sp.csr_matrix((vals, (rows, cols)), shape=(n_tokens, n), dtype=np.float32)
    codes.sort_indices()
    return codes


def _token_hints(codes: sp.csr_matrix) -> np.ndarray:
    """1 + the feature with the largest value per token, 0 where none is present."""
    out = np.zeros(codes.shape[0], dtype=np.int32)
    coo = codes.tocoo()
    order = np.lexsort((coo.data, coo.row))  # by row, then value: the last of each row is its largest
    last = np.r_[coo.row[order][1:] != coo.row[order][:-1], True]
    out[coo.row[order][last]] = coo.col[order][last] + 1
    return out


def _settings(cfg: SynthConfig, features: Features) -> dict:
    """The store settings a synthetic store records (a resume must match them exactly)."""
    return {
        "model": {
            "name": "synthetic",
            "fingerprint": features.fingerprint(),
            "d_model": cfg.d_model,
            "n_layers": 0,
            "dtype": "float32",
        },
        "tokenizer": {
            "name": "synthetic",
            "vocab_size": cfg.n_features + 1,
            "bos_token_id": None,
            "eos_token_id": None,
        },
        "dataset": {"name": "synthetic", "config": None, "split": "train", "text_column": None},
        "hooks": [HOOK],
        "context_size": cfg.context_size,
        "prepend_bos": False,
        "dtype": cfg.dtype,
        "compression": "none",
        "contexts_per_chunk": cfg.contexts_per_chunk,
        "chunks_per_shard": cfg.chunks_per_shard,
        "batch_size": cfg.contexts_per_chunk * cfg.chunks_per_shard,
        "seed": cfg.seed,
        "n_contexts_target": n_contexts_for(cfg.tokens, cfg.context_size),
        "synthetic": _public_config(cfg),
    }


def _public_config(cfg: SynthConfig) -> dict:
    return cfg.model_dump(exclude={"out"})


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".partial")
    write(tmp)
    os.replace(tmp, path)


def _shard_codes_path(truth: Path, shard: int) -> Path:
    return truth / "codes" / f"shard-{shard:06d}.safetensors"


def _write_truth(truth: Path, cfg: SynthConfig, features: Features, shard_contexts: int) -> None:
    meta = {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "config": _public_config(cfg),
        "alpha": features.alpha,
        "shard_contexts": shard_contexts,
        "store": "../store",
    }
    cfg_path = truth / "config.json"
    if cfg_path.exists():
        have = json.loads(cfg_path.read_text())
        if have.get("config") != meta["config"]:
            diff = sorted(k for k in meta["config"] if have.get("config", {}).get(k) != meta["config"][k])
            raise SaepipeError(
                f"{truth.parent} was generated with other settings ({', '.join(diff)}); rerun with the same "
                "settings to resume it, or choose a new --out"
            )
        return
    (truth / "codes").mkdir(parents=True, exist_ok=True)
    arrays = {k: getattr(features, k) for k in ("directions", "frequencies", "parent", "group")}
    _write_atomic(truth / "features.safetensors", lambda p: save_file(arrays, str(p)))
    _write_atomic(cfg_path, lambda p: p.write_text(json.dumps(meta, indent=1)))


@dataclass(frozen=True)
class SynthResult:
    out: str
    n_contexts: int
    n_tokens: int
    tokens_written_now: int
    seconds: float


def generate(cfg: SynthConfig, progress: bool = True) -> SynthResult:
    """Generate (or resume) the synthetic store and its truth dir under `cfg.out`."""
    t0 = time.perf_counter()
    out = Path(cfg.out).expanduser()
    if out.exists() and not out.is_dir():
        raise SaepipeError(f"--out {cfg.out} is an existing file; give a directory")
    if out.is_dir() and {p.name for p in out.iterdir()} - {"truth", "store"}:
        raise SaepipeError(
            f"--out {cfg.out} is a non-empty directory that is not a synthetic set; choose a new path"
        )
    features = make_features(cfg)
    truth = out / "truth"
    truth.mkdir(parents=True, exist_ok=True)
    shard_contexts = cfg.contexts_per_chunk * cfg.chunks_per_shard
    _write_truth(truth, cfg, features, shard_contexts)
    writer = StoreWriter(str(out / "store"), _settings(cfg, features))
    T, target = cfg.context_size, writer.settings["n_contexts_target"]
    done0 = writer.n_contexts
    bar = tqdm(
        total=target * T, initial=done0 * T, unit="tok", unit_scale=True, desc="synth", disable=not progress
    )
    while writer.n_contexts < target:
        start = writer.n_contexts
        n_ctx = min(shard_contexts, target - start)
        codes = sample_codes(
            features, cfg, n_ctx * T, np.random.default_rng([cfg.seed, 1, start // shard_contexts])
        )
        acts = np.asarray(codes @ features.directions.astype(np.float64))
        if cfg.noise_std > 0:
            noise_rng = np.random.default_rng([cfg.seed, 2, start // shard_contexts])
            acts += cfg.noise_std * noise_rng.standard_normal(acts.shape)
        coo = codes.tocoo()
        arrays = {
            "token": (coo.row.astype(np.int64) + start * T),
            "feature": coo.col.astype(np.int32),
            "value": coo.data.astype(np.float32),
        }
        path = _shard_codes_path(truth, start // shard_contexts)
        _write_atomic(path, lambda p, a=arrays: save_file(a, str(p)))
        tokens = _token_hints(codes).reshape(n_ctx, T)
        acts_store = acts.reshape(n_ctx, T, cfg.d_model).astype(cfg.dtype)
        writer.write_shard(start, tokens, {HOOK: acts_store}, first_pos=0)
        bar.update(n_ctx * T)
    bar.close()
    writer.finish()
    n = writer.n_contexts
    return SynthResult(str(out), n, n * T, (n - done0) * T, time.perf_counter() - t0)


class TruthSet:
    """Read access to a synthetic set's truth: features, config, and codes on the store's grid."""

    def __init__(self, path: str):
        self.path = Path(path).expanduser()
        truth = self.path / "truth"
        cfg_path = truth / "config.json"
        if not cfg_path.exists():
            raise SaepipeError(
                f"{path} is not a synthetic set (no truth/config.json); give the --out of `saepipe synth`"
            )
        self.meta = json.loads(cfg_path.read_text())
        if self.meta.get("format") != FORMAT or self.meta.get("schema_version", 0) > SCHEMA_VERSION:
            raise SaepipeError(f"{cfg_path} is not a synthetic truth this saepipe reads; regenerate it")
        arrays = load_file(str(truth / "features.safetensors"))
        self.directions: np.ndarray = arrays["directions"]  # [n, d]
        self.frequencies: np.ndarray = arrays["frequencies"]  # [n]
        self.parent: np.ndarray = arrays["parent"]  # [n]
        self.group: np.ndarray = arrays["group"]  # [n]
        self.context_size = int(self.meta["config"]["context_size"])
        self.shard_contexts = int(self.meta["shard_contexts"])
        self._cache: tuple[int, sp.csr_matrix] | None = None

    @property
    def store_path(self) -> str:
        return str(self.path / "store")

    @property
    def fingerprint(self) -> str:
        return features_fingerprint(self.directions, self.frequencies, self.parent, self.group)

    @property
    def n_features(self) -> int:
        return len(self.frequencies)

    def _shard(self, shard: int) -> sp.csr_matrix:
        if self._cache is None or self._cache[0] != shard:
            a = load_file(str(_shard_codes_path(self.path / "truth", shard)))
            rows = a["token"] - shard * self.shard_contexts * self.context_size
            n_rows = self.shard_contexts * self.context_size
            m = sp.csr_matrix((a["value"], (rows, a["feature"])), shape=(n_rows, self.n_features))
            self._cache = (shard, m)
        return self._cache[1]

    def codes(self, start: int, stop: int) -> sp.csr_matrix:
        """True codes of contexts [start, stop): CSR [(stop - start) * context_size, n_features] float32,
        rows in (context, position) order like `ActivationStore.iter_token_rows`."""
        T, S = self.context_size, self.shard_contexts
        parts = []
        for shard in range(start // S, (stop - 1) // S + 1 if stop > start else start // S):
            lo, hi = max(start, shard * S) - shard * S, min(stop, (shard + 1) * S) - shard * S
            parts.append(self._shard(shard)[lo * T : hi * T])
        return (
            sp.vstack(parts, format="csr") if parts else sp.csr_matrix((0, self.n_features), dtype=np.float32)
        )


def open_truth(path: str) -> TruthSet:
    """Open the truth of a synthetic set written by `saepipe synth --out PATH`."""
    return TruthSet(path)


def run(cfg: SynthConfig) -> int:
    res = generate(cfg)
    truth = open_truth(res.out)
    print(
        f"synthetic set {res.out}: {res.n_tokens:,} tokens in {res.out}/store (hook {HOOK!r}), "
        f"{truth.n_features} features in d={cfg.d_model}, frequencies {truth.frequencies.max():.2g}"
        f"..{truth.frequencies.min():.2g} (power law, alpha {truth.meta['alpha']:.3f}), true L0 "
        f"{truth.frequencies.sum():.2f}; "
        f"{res.tokens_written_now / max(res.seconds, 1e-9):,.0f} tokens/s"
    )
    return 0
