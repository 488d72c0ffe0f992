"""The store holds exactly what a direct forward pass of the model computes on the stored tokens."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from saepipe.harvest import open_store
from saepipe.harvest.store import FORMAT, schema_version


def test_store_matches_direct_forward(tiny_store, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    store = open_store(str(tiny_store))
    assert store.complete and store.n_contexts == 40 and store.context_size == 32
    tokens = store.tokens()
    assert tokens.dtype == np.int32 and tokens.shape == (40, 32)
    assert (tokens[:, 0] == store.settings["tokenizer"]["bos_token_id"]).all()
    # Independent reference: plain HF forward with hidden states, no TransformerLens involved.
    hf = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        hidden = hf(torch.from_numpy(tokens).long(), output_hidden_states=True).hidden_states
    # hidden_states[i + 1] is the output of block i; the last one has the final norm applied in HF.
    np.testing.assert_allclose(
        store.activations("blocks.0.hook_resid_post"), hidden[1].numpy(), atol=2e-5, rtol=1e-4
    )
    last = store.activations("blocks.1.hook_resid_post")
    with torch.no_grad():
        normed = hf.model.norm(torch.from_numpy(last)).numpy()
    np.testing.assert_allclose(normed, hidden[2].numpy(), atol=2e-4, rtol=1e-3)


def test_stats_equal_brute_force(tiny_store):
    store = open_store(str(tiny_store))
    for hook in store.hooks:
        x = store.activations(hook)[:, 1:].reshape(-1, store.d_model).astype(np.float64)  # BOS excluded
        s = store.stats(hook)
        assert s.count == x.shape[0]
        np.testing.assert_allclose(s.mean, x.mean(0), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(s.mean_sq_norm, (x * x).sum(1).mean(), rtol=1e-9)


def test_readable_by_plain_zarr(tiny_store):
    """Another Zarr v3 client needs nothing from saepipe: the documented names, shapes and attributes."""
    g = zarr.open_group(str(tiny_store), mode="r", zarr_format=3)
    meta = g.attrs["saepipe"]
    assert meta["format"] == FORMAT and meta["schema_version"] == schema_version("float32") == 1
    n = meta["n_contexts"]
    acts = g["activations/blocks.0.hook_resid_post"]
    assert acts.shape == (n, meta["settings"]["context_size"], meta["settings"]["model"]["d_model"])
    assert g["tokens"].shape == (n, meta["settings"]["context_size"])
    assert acts.shards == (8, 32, 64) and acts.chunks == (4, 32, 64)


def test_iter_token_rows_addresses(tiny_store):
    store = open_store(str(tiny_store))
    hook = store.hooks[0]
    full = store.activations(hook)
    seen = 0
    for acts, addr in store.iter_token_rows(hook):
        assert (addr[:, 1] >= 1).all()  # BOS dropped
        np.testing.assert_array_equal(acts, full[addr[:, 0], addr[:, 1]])
        seen += len(acts)
    assert seen == 40 * 31


def test_bfloat16_bits_round_like_torch():
    """The store's own float32 -> bfloat16 rounding (numpy bit arithmetic) against torch's cast."""
    from saepipe.harvest.store import bfloat16_bits, from_stored

    rng = np.random.default_rng(0)
    x = np.concatenate(
        [
            rng.standard_normal(100_000).astype(np.float32)
            * np.float32(10.0) ** rng.integers(-40, 37, 100_000),
            np.array(
                [0.0, -0.0, 1.0, 1.00390625, 1.01171875, 3.4e38, -3.4e38, 1e-45, np.inf, -np.inf, np.nan],
                np.float32,
            ),
        ]
    ).astype(np.float32)  # fmt: skip  (ties at 1 + 2^-8 and 1 + 3 * 2^-8 round to even both ways)
    want = torch.from_numpy(x).to(torch.bfloat16)
    got = bfloat16_bits(x)
    finite = np.isfinite(x)
    np.testing.assert_array_equal(got[finite], want.view(torch.int16).numpy().view(np.uint16)[finite])
    np.testing.assert_array_equal(from_stored(got, "bfloat16")[finite], want.float().numpy()[finite])
    back = from_stored(got, "bfloat16")
    assert np.isnan(back[np.isnan(x)]).all() and (back[np.isinf(x)] == x[np.isinf(x)]).all()
    assert np.isinf(
        from_stored(bfloat16_bits(np.array([3.4e38], np.float32)), "bfloat16")
    ).all()  # past bf16 max


@pytest.fixture(scope="module")
def bf16_store(tmp_path_factory, tiny_model_dir, small_corpus) -> Path:
    from saepipe.harvest.config import HarvestConfig
    from saepipe.harvest.harvester import harvest

    out = tmp_path_factory.mktemp("stores") / "bf16"
    cfg = HarvestConfig(out=str(out), model=str(tiny_model_dir), dataset=str(small_corpus),
                        hooks=["blocks.1.hook_resid_post"], tokens=16 * 32, context_size=32, batch_size=4,
                        contexts_per_chunk=4, chunks_per_shard=2, dtype="bfloat16", device="cpu")  # fmt: skip
    harvest(cfg, progress=False)
    return out


def test_bfloat16_store_is_uint16_bits_readable_by_plain_zarr(bf16_store, tiny_store):
    """The documented representation (harvest/README.md): uint16 bit patterns, an array attribute saying
    so, schema version 2; decoded by hand they are the tiny model's float32 activations rounded once."""
    hook = "blocks.1.hook_resid_post"
    g = zarr.open_group(str(bf16_store), mode="r", zarr_format=3)
    assert g.attrs["saepipe"]["schema_version"] == 2
    raw = g[f"activations/{hook}"]
    assert str(raw.dtype) == "uint16" and raw.attrs["saepipe"] == {"dtype": "bfloat16"}
    by_hand = (raw[:].astype(np.uint32) << 16).view(np.float32)  # the README's recipe
    store = open_store(str(bf16_store))
    np.testing.assert_array_equal(store.activations(hook), by_hand)
    f32 = open_store(str(tiny_store)).activations(hook, 0, 16)  # same model, corpus, chunking, in float32
    np.testing.assert_array_equal(by_hand, torch.from_numpy(f32).to(torch.bfloat16).float().numpy())
    x = by_hand[:, 1:].reshape(-1, store.d_model).astype(np.float64)
    s = store.stats(hook)
    assert s.count == x.shape[0]
    np.testing.assert_allclose(s.mean, x.mean(0), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(s.mean_sq_norm, (x * x).sum(1).mean(), rtol=1e-9)


def test_cache_verify_sees_nan_in_bfloat16_bits(tmp_path, bf16_store):
    from saepipe.harvest.cache import find_damage

    store = tmp_path / "store"
    shutil.copytree(bf16_store, store)
    arr = zarr.open_array(str(store / "activations" / "blocks.1.hook_resid_post"), mode="r+")
    arr[9, 3, 5] = 0x7FC0  # a bfloat16 NaN (a uint16 that is finite as an integer)
    assert [str(d) for d in find_damage(str(store))] == [
        "activations/blocks.1.hook_resid_post contexts [8, 12) (non-finite values)"
    ]


def test_a_shard_of_zeros_is_written_and_reads_back(tmp_path):
    """A shard equal to the fill value still gets its file (zarr skips such chunks by default), so it is
    not mistaken for a missing, damaged shard: the store finishes, reads back and verifies."""
    from saepipe.harvest.store import StoreWriter

    settings = {
        "model": {"name": "hand", "fingerprint": "hand", "d_model": 4, "n_layers": 1, "dtype": "float32"},
        "tokenizer": {"name": "none", "vocab_size": 5, "bos_token_id": None, "eos_token_id": None},
        "dataset": {"name": "hand", "config": None, "split": "train", "text_column": None},
        "hooks": ["h"], "context_size": 8, "prepend_bos": False, "dtype": "float32", "compression": "none",
        "contexts_per_chunk": 2, "chunks_per_shard": 2, "batch_size": 4, "n_contexts_target": 8,
    }  # fmt: skip
    writer = StoreWriter(str(tmp_path / "s"), settings)
    ones = np.ones((4, 8, 4), np.float32)
    writer.write_shard(0, np.zeros((4, 8), np.int32), {"h": np.zeros((4, 8, 4), np.float32)}, first_pos=0)
    writer.write_shard(4, np.ones((4, 8), np.int32), {"h": ones}, first_pos=0)
    writer.finish()
    store = open_store(str(tmp_path / "s"))
    assert store.missing_shards("tokens", 0, 8) == [] and store.missing_shards("activations/h", 0, 8) == []
    np.testing.assert_array_equal(store.activations("h", 0, 8), np.concatenate([np.zeros_like(ones), ones]))
