"""The train stage's config: `saepipe train` flags and the `train:` section of pipelines.yaml.

Several SAEs train from one pass over the stream: every combination of `--arch`, `--width`, `--k`
(k only for architectures that take it) and `--seed` is one SAE, e.g. `--width 1024 4096` trains two and
`--width 512 --seed 0 1` two of one width from different initialisations (a stability baseline, issue 19).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, field_serializer, model_validator

from saepipe.config import StageConfig


@dataclass(frozen=True)
class SAESpec:
    """One SAE of a run: its directory name under the run dir and how to build it."""

    name: str
    arch: str
    width: int
    k: int | None
    hparams: dict[str, Any]
    seed: int = 0
    """Seed of this SAE's initialisation."""


class TrainConfig(StageConfig):
    stores: list[str] = Field(json_schema_extra={"flag": "--store"})
    """Activation store to read (a path or URL written by `saepipe harvest`); repeat for several stores."""
    hook: str
    """Hook whose activations to train on, e.g. blocks.3.hook_resid_post (every store must hold it)."""
    out: str
    """Run directory: one SAE dir per SAE (<out>/<name>/), plus checkpoint/ and wandb/."""
    arch: list[str] = Field(default_factory=lambda: ["topk"])
    """SAE architecture: relu, topk, batchtopk, jumprelu or matryoshka; repeat to train several."""
    width: list[int] = Field(default_factory=lambda: [4096])
    """Number of latents (d_sae); repeat for a width ladder trained from the same pass."""
    k: list[int] = Field(default_factory=lambda: [32])
    """Active latents per token (topk; the batch average for batchtopk/matryoshka); repeatable."""
    tokens: int = Field(10_000_000, gt=0)
    """Training tokens over all ranks (the stream repeats in reshuffled epochs if the stores hold fewer)."""
    batch_size: int = Field(4096, gt=0)
    """Tokens per step on each rank (the global batch is batch_size x number of processes)."""
    lr: float = Field(4e-4, gt=0)
    """Adam learning rate after warm-up."""
    lr_warmup: float = Field(0.01, ge=0, le=1)
    """Fraction of steps over which the learning rate rises linearly from 0."""
    lr_decay: float = Field(0.2, ge=0, le=1)
    """Fraction of steps at the end over which the learning rate falls linearly to 0."""
    sparsity_warmup: float = Field(0.05, ge=0, le=1)
    """Fraction of steps over which the L1/L0 coefficient rises linearly from 0 (relu, jumprelu)."""
    l1_coefficient: float = Field(5.0, ge=0)
    """relu: weight of the decoder-norm-weighted L1 penalty."""
    l0_coefficient: float = Field(1.0, ge=0)
    """jumprelu: weight of the L0 penalty."""
    jumprelu_bandwidth: float = Field(0.001, gt=0)
    """jumprelu: width of the straight-through estimator's kernel."""
    jumprelu_threshold_init: float = Field(0.001, gt=0)
    """jumprelu: starting threshold of every latent (raise it towards typical latent values, e.g. 0.5 with
    --normalize, when L0 stays far above the target)."""
    auxk_coefficient: float = Field(1 / 32, ge=0)
    """topk, batchtopk, matryoshka: weight of the AuxK loss on dead latents."""
    dead_window: int = Field(1_000_000, gt=0)
    """Tokens without firing after which a latent counts as dead (AuxK and the dead fraction)."""
    b_dec_init: Literal["geometric_median", "mean", "zeros"] = "geometric_median"
    """Decoder bias start: the geometric median of a sample, the stores' mean, or zeros."""
    normalize: bool = False
    """Scale inputs so their mean squared norm is d_model (store statistics); undone in the saved SAE."""
    follow: bool = False
    """Train on a store that is still being harvested: each epoch reads the contexts committed when it
    starts (one process only; an exact resume is not promised, since the store grows meanwhile)."""
    drop_bos: bool = True
    """Skip position 0 when the store put a BOS token there (its norm is an outlier)."""
    drop_special: bool = True
    """Skip every position holding the tokenizer's BOS or EOS token (document separators; for chat models
    also the chat template's turn markers when they are BOS/EOS, as in SmolLM2) or a --special-token-ids
    token; `saepipe evaluate` then leaves those positions unspliced, like BOS."""
    special_token_ids: list[int] = Field(default_factory=list)
    """More token ids to treat as special (skipped with --drop-special), e.g. other chat-template tokens."""
    drop_norm_above: float | None = Field(None, gt=0)
    """Skip positions whose activation norm exceeds this multiple of the store's median norm (outlier
    positions; `saepipe cache info` shows the norm distribution)."""
    token_norm: bool = False
    """Scale every activation to norm sqrt(d_model) before encoding and undo it after decoding (SAELens's
    `constant_norm_rescale`); it cannot be folded into the weights, so the SAE dir's cfg.json says so."""
    buffer_tokens: int = Field(262_144, gt=0)
    """Size of the token mixing buffer: rows of this many tokens are shuffled together."""
    seed: list[int] = Field(default_factory=lambda: [0])
    """Seed of the SAEs' initialisation; repeat for SAEs that differ only in it (names get -s<seed> after
    the first). The stream order follows the first seed, so every seed sees the same batches."""
    seed_widths: list[int] = Field(default_factory=list)
    """Train the seeds after the first only at these widths (default: every width), e.g. a width ladder
    with a second seed at its smallest width."""
    device: str = "auto"
    """auto (CUDA when present), cpu or cuda; under a launcher each rank takes cuda:LOCAL_RANK."""
    autocast: Literal["none", "bfloat16"] = "none"
    """Run the encoder matmul under autocast in this dtype (weights and optimizer stay float32)."""
    log_every: int = Field(100, gt=0)
    """Steps between log lines (console and W&B)."""
    checkpoint_every: int = Field(1000, gt=0)
    """Steps between checkpoints (model, optimizer, RNG and stream position in <out>/checkpoint)."""
    resume: bool = True
    """Continue from <out>/checkpoint when it exists (rerunning the same command resumes)."""
    wandb: Literal["online", "offline", "disabled"] = "disabled"
    """Weights & Biases logging; offline writes <out>/wandb and needs no network."""
    wandb_project: str = "saepipe"
    """W&B project name."""

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        from saepipe.train.saes import ARCHITECTURES  # imported here so `--help` stays free of torch

        unknown = [a for a in self.arch if a not in ARCHITECTURES]
        if unknown:
            raise ValueError(f"unknown --arch {unknown[0]!r}; choose from {', '.join(sorted(ARCHITECTURES))}")
        if not self.stores:
            raise ValueError("give at least one --store")
        for w in self.width:
            if w <= 0:
                raise ValueError("--width must be positive")
        for k in self.k:
            if k <= 0 or (any(ARCHITECTURES[a].uses_k for a in self.arch) and k > min(self.width)):
                raise ValueError(f"--k {k} must be positive and at most the smallest --width")
        if len({s.name for s in self.specs()}) != len(self.specs()):
            raise ValueError("an SAE is named twice; repeat --arch/--width/--k/--seed values only once")
        if not self.seed or len(set(self.seed)) != len(self.seed):
            raise ValueError("give each --seed once (at least one)")
        if missing := sorted(set(self.seed_widths) - set(self.width)):
            raise ValueError(f"--seed-widths {missing[0]} is not one of the --width values")
        if self.normalize and self.token_norm:
            raise ValueError("--normalize and --token-norm exclude each other; choose one")
        return self

    @field_serializer("seed")
    def _one_seed_as_before(self, seed: list[int]) -> int | list[int]:
        """A single seed is recorded as the integer it always was, so single-seed runs keep their bytes."""
        return seed[0] if len(seed) == 1 else seed

    def specs(self) -> list[SAESpec]:
        """Every SAE this run trains, in a fixed order."""
        from saepipe.train.saes import ARCHITECTURES

        settings = {  # each architecture takes the ones among its own `default_hparams`
            "l1_coefficient": self.l1_coefficient,
            "l0_coefficient": self.l0_coefficient,
            "bandwidth": self.jumprelu_bandwidth,
            "threshold_init": self.jumprelu_threshold_init,
            "auxk_coefficient": self.auxk_coefficient,
        }
        out = []
        for i, seed in enumerate(self.seed):
            for arch in self.arch:
                cls = ARCHITECTURES[arch]
                hparams = {k: v for k, v in settings.items() if k in cls.default_hparams}
                for width in self.width:
                    if i > 0 and self.seed_widths and width not in self.seed_widths:
                        continue
                    for k in self.k if cls.uses_k else [None]:
                        name = (
                            f"{arch}-w{width}"
                            + (f"-k{k}" if k is not None else "")
                            + (f"-s{seed}" if i else "")
                        )
                        out.append(SAESpec(name, arch, width, k, dict(hparams), seed))
        return out
