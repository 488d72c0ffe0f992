"""Training checkpoints: everything needed to continue a run exactly, kept apart from the SAE dirs.

    <out>/checkpoint/
        state.json                     step, resolved config, W&B run id, Adam param groups per SAE
        <sae name>.safetensors         model.* (parameters and buffers) and opt.<i>.<key> (Adam state)
        rank<r>.safetensors            torch RNG state of rank r
        rank<r>.json                   stream position of rank r (StreamPosition)

No pickles. A checkpoint is written to `checkpoint.partial/` by every rank, then rank 0 swaps it in with
renames, so a kill at any moment leaves the previous complete checkpoint or the new one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from saepipe.errors import SaepipeError
from saepipe.files import write_text_atomic
from saepipe.train import distributed
from saepipe.train.loader import StreamPosition
from saepipe.train.saes import SAE

DIR = "checkpoint"


@dataclass
class Checkpoint:
    step: int
    config: dict[str, Any]
    wandb_id: str | None
    position: StreamPosition


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    sd = opt.state_dict()
    tensors = {
        f"opt.{i}.{key}": (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().contiguous()
        for i, state in sd["state"].items()
        for key, v in state.items()
    }
    return tensors, sd["param_groups"]


def save(
    out: Path,
    step: int,
    config: dict,
    wandb_id: str | None,
    saes: dict[str, SAE],
    optimizers: dict[str, torch.optim.Optimizer],
    position: StreamPosition,
) -> None:
    """Every rank calls this: each writes its RNG and position, rank 0 the models and the state."""
    rank = distributed.rank()
    partial, final, old = out / (DIR + ".partial"), out / DIR, out / (DIR + ".old")
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    distributed.barrier()
    save_file({"torch": torch.get_rng_state()}, str(partial / f"rank{rank}.safetensors"))
    (partial / f"rank{rank}.json").write_text(json.dumps(position.to_dict()))
    if rank == 0:
        groups = {}
        for name, sae in saes.items():
            tensors = {
                f"model.{k}": v.detach().cpu().contiguous().clone() for k, v in sae.state_dict().items()
            }
            opt_tensors, groups[name] = _optimizer_tensors(optimizers[name])
            save_file({**tensors, **opt_tensors}, str(partial / f"{name}.safetensors"))
        state = {"step": step, "config": config, "wandb_id": wandb_id, "param_groups": groups}
        (partial / "state.json").write_text(json.dumps(state, indent=2))
    distributed.barrier()
    if rank == 0:
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)  # a kill after the second rename left a stale copy
            os.replace(final, old)
        os.replace(partial, final)
        shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()


def exists(out: Path) -> bool:
    _recover(out)
    return (out / DIR / "state.json").is_file()


def _recover(out: Path) -> None:
    """A kill between `save`'s two renames leaves only `checkpoint.old`: it is the last complete one."""
    final, old = out / DIR, out / (DIR + ".old")
    if not final.exists() and (old / "state.json").is_file():
        with contextlib.suppress(FileNotFoundError):  # another rank may have moved it back first
            os.replace(old, final)


def read_state(out: Path) -> dict[str, Any]:
    return json.loads((out / DIR / "state.json").read_text())


def _restore_model(sae: SAE, name: str, tensors: dict[str, torch.Tensor]) -> None:
    """Load a checkpointed SAE; training state a later saepipe added as a buffer (e.g. JumpReLU's L0
    controller) starts fresh when an older checkpoint lacks it, while a missing parameter is refused."""
    missing, unexpected = sae.load_state_dict(tensors, strict=False)
    lost = [key for key in missing if key in dict(sae.named_parameters())]
    if lost or unexpected:
        raise SaepipeError(
            f"the checkpoint of {name} does not fit this saepipe's {sae.architecture} SAE "
            f"(missing {lost or 'nothing'}, unexpected {unexpected or 'nothing'}); train into a new --out"
        )


def load(
    out: Path, saes: dict[str, SAE], optimizers: dict[str, torch.optim.Optimizer], device: torch.device
) -> Checkpoint:
    """Restore models, optimizers and this rank's RNG; return the step and this rank's stream position."""
    ckpt = out / DIR
    state = read_state(out)
    rank = distributed.rank()
    for name, sae in saes.items():
        tensors = load_file(str(ckpt / f"{name}.safetensors"))
        _restore_model(
            sae, name, {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
        )
        opt_state: dict[int, dict[str, torch.Tensor]] = {}
        for key, v in tensors.items():
            if key.startswith("opt."):
                _, i, field = key.split(".", 2)
                opt_state.setdefault(int(i), {})[field] = v if field == "step" else v.to(device)
        optimizers[name].load_state_dict({"state": opt_state, "param_groups": state["param_groups"][name]})
    torch.set_rng_state(load_file(str(ckpt / f"rank{rank}.safetensors"))["torch"])
    position = StreamPosition.from_dict(json.loads((ckpt / f"rank{rank}.json").read_text()))
    return Checkpoint(int(state["step"]), state["config"], state.get("wandb_id"), position)


def mark_complete(out: Path) -> None:
    """Record that the run finished and its SAE dirs are written (rerunning then does nothing)."""
    path = out / DIR / "state.json"
    state = json.loads(path.read_text())
    state["complete"] = True
    write_text_atomic(path, json.dumps(state, indent=2))
