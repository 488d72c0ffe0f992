"""The store holds exactly what a direct forward pass of the model computes on the stored tokens."""

from __future__ import annotations

import numpy as np
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
