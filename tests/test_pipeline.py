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


def test_run_skip_change_force_only(tmp_path, tiny_pipeline, capsys):
    config = _write(tmp_path, tiny_pipeline)
    assert main(["run", "tiny", "--config", config]) == 0
    out = capsys.readouterr().out
    assert "harvested 1,024 tokens" in out and "pipeline 'tiny' done" in out
    sae = tmp_path / "runs" / "tiny" / "train" / "topk-w64-k4"
    assert (sae / "sae_weights.safetensors").exists() and (sae / "cfg.json").exists()
    report = tmp_path / "runs" / "tiny" / "analyze" / "topk-w64-k4"
    assert (report / "report.json").exists()
    first = {s: _stamp(tmp_path, s) for s in ("harvest", "train", "analyze")}

    assert main(["run", "tiny", "--config", config]) == 0  # nothing changed: everything skipped
    out = capsys.readouterr().out
    assert out.count("up to date, skipped") == 3 and "harvested" not in out and "trained" not in out

    assert main(["run", "tiny", "--config", config, "--set", "train.lr=0.001"]) == 0  # train changed
    out = capsys.readouterr().out
    assert "[harvest] up to date, skipped" in out and "[train] settings or inputs changed" in out
    assert "trained 1 SAE" in out and "analyzed" in out  # analyze redone: its input (the SAE) changed
    assert _stamp(tmp_path, "harvest") == first["harvest"]
    assert _stamp(tmp_path, "train")["want"]["configs"][0]["lr"] == 0.001

    assert main(["run", "tiny", "--config", config, "--set", "train.lr=0.001", "--force", "analyze"]) == 0
    out = capsys.readouterr().out
    assert out.count("up to date, skipped") == 2 and "analyzed" in out

    assert (
        main(
            [
                "run",
                "tiny",
                "--config",
                config,
                "--set",
                "train.lr=0.001",
                "--only",
                "analyze",
                "--force",
                "analyze",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "analyzed" in out and "harvest" not in out and "trained" not in out


def test_killed_stage_resumes_on_rerun(tmp_path, tiny_pipeline, capsys):
    """A stage killed mid-run (its stamp says running) is resumed by the rerun, not wiped and restarted."""
    import subprocess
    import sys
    import time

    tiny_pipeline["tiny"]["train"].update(tokens=65536, checkpoint_every=4)
    config = _write(tmp_path, tiny_pipeline)
    proc = subprocess.Popen([sys.executable, "-m", "saepipe", "run", "tiny", "--config", config],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    ckpt = tmp_path / "runs" / "tiny" / "train" / "checkpoint"
    deadline = time.monotonic() + 180
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert _stamp(tmp_path, "train")["status"] == "running", "the run ended before it could be killed"
    assert main(["run", "tiny", "--config", config]) == 0
    out = capsys.readouterr().out
    assert "[harvest] up to date, skipped" in out and "resum" in out.lower()
    assert _stamp(tmp_path, "train")["status"] == "done"


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
