"""`saepipe run`: whole pipelines from pipelines.yaml, skipping stages whose outputs are up to date.

A pipeline has sections named after stage commands (`harvest` or `synth`, then `train`, then optionally
`families`, then any of `analyze`, `evaluate`, `recovery`, `splitting`); each section holds exactly that
command's config fields.
The runner fills the fields that connect stages (store paths, hook, SAE dirs, output dirs under the
pipeline's `out`), unless the section sets them itself. `families` takes the widest trained SAE as its
`sae` and the others as `baselines`; the merged dirs it writes join the trained ones, so the stages after
it analyze, evaluate or score all of them. `extends: other` starts from another pipeline;
a section set to null drops an inherited one.

Every finished stage leaves a stamp in `<out>/.saepipe/<stage>.json`: its resolved config, a digest of
its inputs (for a harvest, the dataset's fingerprint too) and where its outputs are. A rerun skips a stage whose stamp matches, so changing `train`
reuses the harvest; a stage whose settings or inputs changed is redone (its old outputs under `out` are
removed first); `--force STAGE` redoes one regardless. Harvests land in the shared cache unless
`harvest.out` is set, so pipelines that need the same store find it there.

What each stage is to a pipeline (config, how it connects to earlier outputs, how it runs) is declared
beside its commands, in `saepipe.harvest.stage`, `saepipe.train.stage` and `saepipe.analyze.stage`; the
runner iterates over those declarations (`DECLARING`).
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import json
import shutil
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

import saepipe
from saepipe.config import StageConfig, describe_validation_error
from saepipe.errors import SaepipeError
from saepipe.files import write_text_atomic
from saepipe.stages import Stage, load

DECLARING = ("saepipe.harvest.stage", "saepipe.train.stage", "saepipe.analyze.stage")
"""The modules whose `STAGES` declare what each stage is to a pipeline, in the order the stages run."""
DECLARED: tuple[Stage, ...] = tuple(s for m in DECLARING for s in importlib.import_module(m).STAGES)
STAGES = tuple(s.name for s in DECLARED)
BY_NAME = {s.name: s for s in DECLARED}
SOURCE_STAGES = tuple(s.name for s in DECLARED if s.source)


class _PipelineHead(BaseModel):
    """One named pipeline in pipelines.yaml: these fields, then one section per declared stage."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
    description: str = ""
    """What the pipeline is for (shown by `saepipe run --dry-run`)."""
    extends: str | None = None
    """Another pipeline whose sections this one starts from."""
    out: str | None = None
    """Where this pipeline's outputs go (default runs/<pipeline name>)."""


PipelineSpec = create_model(
    "PipelineSpec", __base__=_PipelineHead, **{s: (dict[str, Any] | None, None) for s in STAGES}
)
REQUIRED_STAGES = tuple(s.name for s in DECLARED if s.required)


class PipelinesFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pipelines: dict[str, PipelineSpec]


class RunConfig(StageConfig):
    pipeline: str = Field("default", json_schema_extra={"positional": True})
    """Name of the pipeline in the pipelines file."""
    config: str | None = None
    """Pipelines file (default: ./pipelines.yaml, else the one shipped with saepipe)."""
    set: list[str] = Field(default_factory=list)
    """Override one field, e.g. --set train.k=64 --set harvest.tokens=50000 (values are YAML)."""
    only: Literal[STAGES] | None = None  # type: ignore[valid-type]
    """Run only this stage (the ones before it must have run)."""
    force: list[str] = Field(default_factory=list)
    """Redo this stage even if its outputs are up to date; repeatable."""
    dry_run: bool = False
    """Print what would run and the resolved settings, then stop."""


def default_pipelines_file() -> Path:
    local = Path("pipelines.yaml")
    return local if local.exists() else Path(saepipe.__file__).resolve().parents[1] / "pipelines.yaml"


def load_pipelines(path: Path) -> PipelinesFile:
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SaepipeError(f"no pipelines file at {path}; give --config FILE") from None
    except yaml.YAMLError as e:
        raise SaepipeError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    try:
        return PipelinesFile.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        raise SaepipeError(f"{path}: {loc}: {msg}") from None


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def resolve_sections(
    file: PipelinesFile, name: str, path: Path, seen: tuple[str, ...] = ()
) -> dict[str, Any]:
    """The pipeline's sections after following `extends` (child values win)."""
    if name not in file.pipelines:
        raise SaepipeError(f"{path}: no pipeline named {name!r}; it defines: {', '.join(file.pipelines)}")
    if name in seen:
        raise SaepipeError(f"{path}: pipeline {name!r} extends itself (through {' -> '.join(seen)})")
    spec = file.pipelines[name]
    mine = spec.model_dump(exclude_unset=True, exclude={"extends"})
    if spec.extends is None:
        return {k: v for k, v in mine.items() if v is not None}
    return {
        k: v
        for k, v in _merge(resolve_sections(file, spec.extends, path, (*seen, name)), mine).items()
        if v is not None
    }


def apply_sets(sections: dict[str, Any], sets: list[str]) -> dict[str, Any]:
    out = copy.deepcopy(sections)
    for item in sets:
        key, eq, value = item.partition("=")
        stage, dot, field = key.partition(".")
        if not eq or not dot or stage not in STAGES or not field:
            raise SaepipeError(
                f"--set {item!r}: write it as STAGE.FIELD=VALUE with STAGE one of {', '.join(STAGES)}"
            )
        out.setdefault(stage, {})[field] = yaml.safe_load(value)
    return out


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _files_digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode())
        h.update(hashlib.sha256(p.read_bytes()).digest() if p.exists() else b"missing")
    return h.hexdigest()[:16]


class Runner:
    """Resolves one pipeline into stage configs (all validated before anything runs) and runs them."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.path = Path(cfg.config) if cfg.config else default_pipelines_file()
        sections = apply_sets(resolve_sections(load_pipelines(self.path), cfg.pipeline, self.path), cfg.set)
        self.name = cfg.pipeline
        self.out = Path(sections.pop("out", None) or f"runs/{cfg.pipeline}")
        self.description = sections.pop("description", "")
        self.sections: dict[str, dict] = sections
        sources = [s for s in SOURCE_STAGES if s in sections]
        if len(sources) != 1 or not all(s in sections for s in REQUIRED_STAGES):
            raise SaepipeError(
                f"{self.where()}: a pipeline needs one of {'/'.join(SOURCE_STAGES)} and a "
                f"{' and a '.join(REQUIRED_STAGES)} section"
            )
        for stage in [*cfg.force, *([cfg.only] if cfg.only else [])]:
            if stage not in sections:
                raise SaepipeError(
                    f"{self.where()}: has no {stage} stage; its stages are: {', '.join(self.stages)}"
                )
        self.source = sources[0]
        self._validate()

    @property
    def stages(self) -> list[str]:
        return [s for s in STAGES if s in self.sections]

    def where(self, stage: str | None = None) -> str:
        return f"{self.path}: pipeline {self.name!r}" + (f": {stage}" if stage else "")

    def build(self, stage: str, filled: dict[str, Any]) -> StageConfig:
        cls = load(BY_NAME[stage].config)
        try:
            return cls(**{**filled, **self.sections[stage]})
        except ValidationError as e:
            raise SaepipeError(describe_validation_error(e, self.where(stage), cls)) from None
        except TypeError as e:
            raise SaepipeError(
                f"{self.where(stage)}: the section must be a mapping of fields ({e})"
            ) from None

    def _validate(self) -> None:
        """Build every stage's config with predicted inputs, so a bad field fails before any work."""
        ctx = self.predicted(self.source, {})
        for stage in self.stages:
            ctx = {**ctx, **self.predicted(stage, ctx)}
            self.configs(stage, ctx)

    def predicted(self, stage: str, ctx: dict[str, Any]) -> dict[str, Any]:
        """The outputs a stage will have, as far as they are known before it runs."""
        return BY_NAME[stage].predicted(self, ctx)

    def configs(self, stage: str, ctx: dict[str, Any]) -> list[tuple[str, StageConfig]]:
        """(label, config) for each run of `stage`; analysis stages run once per trained SAE."""
        return BY_NAME[stage].configs(self, ctx)

    # --- running -------------------------------------------------------------------------------------

    def _stamp_path(self, stage: str) -> Path:
        return self.out / ".saepipe" / f"{stage}.json"

    def _read_stamp(self, stage: str) -> dict | None:
        try:
            return json.loads(self._stamp_path(stage).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def _write_stamp(self, stage: str, stamp: dict) -> None:
        path = self._stamp_path(stage)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(stamp, indent=1, sort_keys=True))  # the commit: written last

    def run(self) -> dict[str, Any]:
        """Run (or skip) every stage in order; return the final outputs."""
        if self.cfg.dry_run:
            print(f"pipeline {self.name!r} from {self.path}: {self.description}".rstrip(": "))
        ctx: dict[str, Any] = {}
        for stage in self.stages:
            configs = self.configs(stage, ctx)
            want = {"configs": [c.model_dump(mode="json") for _, c in configs], "inputs": _digest(ctx)}
            declared = BY_NAME[stage]
            if declared.want_extra is not None:
                want.update(declared.want_extra(configs))
            stamp = self._read_stamp(stage)
            done = stamp is not None and stamp.get("status") == "done"
            fresh = done and stamp["want"] == want and _outputs_exist(stamp["outputs"])
            if self.cfg.only and stage != self.cfg.only:
                if not done:
                    raise SaepipeError(
                        f"{self.where(stage)} has not run yet; run the pipeline without --only first"
                    )
                ctx = {**ctx, **stamp["outputs"]}
                continue
            if fresh and stage not in self.cfg.force:
                print(f"[{stage}] up to date, skipped")
                ctx = {**ctx, **stamp["outputs"]}
                continue
            # A harvest stamped before dataset fingerprints (issue 16): redoing it unasked could replace the
            # later stages' outputs, trusting it could serve an edited corpus, so the user decides.
            legacy = done and not set(want) <= set(stamp["want"])
            if legacy and stage not in self.cfg.force and not self.cfg.dry_run:
                raise SaepipeError(
                    f"{self.where(stage)}: its harvest was stamped before saepipe fingerprinted datasets, so "
                    "whether the corpus changed since cannot be checked; rerun with --force harvest to harvest "
                    "again (the stages after it are redone if the store changed)"
                )
            if self.cfg.dry_run:
                print(f"[{stage}] would run:")
                for label, c in configs:
                    print(f"  {label}: " + json.dumps(c.model_dump(mode="json", exclude_defaults=True)))
                ctx = {**ctx, **self.predicted(stage, ctx)}
                continue
            if stamp is not None and stamp["want"] != want:
                print(f"[{stage}] settings or inputs changed since the last run; redoing it")
                self._clear_owned(stage)
            elif stage in self.cfg.force:
                self._clear_owned(stage)
            # A "running" stamp with the same settings lets a killed stage resume on rerun, not restart.
            self._write_stamp(stage, {"want": want, "status": "running"})
            outputs = declared.execute(configs)
            outputs["digest"] = _output_digest(declared.source, outputs)
            self._write_stamp(stage, {"want": want, "status": "done", "outputs": outputs})
            ctx = {**ctx, **outputs}
        return ctx

    def _clear_owned(self, stage: str) -> None:
        """Remove old outputs of a stage that is being redone, where the runner chose their place."""
        if not BY_NAME[stage].owns_out or "out" in self.sections[stage]:
            return  # cached stores are keyed by their settings; user-chosen paths are left alone
        shutil.rmtree(self.out / stage, ignore_errors=True)
        self._stamp_path(stage).unlink(missing_ok=True)


def _outputs_exist(outputs: dict[str, Any]) -> bool:
    from saepipe.harvest.store import store_exists

    if "store" in outputs and not store_exists(outputs["store"]):
        return False
    paths = [*outputs.get("sae_dirs", {}).values(), *outputs.get("files", [])]
    return all(Path(p).exists() for p in paths)


def _output_digest(source: bool, outputs: dict[str, Any]) -> str:
    """What downstream stages depend on: the store's metadata, or the SAE weights."""
    if "store" in outputs and source:
        from saepipe.harvest import open_store

        return _digest(open_store(outputs["store"]).meta)
    if "sae_dirs" in outputs:
        return _files_digest([Path(d) / "sae_weights.safetensors" for d in outputs["sae_dirs"].values()])
    return _digest(outputs)


def run(cfg: RunConfig) -> int:
    runner = Runner(cfg)
    outputs = runner.run()
    if cfg.dry_run:
        return 0
    for stage in (s.name for s in DECLARED if s.pages):
        if stage in runner.sections and not cfg.only:
            for path in runner._read_stamp(stage)["outputs"]["files"]:
                page = Path(path) / "index.html"
                if page.exists():
                    print(f"dashboard: {page.resolve()}")
    print(f"pipeline {runner.name!r} done; outputs under {runner.out}/ (store: {outputs['store']})")
    return 0
