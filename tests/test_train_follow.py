"""`--follow`: training reads only committed contexts of a store still being written, and each new epoch
takes in what was committed since; without it an incomplete store is refused."""

from __future__ import annotations

import numpy as np
import pytest

from saepipe.errors import SaepipeError
from saepipe.harvest import open_store
from saepipe.harvest.store import StoreWriter
from saepipe.train.config import TrainConfig
from saepipe.train.loader import ActivationLoader
from saepipe.train.trainer import train

HOOK = "blocks.1.hook_resid_post"


def _commit(writer: StoreWriter, ref, shards: int) -> None:
    per = writer.shard_contexts
    for _ in range(shards):
        a = writer.n_contexts
        b = min(a + per, ref.n_contexts)
        writer.write_shard(a, ref.tokens(a, b), {h: ref.activations(h, a, b) for h in ref.hooks}, first_pos=1)


def test_follow_reads_committed_contexts_and_grows(tmp_path, tiny_store):
    ref = open_store(str(tiny_store))
    path = str(tmp_path / "growing")
    writer = StoreWriter(path, ref.settings)
    _commit(writer, ref, 1)  # 8 of 40 contexts committed
    with pytest.raises(SaepipeError, match="incomplete"):
        ActivationLoader([path], HOOK, 64, buffer_tokens=256)

    loader = ActivationLoader([path], HOOK, 64, buffer_tokens=256, follow=True)
    stream = loader.batches()
    try:
        first = [next(stream) for _ in range(8)]  # 8 contexts x 31 rows = 248 rows per epoch: several epochs
        seen = np.concatenate([b.addresses for b in first])
        assert seen[:, 1].max() < 8  # only committed contexts
        np.testing.assert_array_equal(
            np.concatenate([b.x.numpy() for b in first]), ref.activations(HOOK)[seen[:, 1], seen[:, 2]]
        )
        _commit(writer, ref, 4)  # the rest arrives while training runs
        writer.finish()
        later = np.concatenate([next(stream).addresses for _ in range(40)])
    finally:
        stream.close()
    assert later[:, 1].max() >= 8, "new contexts never entered the stream"


def test_train_follow_on_an_incomplete_store(tmp_path, tiny_store):
    ref = open_store(str(tiny_store))
    path = str(tmp_path / "growing")
    _commit(StoreWriter(path, ref.settings), ref, 2)
    cfg = dict(stores=[path], hook=HOOK, out=str(tmp_path / "run"), width=[32], k=[4], tokens=2048,
               batch_size=128, buffer_tokens=512, b_dec_init="mean", device="cpu")  # fmt: skip
    with pytest.raises(SaepipeError, match="incomplete"):
        train(TrainConfig(**cfg))
    res = train(TrainConfig(**cfg, follow=True))
    assert res.steps == 16 and (tmp_path / "run" / "topk-w32-k4" / "sae_weights.safetensors").exists()
