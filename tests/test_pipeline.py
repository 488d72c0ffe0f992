"""`saepipe run`: pipelines.yaml is validated whole before anything runs; up-to-date stages are skipped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from saepipe.cli import main

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, pipelines: dict) -> str:
    path = tmp_path / "pipelines.yaml"
    path.write_text(yaml.safe_dump({"pipelines": pipelines}))
    return str(path)


@pytest.fixture
def tiny_pipeline(tmp_path, tiny_model_dir, small_corpus) -> dict:
    return {
        "tiny": {
            "out": str(tmp_path / "runs" / "tiny"),
            "harvest": {"model": str(tiny_model_dir), "dataset": str(small_corpus), "hooks": ["blocks.1.hook_resid_post"],
                        "tokens": 32 * 32, "context_size": 32, "batch_size": 4, "contexts_per_chunk": 4,
                        "chunks_per_shard": 2, "dtype": "float32", "cache": str(tmp_path / "cache")},
            "train": {"arch": "topk", "width": 64, "k": 4, "tokens": 4096, "batch_size": 256, "buffer_tokens": 1024,
                      "log_every": 8, "checkpoint_every": 8, "lr": 0.003},
            "analyze": {"top_k": 5, "dashboard": False, "batch_tokens": 256},
        }
    }  # fmt: skip


def _stamp(tmp_path: Path, stage: str) -> dict:
    return json.loads((tmp_path / "runs" / "tiny" / ".saepipe" / f"{stage}.json").read_text())


def _written(tmp_path: Path) -> dict[str, int]:
    """When each stage stamp and each output file was last written (a skipped stage writes neither)."""
    run = tmp_path / "runs" / "tiny"
    paths = {s: run / ".saepipe" / f"{s}.json" for s in ("harvest", "train", "analyze")}
    paths["weights"] = run / "train" / "topk-w64-k4" / "sae_weights.safetensors"
    paths["report"] = run / "analyze" / "topk-w64-k4" / "report.json"
    return {name: p.stat().st_mtime_ns for name, p in paths.items()}


def _redone(before: dict[str, int], after: dict[str, int]) -> set[str]:
    return {name for name in before if after[name] != before[name]}


def test_run_skip_change_force_only(tmp_path, tiny_pipeline):
    from saepipe.harvest import open_store

    config = _write(tmp_path, tiny_pipeline)
    assert main(["run", "tiny", "--config", config]) == 0
    stamps = {s: _stamp(tmp_path, s) for s in ("harvest", "train", "analyze")}
    assert all(stamp["status"] == "done" for stamp in stamps.values())
    store = open_store(stamps["harvest"]["outputs"]["store"])
    assert store.n_contexts == 32 and store.path.startswith(str(tmp_path / "cache"))
    sae = Path(stamps["train"]["outputs"]["sae_dirs"]["topk-w64-k4"])
    assert sae == tmp_path / "runs" / "tiny" / "train" / "topk-w64-k4" and (sae / "cfg.json").exists()
    report = json.loads((tmp_path / "runs" / "tiny" / "analyze" / "topk-w64-k4" / "report.json").read_text())
    assert report["n_tokens"] == 32 * 31
    written = _written(tmp_path)

    assert main(["run", "tiny", "--config", config]) == 0  # nothing changed: nothing is redone
    assert _redone(written, _written(tmp_path)) == set()
    assert {s: _stamp(tmp_path, s) for s in stamps} == stamps

    assert main(["run", "tiny", "--config", config, "--set", "train.lr=0.001"]) == 0  # train changed
    now = _written(tmp_path)
    # analyze is redone too: its input (the SAE) changed
    assert _redone(written, now) == {"train", "weights", "analyze", "report"}
    assert _stamp(tmp_path, "harvest") == stamps["harvest"]
    assert _stamp(tmp_path, "train")["want"]["configs"][0]["lr"] == 0.001
    assert _stamp(tmp_path, "train")["outputs"]["digest"] != stamps["train"]["outputs"]["digest"]
    assert _stamp(tmp_path, "analyze")["want"]["inputs"] != stamps["analyze"]["want"]["inputs"]

    written = now
    assert main(["run", "tiny", "--config", config, "--set", "train.lr=0.001", "--force", "analyze"]) == 0
    now = _written(tmp_path)
    assert _redone(written, now) == {"analyze", "report"}

    written = now
    argv = ["--set", "train.lr=0.001", "--only", "analyze", "--force", "analyze"]
    assert main(["run", "tiny", "--config", config, *argv]) == 0
    assert _redone(written, _written(tmp_path)) == {"analyze", "report"}


def test_an_edited_corpus_is_harvested_again(tmp_path, tiny_pipeline, small_corpus):
    """The harvest stamp holds the dataset's fingerprint: edit the corpus and the rerun harvests a new
    store (the old one stays in the cache untouched) and trains on it."""
    import shutil

    import numpy as np

    from saepipe.harvest import open_store

    corpus = tmp_path / "corpus"
    shutil.copytree(small_corpus, corpus)
    tiny_pipeline["tiny"]["harvest"]["dataset"] = str(corpus)
    del tiny_pipeline["tiny"]["analyze"]
    config = _write(tmp_path, tiny_pipeline)
    assert main(["run", "tiny", "--config", config]) == 0
    old = _stamp(tmp_path, "harvest")
    old_store = old["outputs"]["store"]
    old_meta = open_store(old_store).meta

    first = sorted(corpus.glob("*.txt"))[0]
    text = first.read_bytes()
    first.write_bytes(text[:4000].upper() + text[4000:])  # same size, other text
    assert main(["run", "tiny", "--config", config]) == 0
    new_store = _stamp(tmp_path, "harvest")["outputs"]["store"]
    assert new_store != old_store and _stamp(tmp_path, "harvest")["want"]["dataset"] != old["want"]["dataset"]
    assert not np.array_equal(open_store(new_store).tokens(), open_store(old_store).tokens())
    assert open_store(old_store).meta == old_meta  # kept as it was
    cfg = json.loads((tmp_path / "runs" / "tiny" / "train" / "topk-w64-k4" / "cfg.json").read_text())
    assert cfg["saepipe"]["store"][0]["path"] == new_store  # and the SAE was retrained on the new store


def test_a_harvest_stamped_before_fingerprints_is_redone_only_when_asked(tmp_path, tiny_pipeline, capsys):
    """A pipeline finished by an older saepipe (its harvest stamp holds no dataset fingerprint) is neither
    trusted nor silently redone (which would replace its trained SAEs): one line asks for --force harvest."""
    del tiny_pipeline["tiny"]["analyze"]
    config = _write(tmp_path, tiny_pipeline)
    assert main(["run", "tiny", "--config", config]) == 0
    path = tmp_path / "runs" / "tiny" / ".saepipe" / "harvest.json"
    old = json.loads(path.read_text())
    del old["want"]["dataset"]
    old["want"]["configs"][0]["seed"] = 0
    path.write_text(json.dumps(old))
    train = tmp_path / "runs" / "tiny" / "train"
    before = {p: p.read_bytes() for p in train.rglob("*") if p.is_file() and "wandb" not in p.parts}
    capsys.readouterr()

    assert main(["run", "tiny", "--config", config]) == 2
    err = capsys.readouterr().err.strip()
    assert "--force harvest" in err and len(err.splitlines()) == 1, err
    assert json.loads(path.read_text()) == old
    assert {p: p.read_bytes() for p in train.rglob("*") if p.is_file() and "wandb" not in p.parts} == before

    assert main(["run", "tiny", "--config", config, "--force", "harvest"]) == 0
    assert "dataset" in _stamp(tmp_path, "harvest")["want"]
    # the same text gives the same store, so the trained SAEs stay as they were
    assert _stamp(tmp_path, "harvest")["outputs"]["store"] == old["outputs"]["store"]
    assert {p: p.read_bytes() for p in train.rglob("*") if p.is_file() and "wandb" not in p.parts} == before


def test_killed_stage_resumes_on_rerun(tmp_path, tiny_pipeline):
    """A stage killed mid-run (its stamp says running) is resumed by the rerun, not wiped and restarted."""
    import subprocess
    import sys
    import time

    from saepipe.train import checkpoint

    tiny_pipeline["tiny"]["train"].update(tokens=65536, checkpoint_every=4)
    config = _write(tmp_path, tiny_pipeline)
    proc = subprocess.Popen([sys.executable, "-m", "saepipe", "run", "tiny", "--config", config],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    train = tmp_path / "runs" / "tiny" / "train"
    ckpt = train / "checkpoint"
    # a guard only: a loaded machine can take minutes to reach the first checkpoint
    deadline = time.monotonic() + 900
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert _stamp(tmp_path, "train")["status"] == "running", "the run ended before it could be killed"
    harvest_stamp = (tmp_path / "runs" / "tiny" / ".saepipe" / "harvest.json").stat().st_mtime_ns
    assert checkpoint.exists(train)  # (a kill between its two renames leaves checkpoint.old: recovered here)
    killed_at = checkpoint.read_state(train)["step"]
    (train / "left-by-the-killed-run").write_text("a wipe-and-restart would remove this")
    assert main(["run", "tiny", "--config", config]) == 0
    assert (tmp_path / "runs" / "tiny" / ".saepipe" / "harvest.json").stat().st_mtime_ns == harvest_stamp
    assert _stamp(tmp_path, "train")["status"] == "done"
    assert (train / "left-by-the-killed-run").exists()  # the train dir was resumed in place, not wiped
    state = checkpoint.read_state(train)
    assert 0 < killed_at < state["step"] == 65536 // 256 and state.get("complete")
    assert (train / "topk-w64-k4" / "sae_weights.safetensors").exists()


def test_dry_run_runs_nothing(tmp_path, tiny_pipeline, capsys):
    assert main(["run", "tiny", "--config", _write(tmp_path, tiny_pipeline), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "[harvest] would run" in out and "[analyze] would run" in out and '"width": [64]' in out
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()


def test_extends_and_null_sections(tmp_path, tiny_pipeline, capsys):
    pipelines = {**tiny_pipeline, "ladder": {"extends": "tiny", "train": {"width": [32, 64]}, "analyze": None,
                                            "splitting": {}}}  # fmt: skip
    assert main(["run", "ladder", "--config", _write(tmp_path, pipelines), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "[analyze]" not in out and "[splitting] would run" in out
    assert '"width": [32, 64]' in out and '"k": [4]' in out  # inherited fields survive a partial override


def test_ladder_with_a_second_seed_reads_its_trees_against_it(tmp_path, tiny_pipeline, capsys):
    """A ladder that trains a second seed at its smallest width: the splitting stage pairs the two seeds
    and prints every level's counts next to theirs, and a verdict on whether the trees can be read."""
    tiny_pipeline["tiny"]["train"].update(width=[32, 64], seed=[0, 1], seed_widths=[32])
    tiny_pipeline["tiny"].pop("analyze")
    tiny_pipeline["tiny"]["splitting"] = {"loss_recovered": False, "pages": False, "batch_tokens": 256}
    assert main(["run", "tiny", "--config", _write(tmp_path, tiny_pipeline)]) == 0
    out = capsys.readouterr().out
    train = tmp_path / "runs" / "tiny" / "train"
    assert sorted(p.name for p in train.iterdir() if (p / "cfg.json").exists()) == [
        "topk-w32-k4", "topk-w32-k4-s1", "topk-w64-k4"]  # fmt: skip
    report = json.loads((tmp_path / "runs" / "tiny" / "splitting" / "splits.json").read_text())
    (pair,) = report["seed_pairs"]
    assert (Path(pair["a"]).name, Path(pair["b"]).name) == ("topk-w32-k4", "topk-w32-k4-s1")
    (level,) = report["levels"]
    assert level["seed_baseline"]["pair"] == [pair["a"], pair["b"]]
    assert "seed agreement, topk-w32-k4 vs topk-w32-k4-s1" in out and "; seeds " in out
    assert report["verdict"]["message"] in out


@pytest.mark.parametrize(
    ("edit", "argv", "expected"),
    [
        (lambda p: p["tiny"]["train"].update(widht=4), [], "pipeline 'tiny': train: widht: unknown field"),
        (
            lambda p: p["tiny"]["train"].update(k="many"),
            [],
            "pipeline 'tiny': train: k.0: Input should be a valid integer",
        ),
        (lambda p: p["tiny"].update(trian={}), [], "tiny.trian: unknown field"),
        (lambda p: p["tiny"].update(extends="tiny"), [], "extends itself"),
        (lambda p: None, ["--set", "train.lr"], "write it as STAGE.FIELD=VALUE"),
        (lambda p: None, ["--only", "evaluate"], "has no evaluate stage"),
        (lambda p: p["tiny"]["harvest"].update(context_size=0), [], "pipeline 'tiny': harvest: context_size"),
    ],
)
def test_bad_pipelines_file_is_one_line(tmp_path, tiny_pipeline, capsys, edit, argv, expected):
    edit(tiny_pipeline)
    config = _write(tmp_path, tiny_pipeline)
    assert main(["run", "tiny", "--config", config, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1
    assert config in err or argv[0] == "--set"  # file problems name the file; a bad flag names the flag
    assert not (tmp_path / "runs").exists()


def test_missing_pipeline_names_the_choices(tmp_path, tiny_pipeline, capsys):
    assert main(["run", "nope", "--config", _write(tmp_path, tiny_pipeline)]) == 2
    assert "no pipeline named 'nope'; it defines: tiny" in capsys.readouterr().err


def test_shipped_pipelines_validate(capsys):
    """Every pipeline in the repo's pipelines.yaml resolves to valid stage configs."""
    names = yaml.safe_load((REPO / "pipelines.yaml").read_text())["pipelines"]
    assert {"default", "ladder", "synthetic"} <= set(names)
    for name in names:
        assert main(["run", name, "--config", str(REPO / "pipelines.yaml"), "--dry-run"]) == 0
    assert "would run" in capsys.readouterr().out


def test_pipeline_on_s3_cache(tmp_path, tiny_pipeline, s3_bucket, capsys):
    """Harvest into an S3 cache, then train and analyze straight from S3 (a real server on 127.0.0.1)."""
    from saepipe.harvest import open_store
    from saepipe.train import load_sae

    tiny_pipeline["tiny"]["harvest"]["cache"] = f"{s3_bucket}/cache"
    assert main(["run", "tiny", "--config", _write(tmp_path, tiny_pipeline)]) == 0
    out = capsys.readouterr().out
    store = _stamp(tmp_path, "harvest")["outputs"]["store"]
    assert store.startswith(f"{s3_bucket}/cache/stores/") and f"(store: {store})" in out
    assert open_store(store).n_contexts == 32
    sae = load_sae(tmp_path / "runs" / "tiny" / "train" / "topk-w64-k4")
    assert sae.cfg["saepipe"]["store"][0]["path"] == store
    report = json.loads((tmp_path / "runs" / "tiny" / "analyze" / "topk-w64-k4" / "report.json").read_text())
    assert report["n_tokens"] == 32 * 31


def test_synthetic_pipeline_writes_the_recovery_table(tmp_path, capsys):
    pipelines = {
        "syn": {
            "out": str(tmp_path / "runs" / "syn"),
            "synth": {"n_features": 48, "d_model": 16, "tokens": 8192, "context_size": 32, "freq_max": 0.3,
                      "freq_min": 0.003, "contexts_per_chunk": 8, "chunks_per_shard": 4},
            "train": {"arch": ["topk", "relu"], "width": [32, 64], "k": 2, "tokens": 16384, "batch_size": 512,
                      "buffer_tokens": 2048, "lr": 0.003, "log_every": 16, "checkpoint_every": 16},
            "recovery": {"n_bins": 4},
        }
    }  # fmt: skip
    assert main(["run", "syn", "--config", _write(tmp_path, pipelines)]) == 0
    out = capsys.readouterr().out
    table = (tmp_path / "runs" / "syn" / "recovery" / "table.md").read_text()
    assert table.strip() in out
    rows = [line for line in table.splitlines() if line.startswith("| topk") or line.startswith("| relu")]
    assert len(rows) == 4  # 2 architectures x 2 widths
    data = json.loads((tmp_path / "runs" / "syn" / "recovery" / "table.json").read_text())
    assert data and "L0" in table and "FVU" in table


def test_stages_declare_themselves_in_one_direction_without_heavy_imports():
    """Each stage package declares its own stages; imports point harvest <- train <- analyze, the bottom
    layer imports no stage, and collecting every declaration (what `saepipe run` does first) loads no torch."""
    import ast
    import subprocess
    import sys

    from saepipe.cli import commands
    from saepipe.pipeline import DECLARED, DECLARING

    assert [s.name for s in DECLARED] == ["harvest", "synth", "train", "families", "analyze", "evaluate",
                                          "recovery", "splitting"]  # fmt: skip
    assert all(commands()[s.name].config == s.config for s in DECLARED)  # the config its command parses
    forbidden = {"harvest": ("saepipe.train", "saepipe.analyze"), "train": ("saepipe.analyze",)}
    bottom = ["saepipe/config.py", "saepipe/errors.py", "saepipe/files.py", "saepipe/stages.py"]
    files = [*(f for d in forbidden for f in (REPO / d).rglob("*.py")), *(REPO / f for f in bottom)]
    for f in files:
        banned = forbidden.get(
            f.relative_to(REPO).parts[0], ("saepipe.harvest", "saepipe.train", "saepipe.analyze")
        )
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            bad = [n for n in names if n.startswith(banned)]
            assert not bad, f"{f.relative_to(REPO)} imports {bad}"
    code = "import sys, saepipe.pipeline as p; print(len(p.DECLARED), 'torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == [str(len(DECLARED)), "False"] and len(DECLARING) == 3
