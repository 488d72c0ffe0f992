"""NaN/inf: a poisoned store is refused with its address (store, context, position), a diverged training run
never saves NaN weights over a good checkpoint, and a model producing NaN is refused by the harvest."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from helpers import one_line
from safetensors.numpy import load_file, save_file

from saepipe.train.loader import assign_chunks

H1 = "blocks.1.hook_resid_post"


def all_finite(ckpt: Path) -> bool:
    return all(np.isfinite(t).all() for f in ckpt.glob("*.safetensors") for t in load_file(str(f)).values())


def poison(store: Path, context: int, position: int, value: float = np.nan) -> None:
    arr = zarr.open_array(str(store / "activations" / H1), mode="r+")
    arr[context, position, 3] = value  # a valid chunk (its checksum matches): only the values are bad


def _train(store: Path, out: Path, **over: str) -> list[str]:
    opts = {"--store": str(store), "--hook": H1, "--width": "64", "--k": "4", "--tokens": str(64 * 40),
            "--batch-size": "64", "--buffer-tokens": "124", "--checkpoint-every": "2", "--device": "cpu",
            "--out": str(out), **over}  # fmt: skip
    return ["train", *(x for kv in opts.items() for x in kv)]


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_poisoned_batch_is_reported_with_its_address(value, tmp_path, tiny_store, capsys):
    store, out = tmp_path / "store", tmp_path / "run"
    shutil.copytree(tiny_store, store)
    last_chunk = int(assign_chunks(10, 0, 1, 0, 0)[-1])  # read last in epoch 0: checkpoints come first
    context, position = last_chunk * 4 + 2, 17
    poison(store, context, position, value)
    err = one_line(_train(store, out), capsys)
    assert f"store {store}" in err and f"context {context}, position {position}" in err and H1 in err, err
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["step"] >= 2, "no checkpoint before the poison: the test would be vacuous"
    assert all_finite(out / "checkpoint")
    assert not (out / "topk-w64-k4").exists()


def test_diverged_run_keeps_the_good_checkpoint(tmp_path, tiny_store, capsys):
    """A huge but finite outlier late in the stream blows the weights up to NaN: the run stops with one
    line, and the checkpoint written before it stays finite (never replaced by the diverged weights)."""
    store, out = tmp_path / "store", tmp_path / "run"
    shutil.copytree(tiny_store, store)
    last_chunk = int(assign_chunks(10, 0, 1, 0, 0)[-1])
    for pos in range(1, 32):
        poison(store, last_chunk * 4 + 1, pos, 3e38)
    err = one_line(_train(store, out, **{"--arch": "relu"}), capsys)
    assert "training diverged" in err and "lower --lr" in err, err
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["step"] >= 2 and f"checkpoint of step {state['step']:,} is kept" in err, err
    assert all_finite(out / "checkpoint")
    assert not (out / "relu-w64").exists()


def test_cache_verify_names_non_finite_chunks(tmp_path, tiny_store, capsys):
    store = tmp_path / "cache" / "stores" / "0123456789abcdef0123-40"
    shutil.copytree(tiny_store, store)
    poison(store, 13, 5)
    err = one_line(["cache", "verify", store.name, "--cache", str(tmp_path / "cache")], capsys)
    assert f"activations/{H1} contexts [12, 16) (non-finite values)" in err


def test_harvest_refuses_a_model_that_produces_nan(tmp_path, tiny_model_dir, small_corpus, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    weights = load_file(str(model / "model.safetensors"))
    key = next(k for k in weights if "layers.1.mlp.down_proj" in k)
    weights[key][0, 0] = np.nan
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "store"
    err = one_line(["harvest", "--model", str(model), "--dataset", str(small_corpus), "--hook", H1, "--tokens", "256",
                    "--context-size", "32", "--batch-size", "4", "--contexts-per-chunk", "4", "--out", str(out)],
                   capsys)  # fmt: skip
    assert f"NaN/inf at hook {H1} in context 0" in err
    assert json.loads((out / "zarr.json").read_text())["attributes"]["saepipe"]["n_contexts"] == 0
