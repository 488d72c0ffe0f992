"""Shared bits of the benchmark scripts: machine description and appending to RESULTS.md."""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("RESULTS.md")
HEADER = "| date | benchmark | setting | figures | ratio | device | torch |\n|---|---|---|---|---|---|---|\n"


def machine(device: str = "auto") -> str:
    if (device in ("auto", "cuda") and torch.cuda.is_available()) or device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"CPU {platform.machine()}, {os.cpu_count()} cores"


def append_result(name: str, setting: str, figures: str, ratio: str, device: str) -> None:
    """Append one row to the table in RESULTS.md (creating the table if absent)."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\n"
    if HEADER not in text:
        text += "\n" + HEADER
    date = datetime.date.today().isoformat()
    text += f"| {date} | {name} | {setting} | {figures} | {ratio} | {device} | {torch.__version__} |\n"
    RESULTS.write_text(text)
