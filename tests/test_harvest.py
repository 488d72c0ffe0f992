"""Harvest: kill -9 and rerun ends byte-identical; reruns and bad input are refused with one clear line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import committed, tree_digest

from saepipe.cli import main
from saepipe.harvest import open_store
from saepipe.harvest.config import HarvestConfig
from saepipe.harvest.harvester import harvest


def _args(tiny_model_dir: Path, corpus: Path, out: Path, **over) -> list[str]:
    opts = {
        "--model": str(tiny_model_dir),
        "--dataset": str(corpus),
        "--hook": "blocks.0.hook_resid_post",
        "--tokens": "6400",
        "--context-size": "32",
        "--batch-size": "4",
        "--contexts-per-chunk": "4",
        "--chunks-per-shard": "2",
        "--out": str(out),
        **over,
    }
    return [x for k, v in opts.items() for x in (k, v)]


def _config(argv: list[str]) -> HarvestConfig:
    keys = [a[2:].replace("-", "_") for a in argv[::2]]
    values = dict(zip(keys, argv[1::2]))
    values["hooks"] = [values.pop("hook")]
    return HarvestConfig(**values)


def test_kill_and_resume_is_byte_identical(tmp_path, tiny_model_dir, small_corpus):
    ref, resumed = tmp_path / "ref", tmp_path / "resumed"
    harvest(_config(_args(tiny_model_dir, small_corpus, ref)), progress=False)

    argv = _args(tiny_model_dir, small_corpus, resumed)
    cmd = [sys.executable, "-m", "saepipe", "harvest", *argv]
    kills = 0
    for kill_after in (8, 64, 120):  # committed contexts at which to kill -9 (target: 200)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while proc.poll() is None and committed(resumed) < kill_after and time.monotonic() < deadline:
            time.sleep(0.005)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
        assert committed(resumed) < 200, "the run finished before it could be killed"
    assert kills == 3
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    assert open_store(str(resumed)).n_contexts == 200
    assert tree_digest(resumed) == tree_digest(ref)


def test_rerun_of_finished_store_does_nothing(tiny_store, tiny_model_dir, small_corpus, capsys):
    before = tree_digest(tiny_store)
    argv = [
        "harvest", "--model", str(tiny_model_dir), "--dataset", str(small_corpus),
        "--hook", "blocks.0.hook_resid_post", "--hook", "blocks.1.hook_resid_post",
        "--tokens", str(40 * 32), "--context-size", "32", "--batch-size", "4",
        "--contexts-per-chunk", "4", "--chunks-per-shard", "2", "--dtype", "float32", "--out", str(tiny_store),
    ]  # fmt: skip
    assert main(argv) == 0
    assert "already complete" in capsys.readouterr().out
    assert tree_digest(tiny_store) == before


def _fails(argv: list[str], capsys) -> str:
    assert main(["harvest", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_different_settings_are_refused(tiny_store, tiny_model_dir, small_corpus, capsys):
    before = tree_digest(tiny_store)
    argv = _args(tiny_model_dir, small_corpus, tiny_store, **{"--tokens": "1280", "--context-size": "32"})
    err = _fails([*argv, "--hook", "blocks.1.hook_resid_post", "--dtype", "float16"], capsys)
    assert "dtype='float32', not 'float16'" in err
    assert tree_digest(tiny_store) == before


@pytest.mark.parametrize(
    ("over", "expected"),
    [
        ({"--hook": "blocks.0.hook_resid_pots"}, "close names: blocks.0.hook_resid_post"),
        ({"--context-size": "100000"}, "exceeds the model's maximum of 256"),
        ({"--text-column": "body", "--dataset": "JSONL"}, "'body' is not in dataset"),
        ({"--dataset": "EMPTY"}, "less text than one context"),
        ({"--out": "/proc/saepipe-store"}, "cannot write in /proc"),
        ({"--context-size": "0"}, "--context-size"),
        ({"--batch-size": "64"}, "batch_size must be at most"),
    ],
)
def test_bad_input_is_one_line(tmp_path, tiny_model_dir, small_corpus, capsys, over, expected):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("   \n")
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text(json.dumps({"text": "To be or not to be. " * 50}) + "\n")
    over = {k: {"EMPTY": str(empty), "JSONL": str(jsonl)}.get(v, v) for k, v in over.items()}
    err = _fails(_args(tiny_model_dir, small_corpus, tmp_path / "out", **over), capsys)
    assert expected in err
    assert not (tmp_path / "out").exists()
