"""Data hygiene (issue 19): the loader leaves out exactly the positions holding BOS/EOS (and any extra special
ids) and those above a multiple of the median norm, on a store whose every activation encodes its own
address; the store's recorded norm statistics equal an independent numpy computation; `saepipe cache info`
shows them.

The store: 24 contexts of 8 positions, d_model 6, BOS (id 1) at position 0 of every context, EOS (id 2)
at known body positions (document separators), token id 7 at others; every activation row is
[context, position, 1, 0, 0, s] with s large at a few known "outlier" positions.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from saepipe.cli import main
from saepipe.harvest import open_store
from saepipe.harvest.norms import compute_norm_stats, norm_stats
from saepipe.harvest.store import StoreWriter
from saepipe.train.loader import ActivationLoader

C, T, D = 24, 8, 6
BOS, EOS, OTHER = 1, 2, 7
HOOK = "h"


def _world():
    rng = np.random.default_rng(0)
    tokens = rng.integers(10, 50, (C, T)).astype(np.int32)
    tokens[:, 0] = BOS
    eos = [(0, 5), (3, 1), (3, 7), (10, 4), (17, 2), (23, 6)]
    other = [(1, 3), (9, 6), (20, 1)]
    for c, p in eos:
        tokens[c, p] = EOS
    for c, p in other:
        tokens[c, p] = OTHER
    ctx, pos = np.meshgrid(np.arange(C), np.arange(T), indexing="ij")
    acts = np.zeros((C, T, D), np.float32)
    acts[..., 0], acts[..., 1], acts[..., 2] = ctx, pos, 1.0
    acts[..., 5] = rng.uniform(5, 6, (C, T))
    outliers = [(2, 3), (7, 7), (15, 2), (22, 5)]
    for c, p in outliers:
        acts[c, p, 5] = 400.0
    return tokens, acts, eos, other, outliers


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tokens, acts, eos, other, outliers = _world()
    settings = {
        "model": {"name": "hand", "fingerprint": "hand", "d_model": D, "n_layers": 2, "dtype": "float32"},
        "tokenizer": {"name": "hand", "vocab_size": 64, "bos_token_id": BOS, "eos_token_id": EOS},
        "dataset": {"name": "hand", "config": None, "split": "train", "text_column": "text"},
        "hooks": [HOOK], "context_size": T, "prepend_bos": True, "dtype": "float32", "compression": "none",
        "contexts_per_chunk": 4, "chunks_per_shard": 2, "batch_size": 8, "seed": 0, "n_contexts_target": C,
    }  # fmt: skip
    path = str(tmp_path_factory.mktemp("hygiene") / "store")
    w = StoreWriter(path, settings)
    for s in range(0, C, 8):
        w.write_shard(s, tokens[s : s + 8], {HOOK: acts[s : s + 8]}, first_pos=1)
    w.finish()
    return path, tokens, acts, eos, other, outliers


def addresses_in_one_epoch(loader: ActivationLoader) -> set[tuple[int, int]]:
    """(context, position) of every row the loader yields in epoch 0, read back from the rows themselves."""
    seen = set()
    for w in range(loader.windows_per_epoch(0)):
        win = loader.load_window(0, w)
        rows = win.rows
        assert (rows[:, 0] == win.addresses[:, 1]).all() and (rows[:, 1] == win.addresses[:, 2]).all()
        seen.update(map(tuple, win.addresses[:, 1:].tolist()))
    return seen


def test_special_positions_and_outliers_are_left_out_exactly(world):
    path, _, _, eos, other, outliers = world
    everything = {(c, p) for c in range(C) for p in range(T)}
    bos = {(c, 0) for c in range(C)}
    plain = ActivationLoader([path], HOOK, 16, buffer_tokens=40)
    assert addresses_in_one_epoch(plain) == everything - bos  # the old behaviour: only BOS dropped
    special = ActivationLoader([path], HOOK, 16, buffer_tokens=40, drop_special=True)
    assert addresses_in_one_epoch(special) == everything - bos - set(eos)
    extra = ActivationLoader([path], HOOK, 16, buffer_tokens=40, drop_special=True, special_token_ids=[OTHER])
    assert addresses_in_one_epoch(extra) == everything - bos - set(eos) - set(other)
    cut = ActivationLoader([path], HOOK, 16, buffer_tokens=40, drop_special=True, drop_norm_above=3.0)
    assert addresses_in_one_epoch(cut) == everything - bos - set(eos) - set(outliers)
    # the same filter in the analysis reader
    rows = [a for _, a in open_store(path).iter_token_rows(HOOK, drop_tokens=[BOS, EOS])]
    assert set(map(tuple, np.concatenate(rows).tolist())) == everything - bos - set(eos)


def test_batches_of_a_filtered_stream_resume_exactly(world):
    path = world[0]
    loader = ActivationLoader([path], HOOK, 16, buffer_tokens=40, drop_special=True, drop_norm_above=3.0)
    stream = loader.batches()
    batches = [next(stream) for _ in range(30)]  # past an epoch: 24 * 7 - 6 - 4 = 158 rows per epoch
    stream.close()
    resumed = loader.batches(batches[12].position)
    again = [next(resumed) for _ in range(17)]
    resumed.close()
    for a, b in zip(batches[13:], again):
        assert np.array_equal(a.addresses, b.addresses) and np.array_equal(a.x.numpy(), b.x.numpy())


def test_token_norm_scales_every_row_to_sqrt_d(world):
    loader = ActivationLoader([world[0]], HOOK, 16, buffer_tokens=40, drop_special=True, token_norm=True)
    rows = loader.load_window(0, 0).rows
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), np.sqrt(D), rtol=1e-6)


def test_recorded_norm_statistics_equal_numpy(world):
    path, tokens, acts, eos, _, outliers = world
    store = open_store(path)
    recorded = store.meta["norms"][HOOK]
    assert recorded == compute_norm_stats(store, HOOK) == norm_stats(store, HOOK)
    body_t, body_x = tokens[:, 1:].ravel(), acts[:, 1:].reshape(-1, D).astype(np.float64)
    keep = body_t != EOS
    norms = np.linalg.norm(body_x[keep], axis=1)
    assert recorded["ordinary"] == C * (T - 1) - len(eos)
    assert recorded["median"] == pytest.approx(np.median(norms), rel=1e-6)
    assert recorded["quantiles"]["max"] == pytest.approx(norms.max(), rel=1e-6)
    big = norms > 3 * np.median(norms)
    assert big.sum() == len(outliers)
    o3 = next(o for o in recorded["outliers"] if o["multiple"] == 3.0)
    assert o3["fraction"] == pytest.approx(big.mean())
    assert o3["sq_norm_share"] == pytest.approx((norms[big] ** 2).sum() / (norms**2).sum(), rel=1e-6)
    assert recorded["bos"]["count"] == C
    assert recorded["special"] == [
        {"token": EOS, "count": len(eos), "median": pytest.approx(np.median(np.linalg.norm(
            np.stack([acts[c, p] for c, p in eos]).astype(np.float64), axis=1)), rel=1e-6)}
    ]  # fmt: skip
    assert recorded["dims"]["top"][0]["dim"] == 5 and recorded["dims"]["top"][1]["dim"] == 0  # |x5| > ctx
    outlier_tokens = [t["token"] for t in recorded["tokens"]]
    assert sorted(outlier_tokens) == sorted({int(tokens[c, p]) for c, p in outliers})
    np.testing.assert_allclose(
        recorded["by_position"], np.linalg.norm(acts.astype(np.float64), axis=2).mean(0), rtol=1e-6
    )


def test_cache_info_shows_the_norms(world, tmp_path, capsys):
    import shutil

    path = world[0]
    root = tmp_path / "cache"
    (root / "stores").mkdir(parents=True)
    shutil.copytree(path, root / "stores" / "0123456789abcdef0123-24")
    assert main(["cache", "info", "0123456789abcdef0123-24", "--cache", str(root)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["n_contexts"] == C and info["norms"][HOOK]["recorded"] is True
    text = "\n".join(info["norms"][HOOK]["summary"])
    assert "median" in text and "> 3x median: 2.47% of positions" in text  # 4 of 162 ordinary positions
    assert "special token 2 in context bodies: 6 positions" in text  # no tokenizer for a hand-made model
