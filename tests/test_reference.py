"""docs/reference.md is exactly what the config models render: flags, YAML keys and docs cannot drift."""

from pathlib import Path

from saepipe.reference import render

REPO = Path(__file__).resolve().parents[1]


def test_reference_is_up_to_date():
    committed = (REPO / "docs" / "reference.md").read_text()
    assert committed == render(), "run: python -m saepipe.reference > docs/reference.md"


def test_every_command_is_documented():
    from saepipe.cli import commands

    text = render()
    for name in commands():
        assert f"## `saepipe {name}`" in text
