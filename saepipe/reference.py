"""Generate docs/reference.md: every `saepipe` command and config field, from the config models.

The same models build the CLI and validate pipelines.yaml, so this page cannot drift from either; a test
checks that the committed page equals a fresh rendering (`python -m saepipe.reference > docs/reference.md`).
"""

from __future__ import annotations

from typing import Any

from pydantic_core import PydanticUndefined

from saepipe.cli import commands
from saepipe.config import _flag, _unwrap_optional, load

HEADER = """# saepipe command and config reference

Generated from the config models by `python -m saepipe.reference > docs/reference.md`; do not edit by hand.
Each field is a CLI flag (`--flag-name`) and the key of the same name in the command's `pipelines.yaml`
section. Repeatable flags take several values (`--width 1024 2048` or `--width 1024 --width 2048`) and
a list in YAML.
"""


def _type(annotation: Any) -> str:
    return str(_unwrap_optional(annotation)).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _default(field: Any) -> str:
    if field.is_required():
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default
    return "" if value is PydanticUndefined else f"`{value!r}`"


def render() -> str:
    parts = [HEADER]
    for name, cmd in commands().items():
        model = load(cmd.config)
        parts.append(f"\n## `saepipe {name}`\n\n{cmd.help[0].upper() + cmd.help[1:]}.\n")
        parts.append("| flag / YAML key | type | default | meaning |\n|---|---|---|---|")
        for fname, field in model.model_fields.items():
            extra = field.json_schema_extra or {}
            flag = fname.upper() if extra.get("positional") else f"{_flag(fname, field)}` / `{fname}"
            doc = " ".join((field.description or "").split()).replace("|", "\\|")
            parts.append(f"| `{flag}` | {_type(field.annotation)} | {_default(field)} | {doc} |")
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    print(render(), end="")
