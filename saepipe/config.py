"""Stage configs: one pydantic model per stage serves the CLI flags and the `pipelines.yaml` section.

Each field carries a docstring (pydantic's `use_attribute_docstrings`) that is also its `--help` text, so
flags, YAML keys and documentation cannot drift apart. `add_config_args` builds argparse flags from a
model; `config_from_args` turns the flags a user gave back into a validated model.
"""

from __future__ import annotations

import argparse
import importlib
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from saepipe.errors import SaepipeError

C = TypeVar("C", bound="StageConfig")


@dataclass(frozen=True)
class Command:
    """A `saepipe` subcommand, declared by a stage in its `commands.py` (`COMMANDS = {name: Command}`)."""

    help: str
    config: str
    """`module:Class` of the stage config; its fields become the flags."""
    run: str
    """`module:function` taking the validated config and returning an exit code."""


def load(ref: str) -> Any:
    """The object a `module:name` reference names, imported only now (declarations stay import-light)."""
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


class StageConfig(BaseModel):
    """Base for stage configs: unknown fields are refused, values are checked on construction."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True)

    @model_validator(mode="before")
    @classmethod
    def _scalars_to_lists(cls, values: Any) -> Any:
        """`k: 64` in YAML or `--set train.k=64` means `[64]` for a repeatable field."""
        if isinstance(values, dict):
            for name, field in cls.model_fields.items():
                ann = _unwrap_optional(field.annotation)
                value = values.get(name)
                if get_origin(ann) is list and value is not None and not isinstance(value, list | tuple):
                    values = {**values, name: [value]}  # None stays None (an optional list left unset)
        return values


def _flag(name: str, field: Any) -> str:
    extra = field.json_schema_extra or {}
    return str(extra.get("flag", "--" + name.replace("_", "-")))


def _unwrap_optional(annotation: Any) -> Any:
    if get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def add_config_args(parser: argparse.ArgumentParser, model: type[StageConfig]) -> None:
    """Add one flag per field of `model`; absent flags stay absent so the model's defaults apply."""
    for name, field in model.model_fields.items():
        ann = _unwrap_optional(field.annotation)
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": field.description}
        origin = get_origin(ann)
        if ann is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin is list:
            (item,) = get_args(ann) or (str,)
            kwargs.update(action="extend", nargs="+", type=_scalar(item))
        elif origin is Literal:
            choices = get_args(ann)
            kwargs.update(choices=choices, type=type(choices[0]))
        else:
            kwargs["type"] = _scalar(ann)
        if (field.json_schema_extra or {}).get("positional"):
            kwargs.pop("dest")
            kwargs["nargs"] = None if field.is_required() else "?"
            parser.add_argument(name, metavar=name.upper(), **kwargs)
            continue
        if field.is_required():
            kwargs["required"] = True
        parser.add_argument(_flag(name, field), **kwargs)


def _scalar(tp: Any) -> Any:
    tp = _unwrap_optional(tp)
    return tp if tp in (int, float) else str


def config_from_args(model: type[C], args: argparse.Namespace, base: dict | None = None) -> C:
    """Validate the given flags (over `base` values, e.g. a pipelines.yaml section) into `model`."""
    values = dict(base or {})
    values.update({k: v for k, v in vars(args).items() if k in model.model_fields})
    return validate(model, values, where="command line")


def validate(model: type[C], values: dict, where: str) -> C:
    """Build `model` from `values`, turning pydantic's report into one clear SaepipeError line."""
    try:
        return model(**values)
    except ValidationError as e:
        raise SaepipeError(describe_validation_error(e, where, model)) from None


def describe_validation_error(e: ValidationError, where: str, model: type[StageConfig]) -> str:
    """One line naming the place, field and problem for the first error (and how many more)."""
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "(config)"
    field = model.model_fields.get(str(err["loc"][0])) if err["loc"] else None
    shown = _flag(str(err["loc"][0]), field) if (field is not None and where == "command line") else loc
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = f"unknown field; valid fields are: {', '.join(model.model_fields)}"
    elif err["type"] == "missing":
        msg = "is required"
    more = f" (and {len(e.errors()) - 1} more problem(s))" if len(e.errors()) > 1 else ""
    return f"{where}: {shown}: {msg}{more}" if err["loc"] else f"{where}: {msg}{more}"
