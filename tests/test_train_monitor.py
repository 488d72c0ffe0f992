"""Training's --eval-every splices through the same path as `saepipe evaluate` and reports what it reports;
W&B gets the learning rate, sparsity coefficients and the spliced evaluation under SAELens's names."""

from __future__ import annotations

import re

import pytest
import torch

from saepipe.analyze.config import EvaluateConfig
from saepipe.analyze.evaluate import evaluate
from saepipe.cli import main
from saepipe.harvest import open_store
from saepipe.train.config import TrainConfig
from saepipe.train.monitor import Monitor, details
from saepipe.train.sae_dir import save_sae
from saepipe.train.saes import build_sae

HOOK = "blocks.0.hook_resid_post"


def test_monitor_equals_saepipe_evaluate_on_the_saved_sae(tiny_store, tmp_path):
    """A training-time SAE on scaled inputs, evaluated by the monitor, gives saepipe evaluate's numbers for
    the SAE dir it is saved as (the scale folded in)."""
    store = open_store(str(tiny_store))
    torch.manual_seed(0)
    sae = build_sae("relu", store.d_model, 96)
    with torch.no_grad():
        sae.b_enc.normal_(std=0.05)
    scale = 2.5  # the trainer's --normalize factor: this SAE reads x * 2.5
    record = {
        "path": str(tiny_store),
        "model_fingerprint": store.settings["model"]["fingerprint"],
        "hook": HOOK,
    }
    path = save_sae(
        sae, tmp_path / "relu", HOOK, store.settings["model"]["name"], scale, saepipe={"store": [record]}
    )
    cfg = TrainConfig(
        stores=[str(tiny_store)], hook=HOOK, out=str(tmp_path / "run"), eval_every=5, eval_contexts=6
    )
    monitor = Monitor(cfg, store, torch.device("cpu"), is_main=True)
    logged = monitor.evaluate(10, {"relu": sae}, scale)
    ref = evaluate(EvaluateConfig(sae=str(path), contexts=6, device="cpu"), progress=False)
    perf, behav = "relu/model_performance_preservation", "relu/model_behavior_preservation"
    assert logged[f"{perf}/ce_loss_score"] == pytest.approx(ref.loss_recovered, abs=1e-6)
    assert logged[f"{perf}/ce_loss_with_sae"] == pytest.approx(ref.ce_spliced, abs=1e-6)
    assert logged[f"{perf}/ce_loss_without_sae"] == pytest.approx(ref.ce_clean, abs=1e-6)
    assert logged[f"{perf}/ce_loss_with_ablation"] == pytest.approx(ref.ce_zero, abs=1e-6)
    assert logged[f"{behav}/kl_div_with_sae"] == pytest.approx(ref.kl, abs=1e-6)
    assert abs(ref.ce_spliced - ref.ce_clean) > 1e-3, "vacuous: the SAE changes nothing"
    assert logged[f"{behav}/kl_div_with_ablation"] > logged[f"{behav}/kl_div_with_sae"] > 0
    assert not Monitor(cfg, store, torch.device("cpu"), is_main=False).due(5, 10)  # rank 0 only


def test_details_are_the_step_learning_rate_and_warmed_up_coefficients():
    saes = {"r": build_sae("relu", 8, 16, hparams={"l1_coefficient": 4.0}), "j": build_sae("jumprelu", 8, 16),
            "t": build_sae("topk", 8, 16, k=2)}  # fmt: skip
    assert details(1e-3, 0.25, saes) == {
        "details/current_learning_rate": 1e-3,
        "r/details/l1_coefficient": 1.0,
        "j/details/l0_coefficient": 0.25,
    }


def test_train_with_eval_every_logs_to_console_and_wandb(tiny_store, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    argv = ["train", "--store", str(tiny_store), "--hook", HOOK, "--arch", "relu", "--arch", "topk",
            "--width", "96", "--k", "8", "--tokens", str(64 * 12), "--batch-size", "64", "--device", "cpu",
            "--log-every", "4", "--eval-every", "5", "--eval-contexts", "4", "--normalize", "--wandb", "offline",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    console = capsys.readouterr().out
    steps = [
        int(s.replace(",", "")) for s in re.findall(r"eval at step ([\d,]+) on 4 held-out contexts", console)
    ]
    assert steps == [5, 10, 12]  # every 5 steps and at the end
    last = next(line for line in console.splitlines() if "eval at step 12" in line)
    logged = float(re.search(r"topk-w96-k8: loss recovered (-?[\d.]+)", last).group(1))
    ref = evaluate(EvaluateConfig(sae=str(out / "topk-w96-k8"), contexts=4, device="cpu"), progress=False)
    assert logged == pytest.approx(ref.loss_recovered, abs=1e-4)  # the saved SAE, folded scale included

    (run,) = list((out / "wandb").glob("offline-run-*"))
    data = b"".join(p.read_bytes() for p in run.rglob("*.wandb"))
    for key in ("details/current_learning_rate", "relu-w96/details/l1_coefficient",
                "topk-w96-k8/model_performance_preservation/ce_loss_score",
                "relu-w96/model_behavior_preservation/kl_div_with_sae", "topk-w96-k8/fvu"):  # fmt: skip
        assert key.encode() in data, key
    # --eval-every only changes what is logged: a rerun with another value resumes the finished run
    assert main([*argv[:-2], "--eval-every", "3", "--out", str(out)]) == 0
    assert "already complete" in capsys.readouterr().out
