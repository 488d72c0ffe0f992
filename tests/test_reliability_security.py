"""Security: nothing is unpickled, cache names cannot escape the cache root, and credentials (object store,
W&B) never reach logs, metadata, cfg.json, checkpoints or error messages."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from saepipe.cli import main
from saepipe.errors import SaepipeError
from saepipe.harvest.cache import _ENTRY, locate, safe_name, store_key

REPO = Path(__file__).resolve().parents[1]
SOURCES = [p for d in ("harvest", "train", "analyze", "saepipe") for p in sorted((REPO / d).rglob("*.py"))]
H1 = "blocks.1.hook_resid_post"


def test_no_pickle_anywhere_in_the_source():
    """No module may unpickle: no pickle/dill/joblib/shelve/marshal, torch.load only with weights_only=True,
    numpy loads never with allow_pickle, pandas never read_pickle."""
    assert len(SOURCES) > 30
    for path in SOURCES:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                bad = [
                    n
                    for n in names
                    if n.split(".")[0] in {"pickle", "dill", "joblib", "shelve", "marshal", "cloudpickle"}
                ]
                assert not bad, f"{path}:{node.lineno} imports {bad}"
            if isinstance(node, ast.Call):
                func = ast.unparse(node.func)
                kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
                where = f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)[:80]}"
                if func.endswith("torch.load") or (func == "load" and "weights_only" in kw):
                    assert kw.get("weights_only") == "True", where
                assert kw.get("allow_pickle") != "True", where
                assert not func.endswith(("read_pickle", "Unpickler")), where


@pytest.mark.parametrize(
    "name", ["..", "../x", "../../etc/passwd", "/etc", "a/b", "a\\b", ".hidden", "", ".", "x/../..", "~root"]
)
def test_cache_names_cannot_escape_the_root(name):
    if name == "~root":  # no separator: a plain (if odd) name, which stays one component under the root
        assert safe_name(name) == name
        return
    with pytest.raises(SaepipeError, match="not a cache key"):
        safe_name(name)


def test_store_locations_stay_under_the_root(tmp_path):
    """A store's cache name is a hash of its settings, whatever strings the settings hold."""
    root = str(tmp_path / "cache")
    evil = {"model": {"name": "../../../etc"}, "dataset": {"name": "/abs/../x"}, "hooks": ["../h"],
            "n_contexts_target": 7}  # fmt: skip
    url = locate(root, evil)
    assert url == f"{root}/stores/{store_key(evil)}-7" and _ENTRY.fullmatch(url.rsplit("/", 1)[1])
    assert Path(url).resolve().is_relative_to(Path(root).resolve())


def test_cache_rm_does_not_follow_a_symlink_out_of_the_root(tmp_path, tiny_store, capsys):
    outside = tmp_path / "precious"
    shutil.copytree(tiny_store, outside)
    root = tmp_path / "cache"
    (root / "stores").mkdir(parents=True)
    link = root / "stores" / "0123456789abcdef0123-40"
    link.symlink_to(outside, target_is_directory=True)
    before = {p.relative_to(outside): p.read_bytes() for p in outside.rglob("*") if p.is_file()}
    assert main(["cache", "rm", link.name, "--cache", str(root)]) == 0  # the entry is removed: the link...
    assert f"removed {link}" in capsys.readouterr().out
    assert not os.path.lexists(link)
    after = {p.relative_to(outside): p.read_bytes() for p in outside.rglob("*") if p.is_file()}
    assert after == before, "cache rm deleted or changed files outside the cache root"  # ...not its target


def _everything_under(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in root.rglob("*") if p.is_file())


def test_s3_credentials_never_reach_store_logs_or_errors(s3_bucket, tmp_path, tiny_model_dir, small_corpus):
    import s3fs

    secret, key_id = os.environ["AWS_SECRET_ACCESS_KEY"], os.environ["AWS_ACCESS_KEY_ID"]
    argv = [sys.executable, "-m", "saepipe", "harvest", "--model", str(tiny_model_dir), "--dataset", str(small_corpus),
            "--hook", H1, "--tokens", "256", "--context-size", "32", "--batch-size", "4", "--contexts-per-chunk", "4",
            "--out", f"{s3_bucket}/store"]  # fmt: skip
    ok = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    stored = b"".join(fs.cat(p) for p in fs.find(f"{s3_bucket}/store"))
    assert b"zarr_format" in stored  # non-vacuous: we read the store back
    failures = [
        subprocess.run([*argv, "--tokens", "512"], capture_output=True, text=True, timeout=300),  # other settings
        subprocess.run([sys.executable, "-m", "saepipe", "train", "--store", f"{s3_bucket}/nothing", "--hook", H1,
                        "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=300),
    ]  # fmt: skip
    for res in failures:
        assert res.returncode == 2, res.stderr
        assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    for text in [ok.stdout, ok.stderr, *(r.stdout + r.stderr for r in failures)]:
        assert secret not in text and key_id not in text
    assert secret.encode() not in stored and key_id.encode() not in stored


def test_wandb_key_never_reaches_run_files_or_logs(tmp_path, tiny_store, monkeypatch):
    secret = "wandb-secret-0123456789abcdef0123456789abcdef"
    monkeypatch.setenv("WANDB_API_KEY", secret)
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    res = subprocess.run(
        [sys.executable, "-m", "saepipe", "train", "--store", str(tiny_store), "--hook", H1, "--width", "64", "--k", "4",
         "--tokens", "1280", "--batch-size", "64", "--device", "cpu", "--wandb", "offline", "--log-every", "5",
         "--out", str(out)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "WANDB_MODE": "offline"},
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert list((out / "wandb").glob("offline-run-*")), "no offline W&B run: the test would be vacuous"
    assert json.loads((out / "topk-w64-k4" / "cfg.json").read_text())["hook_name"] == H1
    everything = _everything_under(out)
    assert secret.encode() not in everything and secret not in res.stdout + res.stderr
    assert not re.search(rb"WANDB_API_KEY", everything)
