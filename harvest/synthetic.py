"""Synthetic activations with known features: the ground truth the feature-splitting lab scores against.

Why: reconstruction and sparsity are proxies; only data whose true features we know can say whether an
SAE found them, which rare ones it lost, and which it split or absorbed. The generator writes an
ORDINARY activation store (so `saepipe train` needs nothing special) plus a truth dir beside it:

    <out>/store/                         the activation store (`saepipe.harvest.store`), one hook `synthetic`,
                                         prepend_bos false; model name `synthetic`, n_layers 0, fingerprint =
                                         sha256 of the true features below
    <out>/truth/config.json              format `saepipe.synthetic`, schema_version, the SynthConfig used
                                         (without `out`, only the fields its recipe reads), the recipe's
                                         derived values (`alpha` for powerlaw; `true_l0`, hierarchy sizes for
                                         synthsaebench), `shard_contexts`
    <out>/truth/features.safetensors     directions [n, d] float32 (unit rows), frequencies [n] float64 (the
                                         exact marginal probability of each feature per token), parent [n]
                                         int64 (-1 for none), group [n] int64 (correlation group, -1 for none),
                                         bias [d] float32 (only where the recipe adds one)
    <out>/truth/codes/shard-NNNNNN.safetensors   one per store shard, the true codes of its tokens:
                                         token int64 (flat index context * context_size + position), feature
                                         int32, value float32; sorted by (token, feature)

Rows are x = codes @ directions + bias (+ optional isotropic Gaussian noise). Two recipes (`--recipe`):
`powerlaw`, saepipe's own (harvest/synth_powerlaw.py), and `synthsaebench`, the published SynthSAEBench
generator (harvest/synth_bench.py). Token ids carry a hint for dashboards: 1 + the feature with the
largest value at that position, 0 for none.

Every shard is drawn from its own seeded generator, its codes file is written (atomically) before the
store commits the shard, so a killed run resumes at the first uncommitted shard and ends byte-identical.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from safetensors.numpy import load_file, save
from tqdm import tqdm

from saepipe.errors import SaepipeError
from saepipe.files import check_out_dir, write_bytes_atomic, write_text_atomic
from saepipe.harvest.config import RECIPE_FIELDS, SynthConfig
from saepipe.harvest.store import StoreWriter, n_contexts_for
from saepipe.harvest.synth_bench import BenchFeatures
from saepipe.harvest.synth_bench import make_features as bench_features
from saepipe.harvest.synth_powerlaw import PowerLawFeatures
from saepipe.harvest.synth_powerlaw import make_features as powerlaw_features

FORMAT = "saepipe.synthetic"
SCHEMA_VERSION = 1
HOOK = "synthetic"


def make_features(cfg: SynthConfig) -> PowerLawFeatures | BenchFeatures:
    """The true features of `cfg`'s recipe: a pure function of the config."""
    return (bench_features if cfg.recipe == "synthsaebench" else powerlaw_features)(cfg)


def features_fingerprint(
    directions: np.ndarray, frequencies: np.ndarray, parent: np.ndarray, group: np.ndarray, bias=None
) -> str:
    """sha256 over the true features: the store's `model.fingerprint`, so an SAE can't be scored on the wrong
    set (a zero bias is left out, so sets written before biases existed keep their fingerprint)."""
    h = hashlib.sha256()
    arrays = [
        directions.astype(np.float32),
        frequencies.astype(np.float64),
        parent.astype(np.int64),
        group.astype(np.int64),
    ]
    if bias is not None and np.any(bias):
        arrays.append(np.asarray(bias, dtype=np.float32))
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def fingerprint_of(features: PowerLawFeatures | BenchFeatures) -> str:
    return features_fingerprint(
        features.directions, features.frequencies, features.parent, features.group, features.bias
    )


def _token_hints(codes: sp.csr_matrix) -> np.ndarray:
    """1 + the feature with the largest value per token, 0 where none is present."""
    out = np.zeros(codes.shape[0], dtype=np.int32)
    coo = codes.tocoo()
    order = np.lexsort((coo.data, coo.row))  # by row, then value: the last of each row is its largest
    last = np.r_[coo.row[order][1:] != coo.row[order][:-1], True]
    out[coo.row[order][last]] = coo.col[order][last] + 1
    return out


def _settings(cfg: SynthConfig, features: PowerLawFeatures | BenchFeatures) -> dict:
    """The store settings a synthetic store records (a resume must match them exactly)."""
    return {
        "model": {
            "name": "synthetic",
            "fingerprint": fingerprint_of(features),
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
    """The config a set records: shared fields resolved, plus only its own recipe's fields."""
    own = set(RECIPE_FIELDS[cfg.recipe])
    other = {f for fields in RECIPE_FIELDS.values() for f in fields} - own
    out = cfg.model_dump(exclude={"out", *other})
    out.update(freq_max=cfg.resolved("freq_max"), freq_min=cfg.resolved("freq_min"))
    return out


def _not_a_synthetic_set(path: Path) -> str | None:
    return "is not a synthetic set" if {p.name for p in path.iterdir()} - {"truth", "store"} else None


def _shard_codes_path(truth: Path, shard: int) -> Path:
    return truth / "codes" / f"shard-{shard:06d}.safetensors"


def _write_truth(
    truth: Path, cfg: SynthConfig, features: PowerLawFeatures | BenchFeatures, shard_contexts: int
) -> None:
    meta = {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "config": _public_config(cfg),
        **features.summary(),
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
    if np.any(features.bias):
        arrays["bias"] = features.bias
    write_bytes_atomic(truth / "features.safetensors", save(arrays))
    write_text_atomic(cfg_path, json.dumps(meta, indent=1))


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
    check_out_dir(cfg.out, "give a directory", _not_a_synthetic_set, probe=False)
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
        codes = features.sample_codes(n_ctx * T, (cfg.seed, 1, start // shard_contexts))
        acts = np.asarray(codes @ features.directions.astype(np.float64)) + features.bias.astype(np.float64)
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
        write_bytes_atomic(path, save(arrays))
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
        self.bias: np.ndarray = arrays.get("bias", np.zeros(self.directions.shape[1], dtype=np.float32))
        self.context_size = int(self.meta["config"]["context_size"])
        self.shard_contexts = int(self.meta["shard_contexts"])
        self._cache: tuple[int, sp.csr_matrix] | None = None

    @property
    def store_path(self) -> str:
        return str(self.path / "store")

    @property
    def fingerprint(self) -> str:
        return features_fingerprint(self.directions, self.frequencies, self.parent, self.group, self.bias)

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
        f"..{truth.frequencies.min():.2g} ({cfg.recipe}), true L0 "
        f"{truth.frequencies.sum():.2f}; "
        f"{res.tokens_written_now / max(res.seconds, 1e-9):,.0f} tokens/s"
    )
    return 0
