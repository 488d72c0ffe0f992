"""The train stage as a pipeline runs it (`saepipe.stages.Stage`): it reads the source stage's store and
hook and gives the stages after it `sae_dirs`. Import-light: training is imported when it runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from saepipe.stages import Configs, Stage
from saepipe.train.commands import COMMANDS


def _train_configs(r: Any, ctx: dict) -> Configs:
    return [("train", r.build("train", {"stores": [ctx.get("store")], "hook": ctx["hook"], "out": str(r.out / "train")}))]  # fmt: skip


def _sae_dirs(cfg: Any) -> dict:
    return {"sae_dirs": {s.name: str(Path(cfg.out) / s.name) for s in cfg.specs()}}


def _run_train(configs: Configs) -> dict:
    from saepipe.train.cli import run

    ((_, cfg),) = configs
    run(cfg)
    return _sae_dirs(cfg)


STAGES = (
    Stage("train", COMMANDS["train"].config, _train_configs, _run_train,
          lambda r, ctx: _sae_dirs(_train_configs(r, ctx)[0][1]), required=True),
)  # fmt: skip
