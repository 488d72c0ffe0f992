"""`saepipe train` end to end on a store written by the harvest stage, with W&B offline, and resume.

The resume test kills a real training process with SIGKILL after its first checkpoint, reruns the same
command and demands bit-identical SAE weights to an uninterrupted run (CPU, fixed seed).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from helpers import assert_same_weights

from saepipe.cli import main
from saepipe.harvest import open_store
from saepipe.train import load_sae

HOOK = "blocks.1.hook_resid_post"


def test_train_cli_on_harvested_store_with_wandb_offline(tiny_store, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    argv = [
        "train",
        "--store",
        str(tiny_store),
        "--hook",
        HOOK,
        "--arch",
        "topk",
        "--width",
        "128",
        "--k",
        "8",
    ]
    argv += ["--tokens", str(64 * 150), "--batch-size", "64", "--lr", "3e-3", "--out", str(out)]
    argv += ["--log-every", "50", "--wandb", "offline", "--device", "cpu", "--normalize"]
    assert main(argv) == 0
    sae = load_sae(out / "topk-w128-k8")
    cfg = sae.cfg
    assert cfg["hook_name"] == HOOK and cfg["k"] == 8 and cfg["d_in"] == 64 and cfg["d_sae"] == 128
    assert cfg["saepipe"]["store"][0]["path"] == str(tiny_store)
    assert cfg["saepipe"]["training"]["tokens"] == 64 * 150

    # the saved SAE maps raw activations (normalisation folded in) and reconstructs them
    store = open_store(str(tiny_store))
    x = torch.from_numpy(store.activations(HOOK)[:, 1:].reshape(-1, 64).astype(np.float32))
    with torch.no_grad():
        recon = sae(x)
        z = sae.encode(x)
    fvu = float((x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert fvu < 0.5, fvu
    assert int((z != 0).sum(-1).max()) <= 8

    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    logged = b"".join(p.read_bytes() for p in runs[0].rglob("*.wandb"))
    for key in (b"topk-w128-k8/fvu", b"topk-w128-k8/l0", b"topk-w128-k8/dead_fraction", b"tokens_per_second"):
        assert key in logged, key

    # rerunning a finished run does nothing and leaves the weights alone
    before = (out / "topk-w128-k8" / "sae_weights.safetensors").read_bytes()
    assert main(argv) == 0
    assert (out / "topk-w128-k8" / "sae_weights.safetensors").read_bytes() == before


def _command(store: Path, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "saepipe", "train", "--store", str(store), "--hook", HOOK,
        "--arch", "topk", "--arch", "jumprelu", "--width", "256", "--k", "8",
        "--tokens", str(128 * 600), "--batch-size", "128", "--buffer-tokens", "400",
        "--checkpoint-every", "50", "--log-every", "100", "--device", "cpu", "--out", str(out),
    ]  # fmt: skip


def test_kill_and_resume_ends_with_the_same_weights(tiny_store, tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    reference = tmp_path / "uninterrupted"
    subprocess.run(_command(tiny_store, reference), check=True, env=env, capture_output=True)

    out = tmp_path / "killed"
    proc = subprocess.Popen(
        _command(tiny_store, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    state = out / "checkpoint" / "state.json"
    deadline = time.time() + 120
    while not state.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = json.loads(state.read_text())["step"]
    assert 0 < killed_at < 600 and not (out / "topk-w256-k8").exists(), "the kill came too late: vacuous"

    res = subprocess.run(_command(tiny_store, out), env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "resuming" in res.stdout
    assert_same_weights(out, reference, ("topk-w256-k8", "jumprelu-w256"))


def test_checkpoint_left_only_as_old_is_recovered(tmp_path):
    """A kill between the checkpoint's two renames leaves `checkpoint.old`: resume must use it, not restart."""
    from saepipe.train import checkpoint

    out = tmp_path / "run"
    (out / "checkpoint.old").mkdir(parents=True)
    (out / "checkpoint.old" / "state.json").write_text('{"step": 7}')
    (out / "checkpoint.partial").mkdir()
    assert checkpoint.exists(out) and checkpoint.read_state(out)["step"] == 7
    assert not (out / "checkpoint.old").exists()


def test_checkpoint_saves_over_a_stale_old_copy(tmp_path):
    """A kill after the second rename (before `checkpoint.old` is removed) leaves both dirs: the next save
    must replace the stale copy, not fail on it."""
    import torch

    from saepipe.train import checkpoint
    from saepipe.train.loader import StreamPosition
    from saepipe.train.saes import build_sae
    from saepipe.train.step import make_optimizer

    out = tmp_path / "run"
    for name, step in (("checkpoint", 8), ("checkpoint.old", 4)):
        (out / name).mkdir(parents=True)
        (out / name / "state.json").write_text(json.dumps({"step": step}))
    torch.manual_seed(0)
    sae = build_sae("topk", 8, 16, k=2)
    checkpoint.save(out, 12, {}, None, {"s": sae}, {"s": make_optimizer(sae, 1e-3)}, StreamPosition())
    assert checkpoint.read_state(out)["step"] == 12 and not (out / "checkpoint.old").exists()


def test_an_older_checkpoint_without_new_training_state_resumes(tmp_path):
    """A JumpReLU checkpoint written before its L0 controller existed has no controller buffers: resuming
    starts the controller fresh and keeps every weight; a checkpoint missing a weight is refused."""
    import pytest
    import torch
    from safetensors.torch import load_file, save_file

    from saepipe.errors import SaepipeError
    from saepipe.train import checkpoint
    from saepipe.train.loader import StreamPosition
    from saepipe.train.saes import build_sae
    from saepipe.train.step import make_optimizer

    hp = {"target_l0": 3.0}
    torch.manual_seed(0)
    sae = build_sae("jumprelu", 8, 16, hparams=hp)
    sae.log_multiplier.fill_(0.5)
    out = tmp_path / "run"
    checkpoint.save(out, 12, {}, None, {"s": sae}, {"s": make_optimizer(sae, 1e-3)}, StreamPosition())
    path = out / "checkpoint" / "s.safetensors"
    tensors = load_file(str(path))
    controller = ("model.l0_ema", "model.l0_trend", "model.log_multiplier", "model.l0_batches")
    save_file({k: v for k, v in tensors.items() if k not in controller}, str(path))
    fresh = build_sae("jumprelu", 8, 16, hparams=hp)
    checkpoint.load(out, {"s": fresh}, {"s": make_optimizer(fresh, 1e-3)}, torch.device("cpu"))
    torch.testing.assert_close(fresh.W_enc, sae.W_enc, rtol=0, atol=0)
    assert float(fresh.log_multiplier) == 0.0  # the controller starts over
    save_file({k: v for k, v in tensors.items() if k != "model.W_enc"}, str(path))
    with pytest.raises(SaepipeError, match="missing \\['W_enc'\\]"):
        checkpoint.load(out, {"s": fresh}, {"s": make_optimizer(fresh, 1e-3)}, torch.device("cpu"))
