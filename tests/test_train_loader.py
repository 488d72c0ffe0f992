"""The streaming loader: disjoint complete rank assignment, exact resume, BOS dropping, normalisation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from saepipe.errors import SaepipeError
from saepipe.harvest.store import StoreWriter, open_store
from saepipe.train.loader import ActivationLoader, StreamPosition, assign_chunks

HOOK = "blocks.1.hook_resid_post"


def test_assign_chunks_is_a_partition_for_every_world():
    for n, world, seed, epoch in itertools.product(range(0, 26), range(1, 7), range(3), range(3)):
        parts = [assign_chunks(n, r, world, seed, epoch) for r in range(world)]
        together = np.concatenate(parts)
        assert sorted(together.tolist()) == list(range(n)), (n, world, seed, epoch)
        sizes = [len(p) for p in parts]
        assert max(sizes) - min(sizes) <= 1
        again = [assign_chunks(n, r, world, seed, epoch) for r in range(world)]
        assert all(np.array_equal(a, b) for a, b in zip(parts, again))  # pure: same inputs, same answer
    orders = {tuple(assign_chunks(20, 0, 1, 0, e)) for e in range(5)}
    assert len(orders) == 5  # the chunk order is reshuffled every epoch


def epoch_addresses(loader: ActivationLoader, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    ws = [loader.load_window(epoch, w) for w in range(loader.windows_per_epoch(epoch))]
    return np.concatenate([w.addresses for w in ws]), np.concatenate([w.rows for w in ws])


@pytest.mark.parametrize("world", [1, 2, 3])
def test_union_over_ranks_is_every_token_once(tiny_store, world):
    store = open_store(str(tiny_store))
    acts = store.activations(HOOK)
    seen = []
    for rank in range(world):
        loader = ActivationLoader([str(tiny_store)], HOOK, 16, buffer_tokens=300, rank=rank, world=world)
        addr, rows = epoch_addresses(loader, epoch=1)
        np.testing.assert_array_equal(rows, acts[addr[:, 1], addr[:, 2]])  # each row is what its address says
        seen.append(addr)
    every = np.concatenate(seen)
    expected = {(0, c, p) for c in range(store.n_contexts) for p in range(1, store.context_size)}
    assert len(every) == len(expected) and set(map(tuple, every.tolist())) == expected  # BOS dropped


def test_keeps_bos_when_asked(tiny_store):
    loader = ActivationLoader([str(tiny_store)], HOOK, 16, drop_bos=False)
    addr, _ = epoch_addresses(loader, 0)
    assert (addr[:, 2] == 0).sum() == open_store(str(tiny_store)).n_contexts


def test_resume_from_any_batch_position_gives_the_same_stream(tiny_store):
    loader = ActivationLoader([str(tiny_store)], HOOK, batch_size=50, buffer_tokens=400, seed=3)
    assert loader.windows_per_epoch() > 2  # windows and epochs are crossed: not vacuous
    stream = loader.batches()
    first = [next(stream) for _ in range(40)]  # 2000 rows, more than one epoch of 1240
    stream.close()
    assert first[-1].position.epoch >= 1
    for cut in (0, 7, 24, 25):
        resumed = loader.batches(StreamPosition.from_dict(first[cut].position.to_dict()))
        for want in first[cut + 1 :]:
            got = next(resumed)
            assert np.array_equal(got.x.numpy(), want.x.numpy()) and got.position == want.position
        resumed.close()
    # rows inside a batch are mixed across chunks, not read in order
    assert len(np.unique(first[0].addresses[:, 1] // 4)) > 1


def test_normalisation_makes_mean_squared_norm_d_model(tiny_store):
    loader = ActivationLoader([str(tiny_store)], HOOK, 16, normalize=True)
    _, rows = epoch_addresses(loader, 0)
    assert loader.scale != 1.0
    np.testing.assert_allclose((rows.astype(np.float64) ** 2).sum(1).mean(), 64, rtol=1e-4)


def _fake_store(path, d_model: int, hooks=(HOOK,)) -> str:
    settings = {
        "model": {"name": "fake", "fingerprint": "x", "d_model": d_model, "n_layers": 2, "dtype": "float32"},
        "hooks": list(hooks),
        "context_size": 4,
        "prepend_bos": True,
        "dtype": "float32",
        "compression": "none",
        "contexts_per_chunk": 2,
        "chunks_per_shard": 1,
        "n_contexts_target": 2,
        "seed": 0,
    }
    w = StoreWriter(str(path), settings)
    acts = {h: np.ones((2, 4, d_model), np.float32) for h in hooks}
    w.write_shard(0, np.ones((2, 4), np.int32), acts, first_pos=1)
    w.finish()
    return str(path)


def test_refuses_mismatched_stores(tiny_store, tmp_path):
    other = _fake_store(tmp_path / "other", d_model=8)
    with pytest.raises(SaepipeError, match="disagree on d_model"):
        ActivationLoader([str(tiny_store), other], HOOK, 16)
    with pytest.raises(SaepipeError, match="no hook"):
        ActivationLoader([str(tiny_store)], "blocks.7.hook_resid_post", 16)


def test_two_stores_are_read_together(tiny_store, tmp_path):
    other = _fake_store(tmp_path / "same", d_model=64)
    loader = ActivationLoader([str(tiny_store), other], HOOK, 16)
    addr, _ = epoch_addresses(loader, 0)
    assert set(addr[:, 0].tolist()) == {0, 1} and (addr[:, 0] == 1).sum() == 2 * 3


def test_reads_a_bfloat16_store(tiny_store, tmp_path):
    """A bfloat16 store (uint16 bits on disk) reaches the trainer as float32 rows: the float32 store's
    values rounded to bfloat16 (torch's cast as the reference), each at its address."""
    import torch

    ref = open_store(str(tiny_store))
    w = StoreWriter(str(tmp_path / "bf16"), {**ref.settings, "dtype": "bfloat16"})
    per = w.shard_contexts
    for a in range(0, ref.n_contexts, per):
        b = min(a + per, ref.n_contexts)
        w.write_shard(a, ref.tokens(a, b), {h: ref.activations(h, a, b) for h in ref.hooks}, first_pos=1)
    w.finish()
    loader = ActivationLoader([str(tmp_path / "bf16")], HOOK, 16, buffer_tokens=300)
    addr, rows = epoch_addresses(loader, 0)
    want = torch.from_numpy(ref.activations(HOOK)).to(torch.bfloat16).float().numpy()
    assert rows.dtype == np.float32 and len(rows) == ref.n_contexts * (ref.context_size - 1)
    np.testing.assert_array_equal(rows, want[addr[:, 1], addr[:, 2]])
    assert not np.array_equal(rows, ref.activations(HOOK)[addr[:, 1], addr[:, 2]])  # really rounded
