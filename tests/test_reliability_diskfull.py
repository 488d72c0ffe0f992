"""A full disk (a real size-limited tmpfs) stops harvest and training with one line, and the store or run
stays resumable: after freeing space the same command finishes, identical to a run that never ran out."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from helpers import one_line, tree_digest
from safetensors.numpy import load_file

from saepipe.cli import main

H1 = "blocks.1.hook_resid_post"


def _mount(path: Path, size: str, remount: bool = False) -> bool:
    opts = f"remount,size={size}" if remount else f"size={size}"
    cmd = ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)]
    return subprocess.run(cmd, capture_output=True).returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs at tmp_path/disk; yields a function that resizes it. Skips where mounting is not allowed."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or not _mount(disk, "64k"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield disk, lambda size: _mount(disk, size, remount=True)
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


@pytest.mark.parametrize("size", ["200k", "450k"])
def test_harvest_disk_full_then_resume(size, small_disk, tmp_path, tiny_model_dir, small_corpus, capsys):
    disk, resize = small_disk
    assert resize(size)

    def argv(out: Path) -> list[str]:
        return ["harvest", "--model", str(tiny_model_dir), "--dataset", str(small_corpus), "--hook", H1,
                "--tokens", str(64 * 32), "--context-size", "32", "--batch-size", "4", "--contexts-per-chunk", "4",
                "--chunks-per-shard", "2", "--dtype", "float32", "--out", str(out)]  # fmt: skip

    ref = tmp_path / "ref"
    assert main(argv(ref)) == 0
    out = disk / "store"
    err = one_line(argv(out), capsys)
    assert "No space left on device" in err and "rerun the same command to resume" in err, err
    assert resize("8m")
    assert main(argv(out)) == 0
    assert tree_digest(out) == tree_digest(ref)


def test_train_disk_full_then_resume(small_disk, tmp_path, tiny_store, capsys):
    disk, resize = small_disk
    assert resize("160k")

    def argv(out: Path) -> list[str]:
        return ["train", "--store", str(tiny_store), "--hook", H1, "--arch", "topk", "--arch", "relu",
                "--width", "64", "--k", "4", "--tokens", str(64 * 40), "--batch-size", "64",
                "--checkpoint-every", "5", "--device", "cpu", "--out", str(out)]  # fmt: skip

    ref = tmp_path / "ref"
    assert main(argv(ref)) == 0
    out = disk / "run"
    err = one_line(argv(out), capsys)
    assert "No space left on device" in err and "rerun the same command to resume" in err, err
    assert resize("8m")
    assert main(argv(out)) == 0
    for name in ("topk-w64-k4", "relu-w64"):
        got, want = (load_file(str(r / name / "sae_weights.safetensors")) for r in (out, ref))
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"{name}/{key}")
