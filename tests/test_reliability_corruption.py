"""Damaged stores: every stage that reads one refuses with a line naming the damaged piece, `saepipe cache
verify` finds it, and `saepipe harvest ... --repair` recomputes only the damaged shards, ending byte-identical.

Damage is done to real files of a real store: a flipped byte in a chunk, a truncated shard file, a deleted
shard file (which zarr on its own reads back as zeros, its fill value: silently wrong data), and edits to
the group metadata.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import one_line, tree_digest

from saepipe.cli import main
from saepipe.errors import SaepipeError
from saepipe.harvest import open_store

H0, H1 = "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"
KEY = "0123456789abcdef0123-40"  # a cache entry name (the cache never checks it against the settings)
SHARD1 = f"activations/{H0}/c/1/0/0"  # contexts [8, 16): chunks [8, 12) and [12, 16)


def harvest_argv(model: Path, corpus: Path, out: Path) -> list[str]:
    """The command that made the session's tiny_store (tests/conftest.py), aimed at `out`."""
    return ["harvest", "--model", str(model), "--dataset", str(corpus), "--hook", H0, "--hook", H1,
            "--tokens", str(40 * 32), "--context-size", "32", "--batch-size", "4", "--contexts-per-chunk", "4",
            "--chunks-per-shard", "2", "--dtype", "float32", "--out", str(out)]  # fmt: skip


def flip(path: Path, at: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# kind -> (damage, the damaged piece, contexts the reader names, contexts `cache verify` names first)
DAMAGE = {
    "flip-activation-chunk": (lambda s: flip(s / SHARD1), SHARD1, "[8, 12)", "[8, 12)"),
    "flip-second-chunk": (lambda s: flip(s / SHARD1, 40000), SHARD1, "[12, 16)", "[12, 16)"),
    "flip-shard-index": (lambda s: flip(s / SHARD1, (s / SHARD1).stat().st_size - 10), SHARD1, "[8, 12)", "[8, 12)"),
    "truncate-shard": (lambda s: truncate(s / SHARD1), SHARD1, "[8, 12)", "[8, 12)"),
    "delete-shard": (lambda s: (s / SHARD1).unlink(), SHARD1, "[8, 16)", "[8, 12)"),
    "delete-last-shard": (lambda s: (s / f"activations/{H0}/c/4/0/0").unlink(), f"{H0}/c/4/0/0", "[32, 40)", "[32, 36)"),
    "flip-tokens": (lambda s: flip(s / "tokens/c/2/0", 50), "tokens/c/2/0", "[16, 20)", "[16, 20)"),
    "delete-tokens-shard": (lambda s: (s / "tokens/c/0/0").unlink(), "tokens/c/0/0", "[0, 8)", "[0, 4)"),
}  # fmt: skip


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory, tiny_store) -> Path:
    out = tmp_path_factory.mktemp("corruption_run")
    assert main(["train", "--store", str(tiny_store), "--hook", H0, "--width", "64", "--k", "4",
                 "--tokens", "640", "--batch-size", "64", "--b-dec-init", "zeros", "--device", "cpu",
                 "--out", str(out)]) == 0  # fmt: skip
    return out / "topk-w64-k4"


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_verify_finds_and_repair_restores_bytes(
    kind, tmp_path, tiny_store, tiny_model_dir, small_corpus, capsys
):
    root = tmp_path / "cache"
    store = root / "stores" / KEY
    shutil.copytree(tiny_store, store)
    want = tree_digest(store)
    damage, piece, contexts, first_chunk = DAMAGE[kind]
    damage(store)

    with pytest.raises(SaepipeError) as e:  # the reader itself refuses, naming shard file and contexts
        hook = "tokens" if piece.startswith("tokens") else H0
        _ = open_store(str(store)).tokens() if hook == "tokens" else open_store(str(store)).activations(hook)
    assert piece in str(e.value) and contexts in str(e.value) and "--repair" in str(e.value)

    err = one_line(["cache", "verify", KEY, "--cache", str(root)], capsys)
    assert f"contexts {first_chunk}" in err and "--repair" in err

    assert main([*harvest_argv(tiny_model_dir, small_corpus, store), "--repair"]) == 0
    assert "repaired 1 damaged shard" in capsys.readouterr().out
    assert tree_digest(store) == want
    assert main(["cache", "verify", KEY, "--cache", str(root)]) == 0


def test_repair_recomputes_only_damaged_shards(tmp_path, tiny_store, tiny_model_dir, small_corpus, capsys):
    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)
    want = tree_digest(store)
    flip(store / SHARD1)
    (store / f"activations/{H1}/c/3/0/0").unlink()
    untouched = store / f"activations/{H1}/c/0/0/0"
    stamp = untouched.stat().st_mtime_ns
    assert main([*harvest_argv(tiny_model_dir, small_corpus, store), "--repair"]) == 0
    assert "repaired 2 damaged shard(s)" in capsys.readouterr().out
    assert untouched.stat().st_mtime_ns == stamp  # shard 0 was not rewritten
    assert tree_digest(store) == want
    # --repair on an intact store changes nothing and says so
    assert main([*harvest_argv(tiny_model_dir, small_corpus, store), "--repair"]) == 0
    assert "already complete" in capsys.readouterr().out and tree_digest(store) == want


def test_repair_refuses_other_settings_and_missing_store(
    tmp_path, tiny_store, tiny_model_dir, small_corpus, capsys
):
    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)
    flip(store / SHARD1)
    before = tree_digest(store)
    argv = harvest_argv(tiny_model_dir, small_corpus, store)
    argv[argv.index("--batch-size") + 1] = "2"
    err = one_line([*argv, "--repair"], capsys)
    assert "batch_size=4, not 2" in err and tree_digest(store) == before
    err = one_line([*harvest_argv(tiny_model_dir, small_corpus, tmp_path / "none"), "--repair"], capsys)
    assert "no store at" in err and not (tmp_path / "none").exists()


def _stage_argv(stage: str, store: Path, sae: Path, tmp: Path) -> list[str]:
    return {
        "train": ["train", "--store", str(store), "--hook", H0, "--width", "64", "--k", "4", "--tokens", "2560",
                  "--batch-size", "64", "--buffer-tokens", "5000", "--device", "cpu", "--out", str(tmp / "run")],
        "analyze": ["analyze", "--sae", str(sae), "--store", str(store), "--device", "cpu", "--out", str(tmp / "rep")],
        "splitting": ["splitting", "--saes", str(sae), "--store", str(store), "--out", str(tmp / "split")],
    }[stage]  # fmt: skip


@pytest.mark.parametrize(
    "kind", ["flip-activation-chunk", "delete-shard", "truncate-shard", "delete-tokens-shard"]
)
@pytest.mark.parametrize("stage", ["train", "analyze", "splitting"])
def test_every_reading_stage_refuses_damage(stage, kind, tmp_path, tiny_store, sae_dir, capsys):
    if stage in ("train", "splitting") and kind == "delete-tokens-shard":
        pytest.skip("train and splitting read no tokens")
    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)
    damage, piece, contexts, _ = DAMAGE[kind]
    damage(store)
    before = tree_digest(store)
    err = one_line(_stage_argv(stage, store, sae_dir, tmp_path), capsys)
    assert piece in err and contexts in err, err
    assert tree_digest(store) == before
    assert not list(tmp_path.rglob("sae_weights.safetensors")) and not list(tmp_path.rglob("report.json"))


def test_recovery_refuses_damaged_synthetic_store(tmp_path, capsys):
    synth = tmp_path / "synth"
    assert main(["synth", "--out", str(synth), "--n-features", "32", "--d-model", "16", "--tokens", "512",
                 "--context-size", "16", "--contexts-per-chunk", "4", "--chunks-per-shard", "2"]) == 0  # fmt: skip
    assert main(["train", "--store", str(synth / "store"), "--hook", "synthetic", "--width", "32", "--k", "4",
                 "--tokens", "320", "--batch-size", "64", "--device", "cpu", "--out", str(tmp_path / "run")]) == 0  # fmt: skip
    (synth / "store/activations/synthetic/c/1/0/0").unlink()
    err = one_line(["recovery", "--sae", str(tmp_path / "run/topk-w32-k4"), "--truth", str(synth)], capsys)
    assert "activations/synthetic/c/1/0/0" in err and "missing" in err


def _edit(store: Path, change) -> None:
    meta = json.loads((store / "zarr.json").read_text())
    change(meta["attributes"]["saepipe"])
    (store / "zarr.json").write_text(json.dumps(meta))


META_EDITS = {
    "n-contexts-beyond-target": (lambda s: _edit(s, lambda m: m.update(n_contexts=400)), "400"),
    "n-contexts-not-int": (lambda s: _edit(s, lambda m: m.update(n_contexts="40")), "'40'"),
    "d-model-edited": (lambda s: _edit(s, lambda m: m["settings"]["model"].update(d_model=65)), "65"),
    "dtype-edited": (lambda s: _edit(s, lambda m: m["settings"].update(dtype="float16")), "float16"),
    "context-size-edited": (lambda s: _edit(s, lambda m: m["settings"].update(context_size=16)), "16"),
    "hook-renamed": (lambda s: _edit(s, lambda m: m["settings"]["hooks"].__setitem__(0, "blocks.0.hook_mlp_out")), "hook_mlp_out"),
    "settings-dropped": (lambda s: _edit(s, lambda m: m.pop("settings")), "settings"),
    "array-meta-deleted": (lambda s: (s / f"activations/{H0}/zarr.json").unlink(), H0),
    "array-shape-edited": (lambda s: (s / f"activations/{H0}/zarr.json").write_text((s / f"activations/{H0}/zarr.json").read_text().replace("64", "63", 1)), H0),
    "group-json-garbage": (lambda s: (s / "zarr.json").write_text('{"zarr_format": 3, "node_ty'), "not a readable Zarr"),
}  # fmt: skip


@pytest.mark.parametrize(
    ("stage", "edit"),
    [("open", e) for e in META_EDITS]
    + [(st, e) for st in ("train", "analyze", "evaluate") for e in ("n-contexts-beyond-target", "d-model-edited", "array-meta-deleted")],
)  # fmt: skip
def test_edited_metadata_is_refused(stage, edit, tmp_path, tiny_store, sae_dir, capsys):
    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)
    damage, word = META_EDITS[edit]
    damage(store)
    before = tree_digest(store)
    if stage == "open":
        with pytest.raises(SaepipeError) as e:
            open_store(str(store))
        assert str(store) in str(e.value) and word in str(e.value), str(e.value)
    else:
        argv = _stage_argv(stage, store, sae_dir, tmp_path) if stage != "evaluate" else [
            "evaluate", "--sae", str(sae_dir), "--store", str(store), "--device", "cpu", "--contexts", "2",
            "--out", str(tmp_path / "eval.json")]  # fmt: skip
        err = one_line(argv, capsys)
        assert str(store) in err, err
    assert tree_digest(store) == before


def test_intact_store_reads_the_same(tiny_store):
    """The integrity checks change nothing for an intact store (and a missing shard is never zeros)."""
    import zarr

    s = open_store(str(tiny_store))
    raw = zarr.open_group(str(tiny_store), mode="r")
    np.testing.assert_array_equal(s.activations(H0), raw[f"activations/{H0}"][:])
    np.testing.assert_array_equal(s.tokens(), raw["tokens"][:])
    assert s.missing_shards(f"activations/{H0}", 0, 40) == []
