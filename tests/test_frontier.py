"""The frontier on a store from a real model carries `saepipe evaluate`'s loss recovered, and the split
pages decode the store's tokens with the model's tokenizer.

Two hand-written relu SAEs on the tiny store: `exact` (W_enc = [I, -I], W_dec = [I; -I], so
relu(x) - relu(-x) = x: FVU 0 and loss recovered 1, known without any code of ours) and `lossy` (the positive
parts of 32 coordinates, each latent the parent of one `exact` latent).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from helpers import write_relu_sae

from saepipe.analyze.config import EvaluateConfig
from saepipe.analyze.evaluate import evaluate
from saepipe.cli import main
from saepipe.harvest import open_store

HOOK = "blocks.0.hook_resid_post"
CONTEXTS = 4


@pytest.fixture(scope="module")
def frontier_run(tmp_path_factory, tiny_store):
    root = tmp_path_factory.mktemp("frontier")
    d = open_store(str(tiny_store)).d_model
    eye = np.eye(d)
    exact = write_relu_sae(
        root / "exact",
        tiny_store,
        HOOK,
        np.hstack([eye, -eye]),
        np.zeros(2 * d),
        np.vstack([eye, -eye]),
        np.zeros(d),
    )
    lossy = write_relu_sae(  # keeps the positive half of the first 32 coordinates: each persists in `exact`
        root / "lossy", tiny_store, HOOK, eye[:, :32], np.zeros(32), eye[:32], np.zeros(d)
    )
    out = root / "report"
    argv = ["splitting", "--saes", str(lossy), "--saes", str(exact), "--store", str(tiny_store), "--out", str(out),
            "--eval-contexts", str(CONTEXTS), "--eval-batch-size", "2", "--top-contexts", "3"]  # fmt: skip
    assert main(argv) == 0
    return out, exact, lossy


def test_frontier_carries_evaluates_loss_recovered(frontier_run, tiny_store):
    out, _, lossy = frontier_run
    rows = {Path(r["sae"]).name: r for r in json.loads((out / "frontier.json").read_text())}
    assert rows["exact"]["loss_recovered"] == pytest.approx(1, abs=1e-4) and rows["exact"]["fvu"] < 1e-10
    assert rows["exact"]["kl"] == pytest.approx(0, abs=1e-5)
    ref = evaluate(
        EvaluateConfig(sae=str(lossy), store=str(tiny_store), contexts=CONTEXTS, batch_size=2, device="cpu"),
        False,
    )
    assert rows["lossy"]["loss_recovered"] == pytest.approx(ref.loss_recovered, rel=1e-6)
    assert rows["lossy"]["kl"] == pytest.approx(ref.kl, rel=1e-6)
    assert rows["lossy"]["ce_spliced"] == pytest.approx(ref.ce_spliced, rel=1e-6)
    assert ref.loss_recovered < 0.99  # non-vacuous: the lossy SAE loses something
    header = (out / "frontier.csv").read_text().splitlines()[0].split(",")
    assert "loss_recovered" in header and "kl" in header
    splits = json.loads((out / "splits.json").read_text())
    assert [s.get("loss_recovered") for s in splits["saes"]] == [
        rows["lossy"]["loss_recovered"],
        rows["exact"]["loss_recovered"],
    ]
    png = (out / "frontier.png").read_bytes()
    width, height = struct.unpack(">II", png[16:24])
    assert png[:4] == b"\x89PNG" and width == 2 * 6 * 120 and height == 4.5 * 120  # two panels side by side


def test_frontier_without_loss_recovered_has_one_panel(tmp_path):
    from saepipe.analyze.frontier import FrontierPoint, plot_frontier

    pts = [FrontierPoint("a", "relu", 8, 2.0, 0.5, 10), FrontierPoint("b", "relu", 16, 3.0, 0.3, 10)]
    assert plot_frontier(pts, tmp_path / "f.png") == ["fvu"]
    pts.append(FrontierPoint("c", "topk", 16, 3.0, 0.3, 10, {"loss_recovered": 0.9}))
    assert plot_frontier(pts, tmp_path / "g.png") == ["fvu", "loss_recovered"]


def test_split_pages_decode_tokens_with_the_model_tokenizer(frontier_run, tiny_store, tiny_model_dir):
    from transformers import AutoTokenizer

    out, _, _ = frontier_run
    text = (out / "data" / "vocab.js").read_text()
    vocab = json.loads(text[len("SAEPIPE.setVocab(") : -3])
    data = json.loads((out / "data" / "splits.js").read_text()[len("SAEPIPE.setSplits(") : -3])
    ids = {t for c in data["contexts"].values() for w in c["windows"] for t in w}
    assert ids and set(map(int, vocab)) == ids
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert all(vocab[str(i)] == tok.decode([i]) for i in ids)
    tokens = open_store(str(tiny_store)).tokens()
    c = next(c for c in data["contexts"].values() if c["values"])
    ctx, pos = c["contexts"][0], c["positions"][0]
    assert c["windows"][0][c["peaks"][0]] == tokens[ctx, pos] and pos >= 1  # BOS is never a top context
