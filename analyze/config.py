"""The analyze package's configs: `saepipe analyze`, `evaluate`, `steer`, `recovery` and `splitting` flags (and
pipelines.yaml sections)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from saepipe.config import StageConfig


class AnalyzeConfig(StageConfig):
    sae: str
    """SAE directory (sae_weights.safetensors + cfg.json) written by `saepipe train`."""
    store: str | None = None
    """Activation store to stream through the SAE; default: the store recorded in the SAE's cfg.json."""
    out: str
    """Report directory: tables, arrays, index.html dashboard."""
    hook: str | None = None
    """Hook to read from the store; default: the SAE's hook_name."""
    top_k: int = Field(20, gt=0)
    """Top activating token positions kept per latent."""
    tokens: int | None = Field(None, gt=0)
    """Analyze at most this many (non-BOS) tokens of the store; default: all of them."""
    samples: int = Field(16, gt=0)
    """Size of the uniform per-latent sample of active positions; the dashboard shows those below the median
    (what a latent does when weakly active)."""
    score_samples: int = Field(64, gt=0)
    """Uniformly sampled active positions kept per latent for its explanation: those in even contexts build
    it, those in odd contexts score it (held out); the dashboard's `samples` are the first of them."""
    score_contexts: int = Field(256, ge=0)
    """Contexts spread over the store whose whole codes are kept: the even half tells the explainer how
    often each n-gram occurs without the latent, the odd half gives held-out windows where it is inactive
    (detection negatives)."""
    score_min_active: int = Field(4, ge=1)
    """Latents with fewer held-out active windows get no explanation score (too few to tell explanations
    apart) and are left out of the explanation ranking; their other scores are still reported."""
    rank_by: str = "explanation"
    """Ranking key of the dashboard's list: explanation (held-out detection, fuzzing and simulation score of
    each latent's explanation), interpretability (token concentration), max_activation, frequency,
    mean_activation."""
    explainer: str | None = None
    """Also explain and score the best-ranked latents with this language model, delphi-style (a local HF
    directory, a hub id, or smollm2-135m); the deterministic explainer still ranks."""
    explainer_latents: int = Field(16, gt=0)
    """How many latents (the first of the ranking) the language model explains and scores."""
    explainer_examples: int = Field(8, gt=0)
    """Examples the language model sees per latent: to explain, and of each kind to score (active,
    inactive, correctly and wrongly highlighted)."""
    explainer_batch: int = Field(8, gt=0)
    """Prompts per language-model forward pass."""
    explainer_cache: str | None = None
    """Where the language model's answers are cached (keyed by model weights, prompt and settings);
    default: SAEPIPE_HOME/explainer-cache."""
    dense_threshold: float = Field(0.1, gt=0, le=1)
    """Latents active on more than this fraction of tokens are reported as ultra-dense, not ranked."""
    logit_tokens: int = Field(10, gt=0)
    """Tokens listed per latent among the most promoted and most suppressed."""
    batch_tokens: int = Field(4096, gt=0)
    """Tokens encoded per batch (rounded to whole contexts); lower it if memory is tight at large widths."""
    device: str = "auto"
    """auto (CUDA when present), cpu, cuda, or cuda:N."""
    dashboard: bool = True
    """Write the static HTML dashboard (REPORT_DIR/index.html)."""
    wandb: bool = False
    """Log the summary table and a few latent cards to Weights & Biases."""
    wandb_project: str = "saepipe"
    """W&B project when --wandb is on."""
    wandb_cards: int = Field(8, ge=0)
    """Latent cards (top-ranked latents) logged to W&B."""
    seed: int = 0
    """Seed of the per-latent sampling of weakly active positions."""

    @model_validator(mode="after")
    def _reservoir_holds_samples(self) -> AnalyzeConfig:
        if self.score_samples < self.samples:
            raise ValueError(
                f"score_samples ({self.score_samples}) must be at least samples ({self.samples})"
            )
        return self

    @field_validator("rank_by")
    @classmethod
    def _known_key(cls, v: str) -> str:
        from saepipe.analyze.ranking import RANKING_KEYS

        if v not in RANKING_KEYS:
            raise ValueError(f"unknown ranking key {v!r}; choose one of {', '.join(RANKING_KEYS)}")
        return v


class EvaluateConfig(StageConfig):
    sae: str
    """SAE directory (sae_weights.safetensors + cfg.json) to splice into its model."""
    store: str | None = None
    """Store the SAE was trained on (its model, dataset and context layout); default: from the SAE's cfg.json."""
    dataset: str | None = None
    """Held-out text; default: the store's own dataset, continuing after the contexts the store holds."""
    contexts: int = Field(64, gt=0)
    """Held-out contexts to evaluate on (of the store's context size)."""
    batch_size: int = Field(8, gt=0)
    """Contexts per forward pass."""
    out: str | None = None
    """Where to write the JSON results; default: SAE_DIR/evaluation.json."""
    device: str = "auto"
    """auto (CUDA when present), cpu, cuda, or cuda:N."""


class SteerConfig(StageConfig):
    sae: str
    """SAE directory whose latents to intervene with, in the model it was trained on."""
    latent: list[str]
    """Latent to intervene with, as ID or ID=VALUE (VALUE default 1, multiplied by --scale); repeatable."""
    prompt: str
    """Text to continue (the model's BOS is put in front, as in training)."""
    mode: Literal["steer", "clamp", "ablate"] = "steer"
    """steer: add VALUE x scale x the latent's decoder row; clamp: set the latent to VALUE x scale; ablate:
    set it to 0. The SAE's error term is kept, so only these latents change the model."""
    scale: float = 1.0
    """Multiplies every latent's VALUE (steering strength, or the clamp value)."""
    tokens: int = Field(20, gt=0)
    """Tokens to generate, with and without the intervention."""
    seed: int = 0
    """Sampling seed: both generations use it, so they differ only by the intervention."""
    temperature: float = Field(1.0, ge=0)
    """Sampling temperature; 0 is greedy."""
    model: str | None = None
    """Model to run; default: the SAE's model_name (it must have the weights the SAE was trained on)."""
    device: str = "auto"
    """auto (CUDA when present), cpu, cuda, or cuda:N."""
    out: str | None = None
    """Also write the prompt, settings and both continuations to this JSON file."""

    @field_validator("latent")
    @classmethod
    def _latents(cls, v: list[str]) -> list[str]:
        parse_latents(v)
        return v

    def latents(self) -> dict[int, float]:
        """Latent id -> VALUE x scale, in the order given."""
        return {i: value * self.scale for i, value in parse_latents(self.latent).items()}


def parse_latents(specs: list[str]) -> dict[int, float]:
    """`["12", "7=2.5"]` -> {12: 1.0, 7: 2.5}; refuses malformed, negative and repeated ids."""
    out: dict[int, float] = {}
    for spec in specs:
        ident, _, value = spec.partition("=")
        try:
            latent = int(ident)
            amount = float(value) if value else 1.0
        except ValueError:
            raise ValueError(f"{spec!r} is not ID or ID=VALUE (e.g. 12 or 12=4.5)") from None
        if latent < 0:
            raise ValueError(f"{spec!r}: latent ids start at 0")
        if latent in out:
            raise ValueError(f"latent {latent} is given twice")
        out[latent] = amount
    if not out:
        raise ValueError("give at least one latent (--latent ID or ID=VALUE)")
    return out


class RecoveryConfig(StageConfig):
    sae: str
    """The SAE dir to score (trained on the synthetic set's store)."""
    truth: str
    """The synthetic set: the --out of `saepipe synth`."""
    store: str | None = None
    """Store to stream (default: the synthetic set's own store, TRUTH/store)."""
    out: str | None = None
    """Write the full report (summary, by-frequency table, per-feature and per-latent arrays, the `sae` and
    `truth` it scored) as JSON here,
    and beside it (same name, .html) a page of every parent's absorption linking to the latents that took
    its place."""
    max_tokens: int | None = Field(None, gt=0)
    """Score on at most this many tokens (whole chunks, from the start of the store)."""
    batch_tokens: int = Field(8192, gt=0)
    """Tokens encoded at once."""
    recovered_cos: float = Field(0.9, gt=0, le=1)
    """A true feature counts as recovered when its best latent's decoder cosine reaches this."""
    split_cos: float = Field(0.5, gt=0, le=1)
    """A latent counts toward a feature's spread only if its decoder cosine to the feature reaches this."""
    split_precision: float = Field(0.5, gt=0, le=1)
    """... and if at least this fraction of its firing lies on tokens carrying the feature."""
    n_bins: int = Field(10, gt=0)
    """Frequency bins of equal feature count (10: deciles)."""
    device: str = "cpu"
    """Device to encode on (cpu, cuda, cuda:N)."""


class SplittingConfig(StageConfig):
    saes: list[str]
    """An SAE dir of the ladder; repeat the flag for each (any order: they are sorted by width)."""
    store: str
    """The activation store to stream (the SAEs' hook must be in it)."""
    out: str
    """Report directory: splits.json, frontier.json, frontier.csv, frontier.png, index.html (split pages)."""
    hook: str | None = None
    """Hook to read (default: the SAEs' hook_name)."""
    max_tokens: int | None = Field(None, gt=0)
    """Use at most this many tokens from the start of the store."""
    batch_tokens: int = Field(2048, gt=0)
    """Tokens encoded at once by every SAE."""
    min_cos: float = Field(0.3, ge=-1, le=1)
    """Decoder cosine a child needs to its parent."""
    min_coactivation: float = Field(0.5, ge=0, le=1)
    """Fraction of a child's firing that must fall on tokens where its parent fires."""
    clean_overlap: float = Field(0.05, ge=0, le=1)
    """A split is clean when at most this fraction of the parent's firing has two or more children firing."""
    device: str = "cpu"
    """Device to encode on (cpu, cuda, cuda:N)."""
    loss_recovered: bool | None = None
    """Splice each SAE into its model and add `saepipe evaluate`'s loss recovered and KL to the frontier
    (default: on for a store harvested from a model, off for a synthetic one)."""
    eval_contexts: int = Field(64, gt=0)
    """Held-out contexts per SAE for loss recovered (as `saepipe evaluate --contexts`)."""
    eval_batch_size: int = Field(8, gt=0)
    """Contexts per forward pass for loss recovered."""
    pages: bool = True
    """Write the split-tree pages (OUT/index.html): per parent its children and their top contexts."""
    top_contexts: int = Field(8, gt=0)
    """Top activating contexts per latent shown on the pages."""
    stability_threshold: float = Field(0.7, gt=0, le=1)
    """Decoder |cos| above which a latent counts as found again in another SAE (seed stability)."""
    min_agreement: float = Field(0.5, ge=0, le=1)
    """Seed agreement below which the report says the split trees cannot be read (at noise level)."""
    families: str | None = None
    """A `saepipe families` report dir (of one of these SAEs): its pages go into OUT/families/, linked both
    ways with the split trees (the cuts from the index, each child to its family, each family back)."""
    recovery: list[str] = Field(default_factory=list)
    """`saepipe recovery --out` reports of these SAEs (synthetic stores; repeat the flag): the split-tree
    pages list each SAE's most absorbed parent features and link the latents that fired in their place."""

    @model_validator(mode="after")
    def _check(self) -> SplittingConfig:
        if len(set(self.saes)) != len(self.saes):
            raise ValueError("an SAE dir is given twice")
        if (self.families is not None or self.recovery) and not self.pages:
            raise ValueError("--families and --recovery add to the split-tree pages: drop --no-pages")
        return self
