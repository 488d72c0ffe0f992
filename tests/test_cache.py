"""Shared caches: stores found by key, one writer per key (local and S3), and `saepipe cache` commands."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from saepipe.cli import main
from saepipe.errors import SaepipeError
from saepipe.harvest import open_store
from saepipe.harvest.cache import list_entries, store_key
from saepipe.harvest.config import HarvestConfig
from saepipe.harvest.harvester import harvest

HOOK = "blocks.1.hook_resid_post"


def _argv(model: Path, corpus: Path, cache: str, tokens: int = 24 * 32) -> list[str]:
    return ["harvest", "--model", str(model), "--dataset", str(corpus), "--hook", HOOK, "--tokens", str(tokens),
            "--context-size", "32", "--batch-size", "4", "--contexts-per-chunk", "4", "--chunks-per-shard", "2",
            "--dtype", "float32", "--cache", cache]  # fmt: skip


def _cfg(argv: list[str]) -> HarvestConfig:
    from saepipe.cli import build_parser
    from saepipe.config import config_from_args

    return config_from_args(HarvestConfig, build_parser("harvest").parse_args(argv))


def test_cache_serves_smaller_requests_and_keys_differ(tmp_path, tiny_model_dir, small_corpus):
    root = str(tmp_path / "cache")
    big = harvest(_cfg(_argv(tiny_model_dir, small_corpus, root, tokens=24 * 32)), progress=False)
    assert big.path.startswith(root + "/stores/") and big.n_contexts == 24
    small = harvest(_cfg(_argv(tiny_model_dir, small_corpus, root, tokens=8 * 32)), progress=False)
    assert small.already_complete and small.path == big.path  # more tokens serve a request for fewer
    other = harvest(
        _cfg([*_argv(tiny_model_dir, small_corpus, root, tokens=8 * 32), "--chunks-per-shard", "1"]),
        progress=False,
    )
    assert other.path != big.path and other.n_contexts == 8


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_two_harvesters_one_writer(backend, tmp_path, tiny_model_dir, small_corpus, tiny_store, request):
    root = str(tmp_path / "cache") if backend == "local" else request.getfixturevalue("s3_bucket") + "/cache"
    argv = _argv(tiny_model_dir, small_corpus, root, tokens=40 * 32)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "saepipe", *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    summaries = sorted((o[0].strip() for o in outs), key=lambda line: "already complete" in line)
    assert summaries[0].startswith("harvested 1,280 tokens") and "already complete" in summaries[1]
    # Whether the second one waited on the first's lease or arrived after it finished depends on timing;
    # either way exactly one wrote. The lease refusing a second writer is checked deterministically below.
    path = summaries[0].split(" into ")[1].split(":")[0] if backend == "local" else None
    entries = list_entries(root)
    assert len(entries) == 1 and entries[0].complete
    if path is not None:
        assert entries[0].url == path
    got, ref = open_store(entries[0].url), open_store(str(tiny_store))
    np.testing.assert_array_equal(got.activations(HOOK), ref.activations(HOOK))


def test_live_lease_refuses_a_second_writer(tmp_path):
    from saepipe.harvest.lease import Lease, LeaseHeld

    url = str(tmp_path / "store.lock")
    with Lease(url) as held, pytest.raises(LeaseHeld, match=held.owner.split(":")[0]):
        Lease(url).acquire()
    with Lease(url):  # released: the next writer gets it
        pass


def test_stale_lock_is_broken(tmp_path, tiny_model_dir, small_corpus):
    out = tmp_path / "store"
    Path(str(out) + ".lock").write_text(
        json.dumps({"owner": "dead-host:1:x", "heartbeat": time.time() - 3600})
    )
    res = harvest(HarvestConfig(out=str(out), model=str(tiny_model_dir), dataset=str(small_corpus), hooks=[HOOK],
                                tokens=8 * 32, context_size=32, batch_size=4, contexts_per_chunk=4),
                  progress=False)  # fmt: skip
    assert res.n_contexts == 8 and not Path(str(out) + ".lock").exists()


def test_cache_commands(tmp_path, tiny_model_dir, small_corpus, capsys):
    root = str(tmp_path / "cache")
    assert main(_argv(tiny_model_dir, small_corpus, root)) == 0
    capsys.readouterr()
    assert main(["cache", "ls", "--cache", root]) == 0
    line = capsys.readouterr().out.strip()
    name = line.split()[0]
    assert "768 tokens" in line and "complete" in line and HOOK in line
    assert main(["cache", "info", name, "--cache", root]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["n_contexts"] == 24 and info["hooks"] == [HOOK]
    assert main(["cache", "verify", name, "--cache", root]) == 0
    assert "checksum matches" in capsys.readouterr().out

    shard = (
        Path(info["url"]) / "activations" / HOOK / "c" / "0" / "0" / "0"
    )  # contexts [0, 8): chunks 0 and 1
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert main(["cache", "verify", name, "--cache", root]) == 2
    err = capsys.readouterr().err
    assert f"activations/{HOOK} contexts [0, 4)" in err and len(err.strip().splitlines()) == 1

    for bad in ("../escape", "a/b", ".."):
        assert main(["cache", "rm", bad, "--cache", root]) == 2
        assert "not a cache key" in capsys.readouterr().err
    assert main(["cache", "rm", name, "--cache", root]) == 0
    assert main(["cache", "ls", "--cache", root]) == 0
    assert "no stores cached" in capsys.readouterr().out


def _digest(root: Path) -> dict[str, str]:
    import hashlib

    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}  # fmt: skip


def _edit_start(corpus: Path) -> None:
    """Upper-case the start of the first file: the same size, other text, other first contexts."""
    first = sorted(corpus.glob("*.txt"))[0]
    text = first.read_bytes()
    first.write_bytes(text[:4000].upper() + text[4000:])


def test_an_edited_corpus_gets_a_new_store(tmp_path, tiny_model_dir, small_corpus):
    corpus = tmp_path / "corpus"
    shutil.copytree(small_corpus, corpus)
    argv = _argv(tiny_model_dir, corpus, str(tmp_path / "cache"), tokens=8 * 32)
    first = harvest(_cfg(argv), progress=False)
    again = harvest(_cfg(argv), progress=False)
    assert again.already_complete and again.path == first.path  # the same text is served from the cache
    before = _digest(Path(first.path))

    _edit_start(corpus)
    edited = harvest(_cfg(argv), progress=False)
    assert not edited.already_complete and edited.path != first.path
    old, new = open_store(first.path), open_store(edited.path)
    assert not np.array_equal(old.tokens(), new.tokens())  # harvested from the new text
    assert old.settings["dataset"]["fingerprint"] != new.settings["dataset"]["fingerprint"]
    assert _digest(Path(first.path)) == before  # the old store is kept as it was
    with pytest.raises(SaepipeError, match="other text than dataset"):  # and not resumed from the new text
        harvest(_cfg([*argv, "--out", first.path]), progress=False)
    assert _digest(Path(first.path)) == before


def test_a_store_without_a_dataset_fingerprint_still_reads_but_is_never_reused(
    tmp_path, tiny_model_dir, small_corpus, capsys
):
    root = tmp_path / "cache"
    argv = _argv(tiny_model_dir, small_corpus, str(root), tokens=8 * 32)
    made = Path(harvest(_cfg(argv), progress=False).path)
    # Make it exactly what saepipe wrote before the fingerprint: settings without it, with a seed, at the
    # cache key those settings hash to.
    meta_path = made / "zarr.json"
    meta = json.loads(meta_path.read_text())
    settings = meta["attributes"]["saepipe"]["settings"]
    del settings["dataset"]["fingerprint"]
    settings["seed"] = 0
    meta_path.write_text(json.dumps(meta))
    legacy = root / "stores" / f"{store_key(settings)}-8"
    made.rename(legacy)
    before = _digest(legacy)

    store = open_store(str(legacy))  # reads as before
    assert store.n_contexts == 8 and store.tokens().shape == (8, 32)
    again = harvest(_cfg(argv), progress=False)
    assert again.path != str(legacy) and not again.already_complete  # never served: harvested anew
    assert main([*argv, "--out", str(legacy)]) == 2
    err = capsys.readouterr().err.strip()
    assert "written before saepipe recorded dataset fingerprints" in err and len(err.splitlines()) == 1, err
    assert _digest(legacy) == before
    assert {e.url for e in list_entries(str(root))} == {str(legacy), again.path}  # both listed
