"""Capturing activations: the overlapped harvest (packing ahead, writes behind, pinned non-blocking copies
on CUDA) writes exactly the bytes of the inline reference, and nothing non-finite reaches a store: float16
overflow is refused with its count while bfloat16 stores the same model's values."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from saepipe.cli import main
from saepipe.harvest import open_store
from saepipe.harvest.config import HarvestConfig
from saepipe.harvest.harvester import harvest

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]


def _cfg(model: Path, corpus: Path, out: Path, **over) -> HarvestConfig:
    opts = dict(model=str(model), dataset=str(corpus), hooks=HOOKS, tokens=44 * 32, context_size=32, batch_size=4,
                contexts_per_chunk=4, chunks_per_shard=2, out=str(out), device="cpu")  # fmt: skip
    return HarvestConfig(**{**opts, **over})


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_overlapped_harvest_equals_the_inline_reference(
    dtype, tmp_path, tiny_model_dir, small_corpus, monkeypatch
):
    fast, ref = tmp_path / "overlapped", tmp_path / "inline"
    res = harvest(_cfg(tiny_model_dir, small_corpus, fast, dtype=dtype), progress=False)
    monkeypatch.setenv("SAEPIPE_SYNC_HARVEST", "1")
    harvest(_cfg(tiny_model_dir, small_corpus, ref, dtype=dtype), progress=False)
    assert (
        res.n_contexts == 44 and len(open_store(str(fast)).chunk_bounds()) == 11
    )  # 6 shards, last one short
    assert _tree(fast) == _tree(ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_cuda_pinned_copies_equal_blocking_copies(dtype, tmp_path, tiny_model_dir, small_corpus, monkeypatch):
    """Pinned buffers and non-blocking copies on a side stream: the same bytes as blocking copies into
    pageable memory on the same GPU, and the same values (to float tolerance) as the CPU."""
    fast, ref, cpu = tmp_path / "pinned", tmp_path / "blocking", tmp_path / "cpu"
    harvest(_cfg(tiny_model_dir, small_corpus, fast, dtype=dtype, device="cuda"), progress=False)
    harvest(_cfg(tiny_model_dir, small_corpus, cpu, dtype=dtype, device="cpu"), progress=False)
    monkeypatch.setenv("SAEPIPE_SYNC_HARVEST", "1")
    harvest(_cfg(tiny_model_dir, small_corpus, ref, dtype=dtype, device="cuda"), progress=False)
    assert _tree(fast) == _tree(ref)
    got, want = open_store(str(fast)), open_store(str(cpu))
    for hook in HOOKS:
        a, b = got.activations(hook).astype(np.float32), want.activations(hook).astype(np.float32)
        assert np.abs(b).max() > 0.1  # not vacuous
        np.testing.assert_allclose(a, b, rtol=2e-2, atol=2e-2)


@pytest.fixture(scope="module")
def loud_model(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny model with its embeddings scaled 3e6x: residual values of ~1e5, past float16's 65504."""
    out = tmp_path_factory.mktemp("loud")
    shutil.copytree(tiny_model_dir, out, dirs_exist_ok=True)
    weights = load_file(str(out / "model.safetensors"))
    weights["model.embed_tokens.weight"] *= np.float32(3e6)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def test_float16_overflow_is_refused_with_its_count(tmp_path, loud_model, small_corpus, capsys):
    ref = tmp_path / "f32"
    harvest(_cfg(loud_model, small_corpus, ref, dtype="float32", hooks=HOOKS[:1]), progress=False)
    first_shard = open_store(str(ref)).activations(HOOKS[0], 0, 8)
    with np.errstate(over="ignore"):
        expected = int(np.isinf(first_shard.astype(np.float16)).sum())  # numpy's cast, not torch's
    assert 0 < expected < first_shard.size  # some values overflow, not all: the count means something

    out = tmp_path / "f16"
    argv = ["harvest", "--model", str(loud_model), "--dataset", str(small_corpus), "--hook", HOOKS[0],
            "--tokens", str(44 * 32), "--context-size", "32", "--batch-size", "4", "--contexts-per-chunk", "4",
            "--chunks-per-shard", "2", "--device", "cpu", "--dtype", "float16", "--out", str(out)]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"{expected:,} activation values at hook {HOOKS[0]} overflow float16" in err, err
    assert "--dtype bfloat16" in err
    assert json.loads((out / "zarr.json").read_text())["attributes"]["saepipe"]["n_contexts"] == 0
    assert not list((out / "activations").rglob("c/*")), "a shard was written although it overflowed"


def test_bfloat16_stores_what_float16_cannot(tmp_path, loud_model, small_corpus):
    ref, out = tmp_path / "f32", tmp_path / "bf16"
    harvest(_cfg(loud_model, small_corpus, ref, dtype="float32"), progress=False)
    harvest(_cfg(loud_model, small_corpus, out, dtype="bfloat16"), progress=False)
    got, want = open_store(str(out)), open_store(str(ref))
    for hook in HOOKS:
        a, b = got.activations(hook), want.activations(hook)
        assert np.abs(b).max() > 65504 and np.isfinite(a).all()
        # torch's cast of the float32 store's values: the same forward on the same CPU, rounded once
        np.testing.assert_array_equal(a, torch.from_numpy(b).to(torch.bfloat16).float().numpy())
