"""`saepipe steer` prints the continuation with and without the intervention, reproducibly, and refuses bad
input with one line and exit code 2."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import one_line

from saepipe.analyze.config import SteerConfig
from saepipe.analyze.steer import steer
from saepipe.cli import main
from saepipe.harvest import open_store
from saepipe.harvest.models import load_model
from saepipe.train import load_sae, save_sae
from saepipe.train.saes import build_sae
from saepipe.train.splice import Splice, generate

HOOK = "blocks.0.hook_resid_post"


def write_sae(path, store_path, d_in: int = 64, fingerprint: str | None = None):
    """A random SAE dir recorded as trained on the tiny store (or on a model with another fingerprint)."""
    store = open_store(str(store_path))
    torch.manual_seed(0)
    sae = build_sae("topk", d_in, 128, k=8)
    record = {"path": str(store_path), "hook": HOOK,
              "model_fingerprint": fingerprint or store.settings["model"]["fingerprint"]}  # fmt: skip
    return save_sae(
        sae, path, hook_name=HOOK, model_name=store.settings["model"]["name"], saepipe={"store": [record]}
    )


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory, tiny_store):
    return write_sae(tmp_path_factory.mktemp("steer") / "sae", tiny_store)


def test_steer_prints_both_continuations_reproducibly(sae_dir, tmp_path, capsys):
    argv = ["steer", "--sae", str(sae_dir), "--latent", "3=2", "--latent", "7", "--scale", "40",
            "--prompt", "The king is", "--tokens", "6", "--device", "cpu", "--seed", "1"]  # fmt: skip
    out = tmp_path / "steer.json"
    assert main([*argv, "--out", str(out)]) == 0
    first = capsys.readouterr().out
    assert main(argv) == 0
    assert capsys.readouterr().out == first  # same seed, same text
    saved = json.loads(out.read_text())
    assert saved["latents"] == {"3": 80.0, "7": 40.0} and saved["mode"] == "steer"
    assert f"--- without ---\nThe king is{saved['without']}\n" in first
    assert f"--- with steer ---\nThe king is{saved['with_intervention']}" in first
    assert saved["without"] != saved["with_intervention"], "vacuous: a strong steer changed nothing"


def test_steer_equals_the_api_with_the_same_seed(sae_dir, tiny_model_dir):
    cfg = SteerConfig(sae=str(sae_dir), latent=["5=3"], mode="clamp", prompt="To be", tokens=5, device="cpu")
    result = steer(cfg)
    bridge = load_model(str(tiny_model_dir), "cpu").bridge
    sae = load_sae(sae_dir)
    assert [result.without] == generate(bridge, "To be", [], tokens=5, seed=0)
    assert [result.with_intervention] == generate(
        bridge, "To be", [Splice(sae, keep_error=True, clamp={5: 3.0})], tokens=5, seed=0
    )


def test_steer_bad_input_is_one_line(sae_dir, tiny_store, tmp_path, capsys):
    base = ["steer", "--sae", str(sae_dir), "--prompt", "The king", "--device", "cpu"]
    assert "latent 128 is out of range" in one_line([*base, "--latent", "128"], capsys)
    assert "'x=1' is not ID or ID=VALUE" in one_line([*base, "--latent", "x=1"], capsys)
    assert "given twice" in one_line([*base, "--latent", "3", "3=2"], capsys)
    other = write_sae(tmp_path / "other", tiny_store, fingerprint="0" * 64)
    err = one_line(
        ["steer", "--sae", str(other), "--latent", "1", "--prompt", "x", "--device", "cpu"], capsys
    )
    assert "SAE of another model" in err and "fingerprints differ" in err
    narrow = write_sae(tmp_path / "narrow", tiny_store, d_in=16)
    err = one_line(
        ["steer", "--sae", str(narrow), "--latent", "1", "--prompt", "x", "--device", "cpu"], capsys
    )
    assert "SAE of another model" in err and "d_in=16" in err
    long_prompt = "the king is dead " * 100  # ~400 tokens; the tiny model's context is 256
    err = one_line([*base[:3], "--prompt", long_prompt, "--latent", "1", "--device", "cpu"], capsys)
    assert "exceeds the model's context of 256 tokens" in err
    err = one_line([*base, "--latent", "1", "--tokens", "300"], capsys)
    assert "exceeds the model's context" in err
    assert "no such directory" in one_line(["steer", "--sae", str(tmp_path / "none"), "--latent", "1",
                                            "--prompt", "x"], capsys)  # fmt: skip
