"""What a stage is to a pipeline: the `Stage` type that each stage package declares beside its commands
(`saepipe.harvest.stage`, `saepipe.train.stage`, `saepipe.analyze.stage`), and that `saepipe.pipeline`
collects. This module is the bottom layer: it imports no stage.

A stage's outputs are a dict that later stages read: `store`, `hook` (and `truth`) from the source stage,
`sae_dirs` ({name: dir}) from train and families, `files` from the rest. A declaration names its config and
runner by `module:name` or imports them inside functions, so collecting the declarations (and
`saepipe --help`) never pays for torch or a model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from saepipe.config import StageConfig, load

Configs = list[tuple[str, StageConfig]]
"""(label, config) for each run of a stage; analysis stages run once per SAE."""


@dataclass(frozen=True)
class Stage:
    name: str
    config: str
    """`module:Class` of the stage's config (the same one its command parses)."""
    configs: Callable[[Any, dict[str, Any]], Configs]
    """(runner, outputs so far) -> the stage's runs, with the fields that connect stages filled in."""
    execute: Callable[[Configs], dict[str, Any]]
    """Run the configs; returns the stage's outputs."""
    predicted: Callable[[Any, dict[str, Any]], dict[str, Any]] = lambda runner, ctx: {}
    """The outputs as far as they are known before running (for validation and --dry-run)."""
    source: bool = False
    """Makes the store (harvest, synth): a pipeline has exactly one, and its digest is the store's."""
    required: bool = False
    """Every pipeline has it (train)."""
    owns_out: bool = True
    """Its outputs live under `<pipeline out>/<name>`, which a redo may clear (a cached store does not)."""
    want_extra: Callable[[Configs], dict[str, Any]] | None = None
    """More inputs than the configs that decide whether a finished run is still up to date."""
    pages: bool = False
    """Its outputs are report dirs whose index.html the runner points the user at."""


__all__ = ["Configs", "Stage", "load"]
