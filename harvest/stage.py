"""The harvest package's stages as a pipeline runs them (`saepipe.stages.Stage`): `harvest` and `synth`,
the two ways to make the store every later stage reads. Import-light: the work is imported when it runs."""

from __future__ import annotations

from typing import Any

from saepipe.harvest.commands import COMMANDS
from saepipe.stages import Configs, Stage


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


STAGES = (
    Stage("harvest", COMMANDS["harvest"].config, _harvest_configs, _run_harvest, _harvest_predicted,
          source=True, owns_out=False, want_extra=_harvest_want),
    Stage("synth", COMMANDS["synth"].config, _synth_configs, _run_synth,
          lambda r, ctx: _synth_outputs(_synth_configs(r, ctx)[0][1].out), source=True),
)  # fmt: skip
"""Source stages: a pipeline has exactly one of them."""
