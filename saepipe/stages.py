"""What each stage is to a pipeline, declared in one place: its config, how it connects to the outputs of
the stages before it, what it predicts before running, and how it runs. `saepipe.pipeline.Runner` iterates
over `DECLARED` and knows no stage by name.

A stage's outputs are a dict that later stages read: `store`, `hook` (and `truth`) from the source stage,
`sae_dirs` ({name: dir}) from train and families, `files` from the rest. Stage modules are imported only
when a stage is built or run, so `saepipe --help` does not pay for them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saepipe.config import StageConfig

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
    owns_out: bool = True
    """Its outputs live under `<pipeline out>/<name>`, which a redo may clear (a cached store does not)."""
    want_extra: Callable[[Configs], dict[str, Any]] | None = None
    """More inputs than the configs that decide whether a finished run is still up to date."""
    pages: bool = False
    """Its outputs are report dirs whose index.html the runner points the user at."""


def load(ref: str) -> Any:
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


# --- source stages ------------------------------------------------------------------------------------


def _harvest_configs(r: Any, ctx: dict) -> Configs:
    return [("harvest", r.build("harvest", {}))]


def _harvest_predicted(r: Any, ctx: dict) -> dict:
    h = r.build("harvest", {})
    return {"store": h.out or "<store in the cache>", "hook": h.hooks[0]}


def _harvest_want(configs: Configs) -> dict:
    """The text itself, not just the dataset's name: an edited corpus is redone."""
    from saepipe.harvest.corpus import dataset_fingerprint

    return {"dataset": dataset_fingerprint(configs[0][1].dataset)}


def _run_harvest(configs: Configs) -> dict:
    from saepipe.harvest.cli import summary
    from saepipe.harvest.harvester import harvest

    ((_, cfg),) = configs
    res = harvest(cfg)
    print(summary(res))
    return {"store": res.path, "hook": cfg.hooks[0]}


def _synth_configs(r: Any, ctx: dict) -> Configs:
    return [("synth", r.build("synth", {"out": str(r.out / "synth")}))]


def _synth_outputs(out: str) -> dict:
    from saepipe.harvest.synthetic import HOOK

    return {"store": f"{out}/store", "truth": out, "hook": HOOK}


def _run_synth(configs: Configs) -> dict:
    from saepipe.harvest.synthetic import run

    ((_, cfg),) = configs
    run(cfg)
    return _synth_outputs(cfg.out)


# --- train and families -------------------------------------------------------------------------------


def _train_configs(r: Any, ctx: dict) -> Configs:
    return [("train", r.build("train", {"stores": [ctx.get("store")], "hook": ctx["hook"], "out": str(r.out / "train")}))]  # fmt: skip


def _sae_dirs(cfg: Any) -> dict:
    return {"sae_dirs": {s.name: str(Path(cfg.out) / s.name) for s in cfg.specs()}}


def _run_train(configs: Configs) -> dict:
    from saepipe.train.cli import run

    ((_, cfg),) = configs
    run(cfg)
    return _sae_dirs(cfg)


def _families_configs(r: Any, ctx: dict) -> Configs:
    """The widest trained SAE is `sae`, the others its `baselines`."""
    saes: dict[str, str] = ctx["sae_dirs"]
    widths = {s.name: s.width for s in r.configs("train", ctx)[0][1].specs()}
    widest = max(saes, key=lambda n: widths.get(n, 0))
    fill = {"sae": saes[widest], "baselines": [d for n, d in saes.items() if n != widest]}
    return [("families", r.build("families", {**fill, "store": ctx.get("store"), "out": str(r.out / "families")}))]  # fmt: skip


def _families_predicted(r: Any, ctx: dict) -> dict:
    from saepipe.analyze.families_cmd import merged_dirs

    return {"sae_dirs": {**ctx["sae_dirs"], **merged_dirs(r.configs("families", ctx)[0][1])}}


def _run_families(configs: Configs) -> dict:
    """One families run; its merged dirs join the SAEs the later stages work on."""
    from saepipe.analyze.families_cmd import merged_dirs, run

    ((_, cfg),) = configs
    run(cfg)
    given = {Path(p).name: p for p in [cfg.sae, *cfg.ladder, *cfg.baselines]}
    saes = dict(sorted({**given, **merged_dirs(cfg)}.items()))  # the order a stamp gives back (sorted keys)
    return {"sae_dirs": saes, "files": [str(Path(cfg.out) / "families.json")]}


# --- analysis stages ----------------------------------------------------------------------------------


def _per_sae(stage: str, fill: Callable[[Any, dict, str, str], dict]) -> Callable[[Any, dict], Configs]:
    """Configs for a stage that runs once per SAE dir (`fill(runner, ctx, name, dir)`)."""

    def configs(r: Any, ctx: dict) -> Configs:
        return [(name, r.build(stage, fill(r, ctx, name, d))) for name, d in ctx["sae_dirs"].items()]

    return configs


def _each(runner: str, out_key: str) -> Callable[[Configs], dict]:
    def execute(configs: Configs) -> dict:
        fn = load(runner)
        for _, cfg in configs:
            fn(cfg)
        return {"files": [str(getattr(cfg, out_key)) for _, cfg in configs]}

    return execute


def _splitting_configs(r: Any, ctx: dict) -> Configs:
    fill = {
        "saes": list(ctx["sae_dirs"].values()),
        "store": ctx.get("store"),
        "out": str(r.out / "splitting"),
    }
    return [("splitting", r.build("splitting", fill))]


def _run_recovery(configs: Configs) -> dict:
    """Score every SAE, then one table of recovery by frequency decile across them (with L0 and FVU)."""
    from saepipe.analyze.frontier import as_row, measure_frontier
    from saepipe.analyze.merge import label_merged
    from saepipe.analyze.recovery import run
    from saepipe.analyze.recovery_table import frontier_metrics, load_reports, recovery_table

    for _, cfg in configs:
        run(cfg)
    first = configs[0][1]
    points = measure_frontier([c.sae for _, c in configs], first.store, max_tokens=first.max_tokens)
    metrics = label_merged(frontier_metrics([as_row(p) for p in points]), {n: c.sae for n, c in configs})
    table = recovery_table(load_reports({name: c.out for name, c in configs}), metrics)
    out = Path(first.out).parent
    (out / "table.md").write_text(table.markdown + "\n")
    (out / "table.json").write_text(table.json())
    print(
        f"\nrecovery by feature frequency (rarest decile first), also in {out / 'table.md'}:\n{table.markdown}"
    )
    return {"files": [str(c.out) for _, c in configs] + [str(out / "table.md")]}


DECLARED: tuple[Stage, ...] = (
    Stage("harvest", "saepipe.harvest.config:HarvestConfig", _harvest_configs, _run_harvest,
          _harvest_predicted, source=True, owns_out=False, want_extra=_harvest_want),
    Stage("synth", "saepipe.harvest.synthetic:SynthConfig", _synth_configs, _run_synth,
          lambda r, ctx: _synth_outputs(_synth_configs(r, ctx)[0][1].out), source=True),
    Stage("train", "saepipe.train.config:TrainConfig", _train_configs, _run_train,
          lambda r, ctx: _sae_dirs(_train_configs(r, ctx)[0][1])),
    Stage("families", "saepipe.analyze.families_cmd:FamiliesConfig", _families_configs, _run_families,
          _families_predicted),
    Stage("analyze", "saepipe.analyze.config:AnalyzeConfig",
          _per_sae("analyze", lambda r, ctx, n, d: {"sae": d, "store": ctx.get("store"), "out": str(r.out / "analyze" / n)}),
          _each("saepipe.analyze.cli:run", "out"), pages=True),
    Stage("evaluate", "saepipe.analyze.config:EvaluateConfig",
          _per_sae("evaluate", lambda r, ctx, n, d: {"sae": d, "store": ctx.get("store"), "out": str(r.out / "evaluate" / f"{n}.json")}),
          _each("saepipe.analyze.cli:run_evaluate", "out")),
    Stage("recovery", "saepipe.analyze.recovery:RecoveryConfig",
          _per_sae("recovery", lambda r, ctx, n, d: {"sae": d, "truth": ctx.get("truth"), "store": ctx.get("store"),
                                                     "out": str(r.out / "recovery" / f"{n}.json")}),
          _run_recovery),
    Stage("splitting", "saepipe.analyze.splitting:SplittingConfig", _splitting_configs,
          _each("saepipe.analyze.splitting:run", "out"), pages=True),
)  # fmt: skip
"""Every stage a pipeline can hold, in the order they run."""

STAGES = tuple(s.name for s in DECLARED)
BY_NAME = {s.name: s for s in DECLARED}
