"""The analyze package's stages as a pipeline runs them (`saepipe.stages.Stage`): `families` (its merged
dirs join the trained SAEs), then `analyze`, `evaluate`, `recovery` (once per SAE) and `splitting` (once
over all). Import-light: the analyses are imported when they run."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from saepipe.analyze.commands import COMMANDS
from saepipe.stages import Configs, Stage, load


def _families_configs(r: Any, ctx: dict) -> Configs:
    """The widest trained SAE is `sae`, the others its `baselines`."""
    saes: dict[str, str] = ctx["sae_dirs"]
    widths = {s.name: s.width for s in r.configs("train", ctx)[0][1].specs()}
    widest = max(saes, key=lambda n: widths.get(n, 0))
    fill = {"sae": saes[widest], "baselines": [d for n, d in saes.items() if n != widest]}
    return [("families", r.build("families", {**fill, "store": ctx.get("store"), "out": str(r.out / "families")}))]  # fmt: skip


def _families_outputs(cfg: Any, saes: dict[str, str]) -> dict:
    """The merged dirs join the SAEs the later stages work on; `merged` names them, and `families` is the
    report dir whose pages the split trees show (None without pages)."""
    from saepipe.analyze.families_cmd import merged_dirs

    merged = merged_dirs(cfg)
    return {
        "sae_dirs": dict(sorted({**saes, **merged}.items())),  # the order a stamp gives back (sorted keys)
        "merged": sorted(merged),
        "families": cfg.out if cfg.pages else None,
    }


def _families_predicted(r: Any, ctx: dict) -> dict:
    return _families_outputs(r.configs("families", ctx)[0][1], ctx["sae_dirs"])


def _run_families(configs: Configs) -> dict:
    from saepipe.analyze.families_cmd import run

    ((_, cfg),) = configs
    run(cfg)
    given = {Path(p).name: p for p in [cfg.sae, *cfg.ladder, *cfg.baselines]}
    return _families_outputs(cfg, given) | {"files": [str(Path(cfg.out) / "families.json")]}


def _per_sae(stage: str, fill: Callable[[Any, dict, str, str], dict]) -> Callable[[Any, dict], Configs]:
    """Configs for a stage that runs once per SAE dir (`fill(runner, ctx, name, dir)`)."""

    def configs(r: Any, ctx: dict) -> Configs:
        return [(name, r.build(stage, fill(r, ctx, name, d))) for name, d in ctx["sae_dirs"].items()]

    return configs


def _each(stage: str, out_key: str) -> Callable[[Configs], dict]:
    """Run `stage`'s command once per config; its outputs are each run's `out_key`."""

    def execute(configs: Configs) -> dict:
        fn = load(COMMANDS[stage].run)
        for _, cfg in configs:
            fn(cfg)
        return {"files": [str(getattr(cfg, out_key)) for _, cfg in configs]}

    return execute


def _splitting_configs(r: Any, ctx: dict) -> Configs:
    """The trained SAEs (merged dirs are shown as the families' pages, not as rungs of the ladder), with the
    families report and the recovery reports of the stages before it, when the pipeline has them."""
    saes = {n: d for n, d in ctx["sae_dirs"].items() if n not in ctx.get("merged", [])}
    reports = ctx.get("recovery_reports", {})
    fill = {
        "saes": list(saes.values()),
        "store": ctx.get("store"),
        "out": str(r.out / "splitting"),
        "families": ctx.get("families"),
        "recovery": [reports[n] for n in saes if n in reports],
    }
    return [("splitting", r.build("splitting", fill))]


def _recovery_predicted(r: Any, ctx: dict) -> dict:
    return {"recovery_reports": {n: c.out for n, c in r.configs("recovery", ctx)}}


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
    return {
        "files": [str(c.out) for _, c in configs] + [str(out / "table.md")],
        "recovery_reports": {n: c.out for n, c in configs},
    }


STAGES = (
    Stage("families", COMMANDS["families"].config, _families_configs, _run_families, _families_predicted),
    Stage("analyze", COMMANDS["analyze"].config,
          _per_sae("analyze", lambda r, ctx, n, d: {"sae": d, "store": ctx.get("store"), "out": str(r.out / "analyze" / n)}),
          _each("analyze", "out"), pages=True),
    Stage("evaluate", COMMANDS["evaluate"].config,
          _per_sae("evaluate", lambda r, ctx, n, d: {"sae": d, "store": ctx.get("store"), "out": str(r.out / "evaluate" / f"{n}.json")}),
          _each("evaluate", "out")),
    Stage("recovery", COMMANDS["recovery"].config,
          _per_sae("recovery", lambda r, ctx, n, d: {"sae": d, "truth": ctx.get("truth"), "store": ctx.get("store"),
                                                     "out": str(r.out / "recovery" / f"{n}.json")}),
          _run_recovery, _recovery_predicted),
    Stage("splitting", COMMANDS["splitting"].config, _splitting_configs, _each("splitting", "out"), pages=True),
)  # fmt: skip
"""In the order they run, after train."""
