"""Every store backend (local directory, S3 through fsspec) passes the same harvest/read/resume checks."""

from __future__ import annotations

import numpy as np
import pytest

from saepipe.errors import SaepipeError
from saepipe.harvest import open_store
from saepipe.harvest.config import HarvestConfig
from saepipe.harvest.harvester import harvest
from saepipe.harvest.store import StoreWriter


@pytest.fixture(params=["local", "s3"])
def store_root(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path)
    return request.getfixturevalue("s3_bucket")


def _cfg(out: str, model, corpus, tokens: int = 24 * 32) -> HarvestConfig:
    return HarvestConfig(out=out, model=str(model), dataset=str(corpus), hooks=["blocks.1.hook_resid_post"],
                         tokens=tokens, context_size=32, batch_size=4, contexts_per_chunk=4, chunks_per_shard=2,
                         dtype="float32")  # fmt: skip


class TestBackend:
    def test_harvest_then_read_equals_local_reference(
        self, store_root, tiny_store, tiny_model_dir, small_corpus
    ):
        out = f"{store_root}/store"
        harvest(_cfg(out, tiny_model_dir, small_corpus), progress=False)
        got, ref = open_store(out), open_store(str(tiny_store))
        assert got.n_contexts == 24 and got.complete
        hook = "blocks.1.hook_resid_post"
        np.testing.assert_array_equal(got.tokens(), ref.tokens(0, 24))
        np.testing.assert_array_equal(got.activations(hook), ref.activations(hook, 0, 24))
        assert got.settings["model"]["fingerprint"] == ref.settings["model"]["fingerprint"]

    def test_partial_store_is_invisible_then_resumes(self, store_root, tiny_model_dir, small_corpus):
        out = f"{store_root}/partial"
        cfg = _cfg(out, tiny_model_dir, small_corpus)
        full = f"{store_root}/full"
        harvest(_cfg(full, tiny_model_dir, small_corpus), progress=False)
        # Commit one shard by hand, exactly as a harvest killed after its first shard leaves the store.
        ref = open_store(full)
        writer = StoreWriter(out, ref.settings)
        hook = "blocks.1.hook_resid_post"
        writer.write_shard(0, ref.tokens(0, 8), {hook: ref.activations(hook, 0, 8)}, first_pos=1)
        with pytest.raises(SaepipeError, match="incomplete"):
            open_store(out)
        assert open_store(out, allow_incomplete=True).n_contexts == 8
        res = harvest(cfg, progress=False)
        assert res.tokens_written_now == 16 * 32  # resumed, not restarted
        np.testing.assert_array_equal(open_store(out).activations(hook), ref.activations(hook))
        assert open_store(out).meta == ref.meta

    def test_missing_store_is_one_clear_error(self, store_root):
        with pytest.raises(SaepipeError, match="no activation store"):
            open_store(f"{store_root}/nothing-here")
