"""Two real gloo processes must train the same SAEs as one process on the same global batches.

The two-process run is a real `torchrun --nproc_per_node 2 -m saepipe train`, and the same under
`accelerate launch` (and on two GPUs with NCCL where there are two). The reference runs in this
process: the same loaders for rank 0 and rank 1 of 2, their batches concatenated into one global batch,
stepped with the trainer's own `sae_step` and schedules (no process group, so no reductions).

One launched rank starts a real process group too (gloo on CPU, `cpu:gloo,cuda:nccl` on a GPU), and must
train exactly what a run without one trains; on a GPU, a run through an NCCL-only group proves that no
collective of the run is handed a CPU tensor (NCCL refuses them; issue 16).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from saepipe.train.config import TrainConfig
from saepipe.train.loader import ActivationLoader
from saepipe.train.sae_dir import sae_tensors
from saepipe.train.step import make_optimizer, sae_step
from saepipe.train.trainer import b_dec_start, build_saes, input_rms, lr_at, sparsity_at

HOOK = "blocks.1.hook_resid_post"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "launch",
    [
        "torchrun",
        "accelerate",
        pytest.param("torchrun-cuda", marks=pytest.mark.skipif(
            torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")),
    ],
)  # fmt: skip
def test_two_processes_equal_one_process_on_the_same_global_batches(tiny_store, tmp_path, launch):
    out = tmp_path / "ddp"
    flags = {
        "stores": [str(tiny_store)], "hook": HOOK, "out": str(out), "arch": ["topk", "relu", "jumprelu"],
        "width": [96], "k": [6], "tokens": 64 * 60, "batch_size": 32, "lr": 3e-3, "lr_warmup": 0.1,
        "sparsity_warmup": 0.2, "buffer_tokens": 300, "b_dec_init": "mean", "jumprelu_target_l0": 3,
        "device": "cuda" if launch.endswith("cuda") else "cpu", "log_every": 20, "checkpoint_every": 25,
    }  # fmt: skip
    argv = []
    for key, value in flags.items():
        for v in value if isinstance(value, list) else [value]:
            argv += [f"--{key.replace('_', '-')}" if key != "stores" else "--store", str(v)]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    port = str(_free_port())
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    launcher = {
        "torchrun": torchrun,
        "torchrun-cuda": torchrun,
        # `accelerate launch --cpu --num_processes 2` starts one process; --multi_gpu with gloo starts two.
        "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                       "--num_machines", "1", "--main_process_ip", "127.0.0.1", "--main_process_port", port],
    }[launch]  # fmt: skip
    res = subprocess.run(
        [*launcher, "-m", "saepipe", "train", *argv], env=env, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr[-3000:]
    saved = json.loads((out / "topk-w96-k6" / "cfg.json").read_text())
    assert saved["saepipe"]["training"]["world_size"] == 2  # two ranks really trained

    cfg = TrainConfig(**{**flags, "device": "cpu"})
    loaders = [
        ActivationLoader(
            [str(tiny_store)], HOOK, 32, 300, cfg.seed[0], rank, 2, drop_special=cfg.drop_special
        )
        for rank in (0, 1)
    ]
    saes = build_saes(cfg, 64, input_rms(loaders[0]))  # JumpReLU's settings are in the input's RMS units
    b_dec = b_dec_start(cfg, loaders[0])
    opts = {}
    for name, sae in saes.items():
        with torch.no_grad():
            sae.b_dec.copy_(b_dec)
        opts[name] = make_optimizer(sae, cfg.lr)
    total = cfg.tokens[0] // 64
    streams = [loader.batches() for loader in loaders]
    for step in range(total):
        x = torch.cat([next(s).x for s in streams])
        for name, sae in saes.items():
            sae_step(sae, opts[name], x, lr_at(step, total, cfg), sparsity_at(step, total, cfg))
    for s in streams:
        s.close()

    windows = []
    for name, sae in saes.items():
        got = load_file(str(out / name / "sae_weights.safetensors"))
        want = sae_tensors(sae)
        start = sae_tensors(build_saes(cfg, 64, input_rms(loaders[0]))[name])
        tol = {"rtol": 1e-3, "atol": 1e-4} if launch.endswith("cuda") else {"rtol": 1e-4, "atol": 1e-5}
        for key, value in want.items():
            np.testing.assert_allclose(got[key], value.numpy(), **tol, err_msg=f"{name}/{key}")
        moved = float(np.abs(got["W_dec"] - start["W_dec"].numpy()).max())
        assert moved > 1e-2, f"{name}: weights barely moved; the comparison would be vacuous"
        # The dead-latent window (tokens since each latent last fired, kept in the checkpoint) is built from
        # the firing counts and token counts reduced over ranks: it must match the global batch's exactly.
        since = load_file(str(out / "checkpoint" / f"{name}.safetensors"))["model.tokens_since_fired"]
        np.testing.assert_array_equal(since, sae.tokens_since_fired.numpy(), err_msg=f"{name}: dead window")
        windows.append(len(set(since.tolist())))
        if name.startswith("jumprelu"):  # its L0 controller steps on the batch L0 averaged over ranks
            state = load_file(str(out / "checkpoint" / f"{name}.safetensors"))
            np.testing.assert_allclose(state["model.log_multiplier"], sae.log_multiplier.numpy(), rtol=1e-9)
            assert abs(float(sae.log_multiplier)) > 1e-3, (
                "the controller never moved: the check would be vacuous"
            )
    assert max(windows) > 2, f"dead windows {windows}: too uniform for their comparison to tell anything"


# Trains in a fresh process (a process group must not leak into the test session); prints the group's
# backend last. `nccl_only` starts an NCCL-only group first, which refuses any CPU tensor: training
# through it proves every collective of the run is built on the compute device (issue 16).
ARCHS = ["topk", "batchtopk", "relu"]
_ONE_RANK = """
import json, sys
import torch, torch.distributed as dist
from saepipe.train import distributed
from saepipe.train.config import TrainConfig
from saepipe.train.trainer import train
args = json.loads(sys.argv[1])
if args.pop("nccl_only"):
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", device_id=torch.device("cuda:0"))
train(TrainConfig(**args))
backend = str(dist.get_backend()) if dist.is_initialized() else None
distributed.shutdown()
print(json.dumps({"backend": backend}))
"""


def _train_one_rank(tiny_store, out, device: str, group: str) -> str | None:
    args = {
        "stores": [str(tiny_store)], "hook": HOOK, "out": str(out), "arch": ARCHS,
        "width": [96], "k": [6], "tokens": 64 * 12, "batch_size": 64, "lr": 3e-3, "buffer_tokens": 300,
        "device": device, "log_every": 4, "checkpoint_every": 5, "wandb": "disabled",
        "nccl_only": group == "nccl-only",
    }  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    if group != "none":
        env.update(
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port())
        )
    res = subprocess.run(
        [sys.executable, "-c", _ONE_RANK, json.dumps(args)], env=env, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])["backend"]


@pytest.mark.parametrize(
    ("device", "group", "backend"),
    [
        ("cpu", "launcher", "gloo"),
        pytest.param("cuda", "launcher", "cpu:gloo,cuda:nccl", marks=pytest.mark.skipif(
            not torch.cuda.is_available(), reason="needs a CUDA GPU")),
        pytest.param("cuda", "nccl-only", "nccl", marks=pytest.mark.skipif(
            not torch.cuda.is_available(), reason="needs a CUDA GPU")),
    ],
)  # fmt: skip
def test_one_rank_with_a_process_group_trains_like_no_group(tiny_store, tmp_path, device, group, backend):
    """One rank under a launcher (MASTER_ADDR/PORT set) starts a real process group through
    `distributed.init`, so every reduction of the step really runs; the SAEs must equal a run without one."""
    got = _train_one_rank(tiny_store, tmp_path / "group", device, group)
    assert got == backend, f"the run used process group {got!r}, not {backend!r}: the test would be vacuous"
    assert _train_one_rank(tiny_store, tmp_path / "plain", device, "none") is None
    starts = build_saes(TrainConfig(stores=["s"], hook=HOOK, out="o", arch=ARCHS, width=[96], k=[6]), 64)
    for name, start in starts.items():
        a = load_file(str(tmp_path / "group" / name / "sae_weights.safetensors"))
        b = load_file(str(tmp_path / "plain" / name / "sae_weights.safetensors"))
        moved = float(np.abs(a["W_dec"] - sae_tensors(start)["W_dec"].numpy()).max())
        assert moved > 1e-3, f"{name}: weights barely moved; the comparison would be vacuous"
        for key in a:
            if device == "cpu":  # a sum and a mean over one rank are exact
                np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name}/{key}")
            else:  # CUDA scatter-adds may sum in another order from run to run
                np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-5, err_msg=f"{name}/{key}")
