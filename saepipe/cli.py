"""The `saepipe` command: one subcommand per stage, flags generated from each stage's config model.

User mistakes (`SaepipeError`) are printed here as one line on stderr with exit code 2; anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn

from saepipe.config import Command, add_config_args, config_from_args, load
from saepipe.errors import SaepipeError

STAGES = ("harvest", "train", "analyze")


def commands() -> dict[str, Command]:
    """Every stage contributes its subcommands through `saepipe.<stage>.commands.COMMANDS`."""
    found: dict[str, Command] = {
        "run": Command(
            "run a named pipeline from pipelines.yaml, skipping stages whose outputs are up to date",
            "saepipe.pipeline:RunConfig",
            "saepipe.pipeline:run",
        )
    }
    for stage in STAGES:
        try:
            module = importlib.import_module(f"saepipe.{stage}.commands")
        except ModuleNotFoundError as e:
            if e.name != f"saepipe.{stage}.commands":
                raise
            continue
        found.update(module.COMMANDS)
    return found


class _OneLineParser(argparse.ArgumentParser):
    """argparse's own errors as one line too, like every SaepipeError (no usage block)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def build_parser(command: str | None) -> argparse.ArgumentParser:
    """The parser; only the chosen command's config is imported, so `saepipe --help` stays fast."""
    parser = _OneLineParser(prog="saepipe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, cmd in commands().items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        if name == command:
            add_config_args(p, load(cmd.config))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    known = commands()
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command if command in known else None).parse_args(argv)
    cmd = known[args.command]
    try:
        cfg = config_from_args(load(cmd.config), args)
        return int(load(cmd.run)(cfg) or 0)
    except SaepipeError as e:
        if sys.stderr.isatty():
            print(file=sys.stderr)  # past a progress bar's last frame, which ends without a newline
        print(f"saepipe {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"saepipe {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
