"""The train stage's config: `saepipe train` flags and the `train:` section of pipelines.yaml.

Several SAEs train from one pass over the stream: every combination of `--arch`, `--width`, `--k` (k only
for architectures that take it), `--tokens` and `--seed` is one SAE, e.g. `--width 1024 --width 4096` trains
two. Several `--tokens` budgets share the stream: an SAE with a smaller budget sees its first part, with its
own learning-rate schedule, and stops; the stream runs for the largest. `--width 512 --seed 0 1` trains two
SAEs of one width from different initialisations (a stability baseline, issue 19).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from itertools import product
from typing import Any, Literal

from pydantic import Field, field_serializer, field_validator, model_validator

from saepipe.config import StageConfig

GRID_KEYS = ("arch", "width", "k", "tokens")
"""The grid axes: every combination is one SAE."""


@dataclass(frozen=True)
class SAESpec:
    """One SAE of a run: its directory name under the run dir and how to build it."""

    name: str
    arch: str
    width: int
    k: int | None
    hparams: dict[str, Any]
    tokens: int
    """Its training budget in tokens over all ranks."""
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
    tokens: list[int] = Field(default_factory=lambda: [10_000_000])
    """Training tokens over all ranks (the stream repeats in reshuffled epochs if the stores hold fewer);
    repeat for a budget curve from one pass (every SAE at each budget; SAE names gain -t<tokens>)."""
    batch_size: int = Field(4096, gt=0)
    """Tokens per step on each rank (the global batch is batch_size x number of processes)."""
    lr: float = Field(4e-4, gt=0)
    """Adam learning rate after warm-up."""
    lr_reference_width: int | None = Field(None, gt=0)
    """Scale the learning rate of each SAE by sqrt(reference / width), as dictionary_learning and sparsify do,
    so one `lr` suits a whole width ladder (`lr` is then the rate at this width); default: one rate for all."""
    lr_warmup: float = Field(0.01, ge=0, le=1)
    """Fraction of steps over which the learning rate rises linearly from 0."""
    lr_decay: float = Field(0.2, ge=0, le=1)
    """Fraction of steps at the end over which the learning rate falls linearly to 0."""
    decoder_ortho: float = Field(0.0, ge=0)
    """Weight of a penalty on the squared cosines between decoder rows, relative to the input variance (0:
    off). A child feature that always comes with its parent is reconstructed equally well by latents along
    child + a bit of parent; this prior picks the pure directions (SynthSAEBench's hierarchy)."""
    k_anneal: float = Field(0.0, ge=0, le=1)
    """topk, batchtopk, matryoshka: fraction of steps over which the training k falls linearly from
    k_anneal_start x k to k (0: no annealing); a generous k early keeps latents from merging features."""
    k_anneal_start: float = Field(4.0, ge=1)
    """The starting multiple of k when --k-anneal is set."""
    token_selection_warmup: float = Field(0.0, ge=0, lt=1)
    """batchtopk, matryoshka with batch selection, jumprelu: fraction of steps that keep each token's k largest
    (TopK's selection; jumprelu's k is --jumprelu-target-l0, its L0 penalty off) before the batch's n*k
    largest or jumprelu's thresholds (which start at the cut that gives that L0). From random weights both
    fail on SynthSAEBench (0.00 of the features recovered), yet keep the directions TopK finds."""
    sparsity_warmup: float = Field(0.05, ge=0, le=1)
    """Fraction of steps over which the L1/L0 coefficient rises linearly from 0 (relu, jumprelu)."""
    l1_coefficient: float = Field(5.0, ge=0)
    """relu: weight of the decoder-norm-weighted L1 penalty."""
    l0_coefficient: float = Field(1.0, ge=0)
    """jumprelu: weight of the L0 penalty."""
    jumprelu_target_l0: float | None = Field(None, gt=0)
    """jumprelu: steer the L0 to this value: the penalty l0_coefficient * m * L0 has its multiplier m
    (1/100 .. 100) adjusted every step by an integral controller on the batch L0 (SynthSAEBench's recipe),
    so the L0 reaches the target without tuning the weight."""
    jumprelu_bandwidth: float = Field(1.0, gt=0)
    """jumprelu: width of the straight-through estimator's kernel, in units of the input's RMS per dimension
    (1 after --normalize; SynthSAEBench's setting)."""
    jumprelu_threshold_init: float = Field(1.0, gt=0)
    """jumprelu: starting threshold of every latent, in the same units (thresholds are log-parameterised
    and learned)."""
    auxk_coefficient: float = Field(1 / 32, ge=0)
    """topk, batchtopk, matryoshka: weight of the AuxK loss on dead latents."""
    dead_window: int | None = Field(None, gt=0)
    """Tokens without firing after which a latent counts as dead (AuxK and the dead fraction); default a
    twentieth of --tokens, at most 10M (Gao et al.'s window). Must be shorter than the run."""
    also: list[dict[str, Any]] = Field(default_factory=list)
    """More grids trained in the same pass, each overriding some of arch, width, k, tokens of this one, e.g.
    `[{arch: [topk], tokens: [33554432]}]` in pipelines.yaml or `--also '{"arch": ["topk"], ...}'` (JSON)."""
    matryoshka_prefixes: list[float] | None = None
    """matryoshka: nested dictionary sizes as fractions of the width, the last 1 (default 1/8 1/4 1/2 1)."""
    matryoshka_selection: Literal["batch", "token"] = "batch"
    """matryoshka: `batch` keeps the n*k largest activations of the batch (BatchTopK, the published recipe);
    `token` keeps each token's k largest (TopK), which does not collapse on SynthSAEBench (bench/RESULTS.md)."""
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
    the first, behind any -t<tokens>). The stream order follows the first seed, so every seed sees the same
    batches; the budgets of one (arch, width, k, seed) start from the same weights."""
    seed_widths: list[int] = Field(default_factory=list)
    """Train the seeds after the first only at these widths (default: every width), e.g. a width ladder
    with a second seed at its smallest width."""
    device: str = "auto"
    """auto (CUDA when present), cpu or cuda; under a launcher each rank takes cuda:LOCAL_RANK."""
    autocast: Literal["none", "bfloat16"] = "none"
    """Run the encoder matmul under autocast in this dtype (weights and optimizer stay float32)."""
    log_every: int = Field(100, gt=0)
    """Steps between log lines (console and W&B)."""
    eval_every: int | None = Field(None, gt=0)
    """Every this many steps (and at the end), splice each SAE into the store's model on --eval-contexts
    held-out contexts and log loss recovered and KL (console and W&B); off by default (it loads the model)."""
    eval_contexts: int = Field(8, gt=0)
    """Held-out contexts (those after the first store's) each --eval-every evaluation runs on."""
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

        if not self.stores:
            raise ValueError("give at least one --store")
        for grid in self.grids():
            unknown = [a for a in grid["arch"] if a not in ARCHITECTURES]
            if unknown:
                raise ValueError(
                    f"unknown --arch {unknown[0]!r}; choose from {', '.join(sorted(ARCHITECTURES))}"
                )
            if any(w <= 0 for w in grid["width"]):
                raise ValueError("--width must be positive")
            for k in grid["k"]:
                if k <= 0 or (any(ARCHITECTURES[a].uses_k for a in grid["arch"]) and k > min(grid["width"])):
                    raise ValueError(f"--k {k} must be positive and at most the smallest --width")
            if any(t <= 0 for t in grid["tokens"]) or len(set(grid["tokens"])) != len(grid["tokens"]):
                raise ValueError("--tokens must be positive, each budget given once")
        shortest = min(t for grid in self.grids() for t in grid["tokens"])
        if self.dead_window is not None and self.dead_window >= shortest:
            raise ValueError(
                f"--dead-window {self.dead_window} is not shorter than the run (--tokens {shortest}), so no "
                "latent could ever count as dead and AuxK would never run; give a smaller one or leave it "
                "unset (a twentieth of --tokens)"
            )
        if self.matryoshka_prefixes is not None and not (
            all(0 < f <= 1 for f in self.matryoshka_prefixes) and max(self.matryoshka_prefixes) == 1
        ):
            raise ValueError("--matryoshka-prefixes are fractions of the width in (0, 1] and must include 1")
        if not self.seed or len(set(self.seed)) != len(self.seed):
            raise ValueError("give each --seed once (at least one)")
        widths = {w for grid in self.grids() for w in grid["width"]}
        if missing := sorted(set(self.seed_widths) - widths):
            raise ValueError(f"--seed-widths {missing[0]} is not one of the --width values")
        if len({s.name for s in self.specs()}) != len(self.specs()):
            raise ValueError("an SAE is named twice; repeat --arch/--width/--k/--seed values only once")
        if self.normalize and self.token_norm:
            raise ValueError("--normalize and --token-norm exclude each other; choose one")
        jumprelu = any("jumprelu" in grid["arch"] for grid in self.grids())
        if self.token_selection_warmup and jumprelu and self.jumprelu_target_l0 is None:
            raise ValueError(
                "--token-selection-warmup with jumprelu keeps each token's k = --jumprelu-target-l0 largest; "
                "give --jumprelu-target-l0"
            )
        return self

    @field_serializer("seed")
    def _one_seed_as_before(self, seed: list[int]) -> int | list[int]:
        """A single seed is recorded as the integer it always was, so single-seed runs keep their bytes."""
        return seed[0] if len(seed) == 1 else seed

    @field_validator("also", mode="before")
    @classmethod
    def _parse_also(cls, value: Any) -> Any:
        """Entries from the command line are JSON; each key one of GRID_KEYS, each value a list."""
        out = []
        for entry in value or []:
            if isinstance(entry, str):
                try:
                    entry = json.loads(entry)
                except json.JSONDecodeError as e:
                    raise ValueError(
                        f'--also takes JSON objects such as \'{{"arch": ["topk"]}}\' ({e})'
                    ) from None
            if not isinstance(entry, dict) or set(entry) - set(GRID_KEYS) or not entry:
                raise ValueError(f"each --also entry overrides some of {', '.join(GRID_KEYS)}")
            out.append({k: v if isinstance(v, list) else [v] for k, v in entry.items()})
        return out

    def grids(self) -> list[dict[str, list]]:
        """This section's grid and each `also` grid (arch x width x k x tokens)."""
        base = {key: getattr(self, key) for key in GRID_KEYS}
        return [base, *({**base, **over} for over in self.also)]

    def resolved_dead_window(self, tokens: int) -> int:
        """The dead-latent window in tokens for an SAE trained on `tokens` (the default scales with it)."""
        return self.dead_window or max(1, min(10_000_000, tokens // 20))

    def specs(self) -> list[SAESpec]:
        """Every SAE this run trains, in a fixed order."""
        from saepipe.train.saes import ARCHITECTURES

        settings = {  # each architecture takes the ones among its own `default_hparams`
            "l1_coefficient": self.l1_coefficient,
            "l0_coefficient": self.l0_coefficient,
            "bandwidth": self.jumprelu_bandwidth,
            "threshold_init": self.jumprelu_threshold_init,
            "target_l0": self.jumprelu_target_l0,
            "auxk_coefficient": self.auxk_coefficient,
            "selection": self.matryoshka_selection,
        }
        several_budgets = len({t for grid in self.grids() for t in grid["tokens"]}) > 1
        out: dict[str, SAESpec] = {}
        for (i, seed), grid in product(enumerate(self.seed), self.grids()):
            for arch in grid["arch"]:
                cls = ARCHITECTURES[arch]
                hparams = {k: v for k, v in settings.items() if k in cls.default_hparams}
                for width in grid["width"]:
                    if i > 0 and self.seed_widths and width not in self.seed_widths:
                        continue  # the seeds after the first train only at --seed-widths
                    own = dict(hparams)
                    if "prefixes" in cls.default_hparams and self.matryoshka_prefixes:
                        own["prefixes"] = sorted({max(1, round(f * width)) for f in self.matryoshka_prefixes})
                    for k in grid["k"] if cls.uses_k else [None]:
                        for tokens in grid["tokens"]:
                            name = f"{arch}-w{width}" + (f"-k{k}" if k is not None else "")
                            name += (f"-t{tokens}" if several_budgets else "") + (f"-s{seed}" if i else "")
                            out.setdefault(name, SAESpec(name, arch, width, k, dict(own), tokens, seed))
        return list(out.values())
