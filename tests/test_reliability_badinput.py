"""Bad input matrix: every user mistake gives exit code 2 and one stderr line naming the problem and the fix.

Each case runs `saepipe.cli.main` in-process (a few through a real subprocess, to prove no traceback reaches
stderr) and hashes every existing store and run dir before and after: a refused command must leave them
byte-identical. `pipelines.yaml` cases belong with `saepipe run` and are not here yet.
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import tree_digest

from saepipe.cli import main

HOOK = "blocks.1.hook_resid_post"


@dataclass
class World:
    """Existing artifacts the bad commands point at; none of them may change."""

    root: Path
    model: Path
    corpus: Path
    store: Path  # a private copy of tiny_store
    run: Path  # a finished training run on `store` (SAE dir run/topk-w128-k8)
    synth: Path  # a synthetic set (d_model 16) with its own finished run synth_run/topk-w32-k4
    newer: Path  # a store whose metadata says schema version 99
    incomplete: Path  # a store with its commit count cut back and complete=false
    narrow: Path  # a store holding HOOK like `store`, but with d_model 16 (not 64)

    @property
    def sae(self) -> Path:
        return self.run / "topk-w128-k8"

    @property
    def synth_sae(self) -> Path:
        return self.root / "synth_run" / "topk-w32-k4"

    @property
    def narrow_sae(self) -> Path:
        """An SAE with d_in 16 whose cfg.json names HOOK, which `store` holds: only d_model tells them apart."""
        return self.root / "narrow_run" / "topk-w32-k4"

    def guarded(self) -> list[Path]:
        return [self.store, self.run, self.synth, self.root / "synth_run", self.newer, self.incomplete,
                self.narrow, self.root / "narrow_run"]  # fmt: skip


def _narrow_store(path: Path) -> Path:
    """A real store of hook HOOK with d_model 16, written through the store's own writer."""
    import numpy as np

    from saepipe.harvest.store import StoreWriter

    settings = {
        "model": {"name": "hand", "fingerprint": "hand", "d_model": 16, "n_layers": 2, "dtype": "float32"},
        "tokenizer": {"name": "none", "vocab_size": 5, "bos_token_id": None, "eos_token_id": None},
        "dataset": {"name": "hand", "config": None, "split": "train", "text_column": None},
        "hooks": [HOOK], "context_size": 16, "prepend_bos": False, "dtype": "float32", "compression": "none",
        "contexts_per_chunk": 4, "chunks_per_shard": 2, "batch_size": 8, "n_contexts_target": 32,
    }  # fmt: skip
    writer = StoreWriter(str(path), settings)
    rng = np.random.default_rng(0)
    for start in range(0, 32, 8):
        acts = rng.normal(size=(8, 16, 16)).astype(np.float32)
        writer.write_shard(start, np.zeros((8, 16), np.int32), {HOOK: acts}, first_pos=0)
    writer.finish()
    return path


def _edit_meta(store: Path, **changes) -> None:
    meta_path = store / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["saepipe"].update(changes)
    meta_path.write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_store, tiny_model_dir, small_corpus) -> World:
    root = tmp_path_factory.mktemp("badinput")
    store = root / "store"
    shutil.copytree(tiny_store, store)
    common = ["--device", "cpu", "--batch-size", "64", "--b-dec-init", "zeros", "--log-every", "10"]
    assert main(["train", "--store", str(store), "--hook", HOOK, "--width", "128", "--k", "8",
                 "--tokens", str(64 * 10), "--out", str(root / "run"), *common]) == 0  # fmt: skip
    assert main(["synth", "--out", str(root / "synth"), "--n-features", "32", "--d-model", "16",
                 "--tokens", "512", "--context-size", "16", "--contexts-per-chunk", "4",
                 "--chunks-per-shard", "2"]) == 0  # fmt: skip
    assert main(["train", "--store", str(root / "synth" / "store"), "--hook", "synthetic", "--width", "32",
                 "--k", "4", "--tokens", str(64 * 5), "--out", str(root / "synth_run"), *common]) == 0  # fmt: skip
    newer = root / "newer"
    shutil.copytree(tiny_store, newer)
    _edit_meta(newer, schema_version=99)
    incomplete = root / "incomplete"
    shutil.copytree(tiny_store, incomplete)
    _edit_meta(incomplete, n_contexts=8, complete=False)
    narrow = _narrow_store(root / "narrow")
    assert main(["train", "--store", str(narrow), "--hook", HOOK, "--width", "32", "--k", "4",
                 "--tokens", str(64 * 5), "--out", str(root / "narrow_run"), *common]) == 0  # fmt: skip
    w = World(
        root, tiny_model_dir, small_corpus, store, root / "run", root / "synth", newer, incomplete, narrow
    )
    # The d_model cases are meaningful only if the hook matches and d_model alone differs.
    narrow_cfg = json.loads((w.narrow_sae / "cfg.json").read_text())
    assert narrow_cfg["hook_name"] == HOOK and narrow_cfg["d_in"] == 16
    assert HOOK in json.loads((store / "zarr.json").read_text())["attributes"]["saepipe"]["settings"]["hooks"]
    return w


def _harvest(w: World, out: str = "{new}", **over: str) -> list[str]:
    opts = {"--model": str(w.model), "--dataset": str(w.corpus), "--hook": HOOK, "--tokens": "256",
            "--context-size": "32", "--batch-size": "4", "--contexts-per-chunk": "4",
            "--chunks-per-shard": "2", "--dtype": "float32", "--out": out, **over}  # fmt: skip
    return ["harvest", *(x for k, v in opts.items() for x in ((k,) if v is None else (k, v)))]


def _train(w: World, **over: str | None) -> list[str]:
    opts = {"--store": str(w.store), "--hook": HOOK, "--width": "64", "--k": "4", "--tokens": "640",
            "--batch-size": "64", "--device": "cpu", "--out": "{new}", **over}  # fmt: skip
    return ["train", *(x for k, v in opts.items() if v != "DROP" for x in ((k,) if v is None else (k, v)))]


def _analyze(w: World, **over: str) -> list[str]:
    opts = {"--sae": str(w.sae), "--store": str(w.store), "--device": "cpu", "--out": "{new}", **over}
    return ["analyze", *(x for k, v in opts.items() if v != "DROP" for x in (k, v))]


def _evaluate(w: World, **over: str) -> list[str]:
    opts = {"--sae": str(w.sae), "--store": str(w.store), "--device": "cpu", "--contexts": "2",
            "--out": "{new}/eval.json", **over}  # fmt: skip
    return ["evaluate", *(x for k, v in opts.items() if v != "DROP" for x in (k, v))]


# Damaged SAE dirs, built from the good one by `_damage_sae` below.
def _truncate_weights(d: Path) -> None:
    p = d / "sae_weights.safetensors"
    p.write_bytes(p.read_bytes()[:100])


def _garbage_weights(d: Path) -> None:
    (d / "sae_weights.safetensors").write_bytes(b"\x80\x04\x95 not a safetensors file, a pickle header" * 4)


def _cfg_edit(**changes):
    def edit(d: Path) -> None:
        cfg = json.loads((d / "cfg.json").read_text())
        for k, v in changes.items():
            if v is None:
                cfg.pop(k, None)
            else:
                cfg[k] = v
        (d / "cfg.json").write_text(json.dumps(cfg))

    return edit


def _cfg_not_json(d: Path) -> None:
    (d / "cfg.json").write_text('{"architecture": "topk", ')


def _no_cfg(d: Path) -> None:
    (d / "cfg.json").unlink()


def _other_model(d: Path) -> None:
    cfg = json.loads((d / "cfg.json").read_text())
    cfg["saepipe"]["store"][0]["model_fingerprint"] = "0" * 64
    cfg["saepipe"]["store"] = cfg["saepipe"]["store"][0]  # the single-store form open_inputs reads
    (d / "cfg.json").write_text(json.dumps(cfg))


def _wrong_shape(d: Path) -> None:
    from safetensors.numpy import load_file, save_file

    t = load_file(str(d / "sae_weights.safetensors"))
    t["W_enc"] = t["W_enc"][:, :64].copy()
    save_file(t, str(d / "sae_weights.safetensors"))


SAE_DAMAGE = {
    "truncated": _truncate_weights,
    "garbage": _garbage_weights,
    "no_d_in": _cfg_edit(d_in=None),
    "no_arch": _cfg_edit(architecture=None),
    "unknown_arch": _cfg_edit(architecture="gated"),
    "d_in_str": _cfg_edit(d_in="sixty-four"),
    "not_json": _cfg_not_json,
    "no_cfg": _no_cfg,
    "other_model": _other_model,
    "wrong_shape": _wrong_shape,
    "no_hook_name": _cfg_edit(hook_name=None),
}


def _analyze_damaged(w: World, kind: str) -> list[str]:
    return _analyze(w, **{"--sae": f"{{bad:{kind}}}"})


# (id, argv builder, words the one line must contain). "{new}" is a fresh path; "{bad:<kind>}" a damaged
# copy of the run's SAE dir; "{file}" an existing file; "{nonstore}" a non-empty directory that is no store.
CASES: list[tuple[str, object, list[str]]] = [
    # --- harvest
    ("harvest-unknown-hook", lambda w: _harvest(w, **{"--hook": "blocks.1.hook_resid_pots"}), ["unknown hook", "close names"]),
    ("harvest-hook-layer-too-deep", lambda w: _harvest(w, **{"--hook": "blocks.9.hook_resid_post"}), ["blocks.9"]),
    ("harvest-hook-twice", lambda w: [*_harvest(w), "--hook", HOOK], ["named twice"]),
    ("harvest-context-0", lambda w: _harvest(w, **{"--context-size": "0"}), ["--context-size"]),
    ("harvest-context-1", lambda w: _harvest(w, **{"--context-size": "1"}), ["--context-size"]),
    ("harvest-context-too-long", lambda w: _harvest(w, **{"--context-size": "4096"}), ["exceeds the model's maximum", "lower it"]),
    ("harvest-tokens-0", lambda w: _harvest(w, **{"--tokens": "0"}), ["--tokens"]),
    ("harvest-tokens-negative", lambda w: _harvest(w, **{"--tokens": "-5"}), ["--tokens"]),
    ("harvest-batch-too-big", lambda w: _harvest(w, **{"--batch-size": "64"}), ["batch_size must be at most"]),
    ("harvest-empty-dataset", lambda w: _harvest(w, **{"--dataset": "{empty}"}), ["less text than one context"]),
    ("harvest-binary-dataset", lambda w: _harvest(w, **{"--dataset": "{binary}"}), ["{binary}"]),
    ("harvest-missing-dataset", lambda w: _harvest(w, **{"--dataset": "{new}/nothing.txt"}), ["nothing.txt"]),
    ("harvest-missing-column", lambda w: _harvest(w, **{"--dataset": "{jsonl}", "--text-column": "body"}), ["'body'"]),
    ("harvest-missing-model", lambda w: _harvest(w, **{"--model": "{new}/no-model"}), ["no-model"]),
    ("harvest-model-not-a-model", lambda w: _harvest(w, **{"--model": "{nonstore}"}), ["--model"]),
    ("harvest-out-is-file", lambda w: _harvest(w, out="{file}"), ["existing file"]),
    ("harvest-out-nonstore-dir", lambda w: _harvest(w, out="{nonstore}"), ["not a store"]),
    ("harvest-out-unwritable", lambda w: _harvest(w, out="/proc/saepipe-store"), ["cannot write", "writable"]),
    ("harvest-out-newer-schema", lambda w: _harvest(w, out=str(w.newer)), ["schema version 99"]),
    ("harvest-out-other-settings", lambda w: _harvest(w, out=str(w.store), **{"--tokens": "1280"}), ["rerun with the store's settings"]),
    ("harvest-no-cuda", lambda w: _harvest(w, **{"--device": "cuda"}), ["CUDA", "--device"]),
    ("harvest-bad-device", lambda w: _harvest(w, **{"--device": "tpu9"}), ["--device"]),
    ("harvest-lock-stale-0", lambda w: _harvest(w, **{"--lock-stale-after": "0"}), ["--lock-stale-after"]),
    ("harvest-tokens-not-int", lambda w: _harvest(w, **{"--tokens": "abc"}), ["--tokens", "abc"]),
    ("harvest-unknown-flag", lambda w: [*_harvest(w), "--layers", "3"], ["--layers"]),
    ("harvest-bad-dtype-choice", lambda w: _harvest(w, **{"--dtype": "float64"}), ["--dtype", "float64"]),
    # --- train
    ("train-missing-store", lambda w: _train(w, **{"--store": "{new}/nostore"}), ["no activation store", "harvest"]),
    ("train-nonstore", lambda w: _train(w, **{"--store": "{nonstore}"}), ["{nonstore}"]),
    ("train-newer-schema", lambda w: _train(w, **{"--store": str(w.newer)}), ["schema version 99", "upgrade"]),
    ("train-incomplete-store", lambda w: _train(w, **{"--store": str(w.incomplete)}), ["incomplete", "rerun"]),
    ("train-unknown-hook", lambda w: _train(w, **{"--hook": "blocks.7.hook_resid_post"}), ["no hook", HOOK]),
    ("train-unknown-arch", lambda w: _train(w, **{"--arch": "gated"}), ["unknown --arch", "topk"]),
    ("train-k-above-width", lambda w: _train(w, **{"--k": "100"}), ["--k 100", "--width"]),
    ("train-k-0", lambda w: _train(w, **{"--k": "0"}), ["--k"]),
    ("train-width-0", lambda w: _train(w, **{"--width": "0"}), ["--width"]),
    ("train-negative-lr", lambda w: _train(w, **{"--lr": "-0.001"}), ["--lr"]),
    ("train-lr-warmup-2", lambda w: _train(w, **{"--lr-warmup": "2"}), ["--lr-warmup"]),
    ("train-batch-0", lambda w: _train(w, **{"--batch-size": "0"}), ["--batch-size"]),
    ("train-stores-disagree-d-model", lambda w: [*_train(w), "--store", str(w.narrow)], ["disagree on d_model", "has 64", "has 16"]),
    ("train-out-is-file", lambda w: _train(w, **{"--out": "{file}"}), ["{file}"]),
    ("train-out-unwritable", lambda w: _train(w, **{"--out": "/proc/saepipe-run"}), ["/proc/saepipe-run"]),
    ("train-resume-other-settings", lambda w: _train(w, **{"--out": str(w.run), "--width": "128", "--k": "8", "--lr": "0.1"}), ["--no-resume"]),
    ("train-no-cuda", lambda w: _train(w, **{"--device": "cuda"}), ["CUDA"]),
    ("train-missing-hook-flag", lambda w: _train(w, **{"--hook": "DROP"}), ["--hook", "required"]),
    ("train-lr-not-float", lambda w: _train(w, **{"--lr": "fast"}), ["--lr", "fast"]),
    ("train-unknown-wandb-mode", lambda w: _train(w, **{"--wandb": "cloud"}), ["--wandb", "cloud"]),
    ("train-eval-every-0", lambda w: _train(w, **{"--eval-every": "0"}), ["--eval-every"]),
    ("train-eval-every-synthetic", lambda w: _train(w, **{"--store": str(w.synth / "store"), "--hook": "synthetic", "--eval-every": "2"}), ["synthetic", "--eval-every"]),
    # --- analyze
    ("analyze-missing-sae", lambda w: _analyze(w, **{"--sae": "{new}/nosae"}), ["no such directory"]),
    ("analyze-sae-is-store", lambda w: _analyze(w, **{"--sae": str(w.store)}), ["not an SAE dir"]),
    *[
        (f"analyze-sae-{kind}", functools.partial(_analyze_damaged, kind=kind), ["{bad}"]) for kind in SAE_DAMAGE
    ],
    ("analyze-d-model-mismatch", lambda w: _analyze(w, **{"--sae": str(w.narrow_sae)}), ["d_in=16", "d_model=64"]),
    ("analyze-d-model-mismatch-hook", lambda w: _analyze(w, **{"--sae": str(w.synth_sae), "--hook": HOOK}), ["d_in=16", "d_model=64"]),
    ("analyze-synthetic-store", lambda w: _analyze(w, **{"--sae": str(w.synth_sae), "--store": "DROP"}), ["synthetic", "saepipe recovery"]),
    ("analyze-store-newer-schema", lambda w: _analyze(w, **{"--store": str(w.newer)}), ["schema version 99"]),
    ("analyze-unknown-rank-key", lambda w: _analyze(w, **{"--rank-by": "vibes"}), ["unknown ranking key", "interpretability"]),
    ("analyze-out-is-file", lambda w: _analyze(w, **{"--out": "{file}"}), ["existing file"]),
    ("analyze-out-nonstore-dir", lambda w: _analyze(w, **{"--out": "{nonstore}"}), ["non-empty directory"]),
    ("analyze-top-k-0", lambda w: _analyze(w, **{"--top-k": "0"}), ["--top-k"]),
    ("analyze-hook-not-in-store", lambda w: _analyze(w, **{"--hook": "blocks.5.hook_resid_post"}), ["no hook"]),
    # --- evaluate
    ("evaluate-missing-sae", lambda w: _evaluate(w, **{"--sae": "{new}/nosae"}), ["no such directory"]),
    ("evaluate-contexts-0", lambda w: _evaluate(w, **{"--contexts": "0"}), ["--contexts"]),
    ("evaluate-sae-truncated", lambda w: _evaluate(w, **{"--sae": "{bad:truncated}"}), ["{bad}"]),
    ("evaluate-d-model-mismatch", lambda w: _evaluate(w, **{"--sae": str(w.narrow_sae)}), ["d_in=16", "d_model=64"]),
    ("evaluate-synthetic-store", lambda w: _evaluate(w, **{"--sae": str(w.synth_sae), "--store": "DROP"}), ["synthetic activations", "saepipe recovery"]),
    ("evaluate-empty-dataset", lambda w: _evaluate(w, **{"--dataset": "{empty}"}), ["{empty}"]),
    # --- synth
    ("synth-freq-order", lambda w: ["synth", "--out", "{new}", "--freq-min", "0.5", "--freq-max", "0.1"], ["freq_min"]),
    ("synth-one-feature", lambda w: ["synth", "--out", "{new}", "--n-features", "1"], ["--n-features"]),
    ("synth-out-is-file", lambda w: ["synth", "--out", "{file}", "--tokens", "64"], ["{file}"]),
    ("synth-hierarchy-too-big", lambda w: ["synth", "--out", "{new}", "--n-features", "8", "--n-parents", "4"], ["n_parents"]),
    # --- recovery
    ("recovery-missing-truth", lambda w: ["recovery", "--sae", str(w.synth_sae), "--truth", "{new}/none"], ["none"]),
    ("recovery-sae-from-other-store", lambda w: ["recovery", "--sae", str(w.sae), "--truth", str(w.synth)], ["d_in"]),
    ("recovery-store-not-synthetic", lambda w: ["recovery", "--sae", str(w.synth_sae), "--truth", str(w.synth), "--store", str(w.store)], ["not generated from the synthetic set"]),
    ("recovery-sae-truncated", lambda w: ["recovery", "--sae", "{bad:truncated}", "--truth", str(w.synth)], ["{bad}"]),
    # --- splitting
    ("splitting-sae-twice", lambda w: ["splitting", "--saes", str(w.sae), "--saes", str(w.sae), "--store", str(w.store), "--out", "{new}"], ["twice"]),
    ("splitting-missing-store", lambda w: ["splitting", "--saes", str(w.sae), "--store", "{new}/nostore", "--out", "{new}/rep"], ["no activation store"]),
    ("splitting-mixed-d-model", lambda w: ["splitting", "--saes", str(w.sae), "--saes", str(w.synth_sae), "--store", str(w.store), "--out", "{new}"], ["{synth_sae}"]),
    ("splitting-sae-no-cfg", lambda w: ["splitting", "--saes", "{bad:no_cfg}", "--store", str(w.store), "--out", "{new}"], ["not an SAE dir"]),
    # --- cache
    ("cache-traversal-info", lambda w: ["cache", "info", "../../etc", "--cache", "{new}"], ["not a cache key"]),
    ("cache-traversal-rm", lambda w: ["cache", "rm", "..", "--cache", str(w.root)], ["not a cache key"]),
    ("cache-traversal-verify", lambda w: ["cache", "verify", "a/../../store", "--cache", str(w.root)], ["not a cache key"]),
    ("cache-missing-key", lambda w: ["cache", "info", "--cache", "{new}"], ["needs a KEY"]),
    ("cache-unknown-key", lambda w: ["cache", "verify", "0123456789abcdef0123-8", "--cache", "{new}"], ["no cached store"]),
    ("cache-unknown-action", lambda w: ["cache", "frobnicate"], ["frobnicate"]),
]  # fmt: skip


def _materialize(w: World, tmp: Path, argv: list[str], words: list[str]) -> tuple[list[str], list[str]]:
    """Fill the placeholders with real paths (fresh ones under `tmp`)."""
    empty = tmp / "empty"
    empty.mkdir(exist_ok=True)
    (empty / "a.txt").write_text("  \n\n ")
    binary = tmp / "binary.txt"
    binary.write_bytes(bytes(range(256)) * 64)
    jsonl = tmp / "docs.jsonl"
    jsonl.write_text(json.dumps({"text": "To be or not to be. " * 50}) + "\n")
    afile = tmp / "a_file"
    afile.write_text("not a directory")
    nonstore = tmp / "nonstore"
    nonstore.mkdir(exist_ok=True)
    (nonstore / "notes.txt").write_text("mine")
    subs = {"{new}": str(tmp / "new"), "{empty}": str(empty), "{binary}": str(binary), "{jsonl}": str(jsonl),
            "{file}": str(afile), "{nonstore}": str(nonstore), "{synth_sae}": str(w.synth_sae)}  # fmt: skip
    bad_dir = ""
    out = []
    for a in argv:
        if a.startswith("{bad:"):
            kind = a[5:-1]
            bad = tmp / f"sae-{kind}"
            shutil.copytree(w.sae, bad)
            SAE_DAMAGE[kind](bad)
            bad_dir = str(bad)
            a = bad_dir
        for k, v in subs.items():
            a = a.replace(k, v)
        out.append(a)
    subs["{bad}"] = bad_dir
    return out, [next((v for k, v in subs.items() if k == word), word) for word in words]


def _run_in_process(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse refuses before main's handler
        code = e.code
    return code, capsys.readouterr().err


def _check(code: int, err: str, words: list[str]) -> None:
    lines = err.strip().splitlines()
    assert code == 2, f"exit {code}: {err}"
    assert "Traceback" not in err, err
    assert len(lines) == 1, f"{len(lines)} lines on stderr:\n{err}"
    for word in words:
        assert word in lines[0], f"{word!r} not in: {lines[0]}"


@pytest.mark.parametrize(
    ("argv_of", "words"),
    [
        pytest.param(a, words, id=name)
        for name, a, words in CASES
    ],
)  # fmt: skip
def test_bad_input_is_one_line_and_touches_nothing(world, tmp_path, capsys, argv_of, words):
    before = {p: tree_digest(p) for p in world.guarded()}
    argv, words = _materialize(world, tmp_path, argv_of(world), words)
    code, err = _run_in_process(argv, capsys)
    _check(code, err, words)
    assert {p: tree_digest(p) for p in world.guarded()} == before
    assert not (tmp_path / "new").exists() or not any((tmp_path / "new").rglob("*.safetensors"))


@pytest.mark.parametrize(
    "name", ["harvest-unknown-hook", "train-k-above-width", "analyze-sae-truncated", "cache-traversal-rm"]
)
def test_no_traceback_reaches_stderr_of_a_real_process(world, tmp_path, name):
    """The same refusals through `python -m saepipe`: exit 2, one line, nothing else on stderr."""
    argv_of, words = next((a, w) for n, a, w in CASES if n == name)
    argv, words = _materialize(world, tmp_path, argv_of(world), words)
    res = subprocess.run(
        [sys.executable, "-m", "saepipe", *argv], capture_output=True, text=True, timeout=120
    )
    _check(res.returncode, res.stderr, words)


def test_close_hook_names_are_listed_once(world, tmp_path, capsys):
    argv, _ = _materialize(world, tmp_path, _harvest(world, **{"--hook": "blocks.1.hook_resid_pots"}), [])
    code, err = _run_in_process(argv, capsys)
    names = err.strip().split("close names: ")[1].split(", ")
    assert code == 2 and len(names) == len(set(names)), err
