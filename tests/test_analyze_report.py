"""`saepipe analyze` end to end on a real store: the report's tables, contexts and logit effects equal a
direct computation, and the dashboard shows the stored values in a real headless browser."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import chromium_driver, chromium_missing, open_page, write_relu_sae

from saepipe.analyze.report import MARK_CLOSE, MARK_OPEN, Report
from saepipe.cli import main
from saepipe.harvest import open_store

HOOK = "blocks.0.hook_resid_post"
D_SAE = 200  # two dashboard shards
TOP_K = 6


@pytest.fixture(scope="module")
def sae_weights(tiny_store):
    store = open_store(str(tiny_store))
    d = store.d_model
    rng = np.random.default_rng(1)
    W_enc = rng.standard_normal((d, D_SAE)) / d**0.5
    b_dec = store.stats(HOOK).mean
    pre = (store.activations(HOOK)[:, 1:].reshape(-1, d) - b_dec) @ W_enc
    # Thresholds in the widest gap near spread quantiles (densities ~0.2% to ~8%), so float32 rounding
    # cannot flip a token across one (layer-0 activations repeat for repeated tokens).
    srt = np.sort(pre, axis=0)
    b_enc = np.empty(D_SAE)
    for j, q in enumerate(np.linspace(0.92, 0.998, D_SAE)):
        i = int(q * len(srt))
        lo = max(i - 10, 0)
        g = lo + int(np.argmax(np.diff(srt[lo : i + 10, j])))
        b_enc[j] = -(srt[g, j] + srt[g + 1, j]) / 2
    b_enc[:4] = -pre.max(0)[:4] - 1  # dead
    b_enc[4] = -pre.min() + 1  # active on every token: ultra-dense
    W_dec = rng.standard_normal((D_SAE, d))
    return W_enc, b_enc, W_dec, b_dec


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory, tiny_store, sae_weights) -> Path:
    root = tmp_path_factory.mktemp("analyze")
    sae = write_relu_sae(root / "sae", tiny_store, HOOK, *sae_weights, record_as_list=False)
    out = root / "report"
    rc = main(
        [
            "analyze",
            "--sae",
            str(sae),
            "--out",
            str(out),
            "--top-k",
            str(TOP_K),
            "--device",
            "cpu",
            "--batch-tokens",
            "200",
        ]
    )
    assert rc == 0
    return out


def brute_force_codes(tiny_store, sae_weights) -> np.ndarray:
    W_enc, b_enc, _, b_dec = sae_weights
    x = open_store(str(tiny_store)).activations(HOOK)[:, 1:].astype(np.float64)
    return np.maximum((x - b_dec) @ W_enc + b_enc, 0)  # [C, P, L], the contract's relu encoding


def test_report_tables_and_contexts(report_dir, tiny_store, tiny_model_dir, sae_weights):
    from transformers import AutoTokenizer

    rep = Report.open(report_dir)
    Z = brute_force_codes(tiny_store, sae_weights)
    flat = Z.reshape(-1, D_SAE)
    assert rep.meta["n_tokens"] == flat.shape[0] and rep.n_latents == D_SAE
    np.testing.assert_array_equal(rep.column("n_active"), (flat > 0).sum(0))
    np.testing.assert_allclose(rep.column("density"), (flat > 0).mean(0))
    np.testing.assert_allclose(rep.column("mean"), flat.mean(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(rep.column("max"), flat.max(0), rtol=1e-4, atol=1e-6)
    assert rep.dead == [0, 1, 2, 3] and rep.dense == [4]
    assert sorted(rep.ranking("interpretability")) == list(range(5, D_SAE))
    assert (np.diff(rep.column("score_interpretability")[rep.ranking("interpretability")]) <= 0).all()
    # the default key ranks the latents it can score: those with 4 held-out (odd-context) active windows
    ranking = rep.ranking()
    heldout = rep.column("heldout_active") >= 4
    assert sorted(ranking) == [i for i in range(5, D_SAE) if heldout[i]]
    assert (np.diff(rep.column("score_explanation")[ranking]) <= 0).all()
    info = rep.meta["ranking"]
    assert info["ranked"] == len(ranking) and info["unscored"] == D_SAE - 5 - len(ranking)
    assert len(ranking) > D_SAE // 2
    assert rep.ranking("frequency")[0] == int(
        np.argmax(np.where(np.arange(D_SAE) > 4, (flat > 0).mean(0), -1))
    )

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokens = open_store(str(tiny_store)).tokens()
    P = Z.shape[1]
    # the best-ranked latent whose top activations are distinct (layer-0 activations repeat with tokens)
    distinct = lambda i: len(np.unique(np.sort(flat[:, i])[-TOP_K - 1 :])) == TOP_K + 1  # noqa: E731
    latent = next(i for i in ranking if distinct(i))
    contexts = rep.top_contexts(latent)
    assert len(contexts) == TOP_K
    order = np.argsort(-flat[:, latent])[:TOP_K]
    for ctx, row in zip(contexts, order):
        c, p = divmod(int(row), P)
        assert (ctx.context, ctx.position) == (c, p + 1)
        assert ctx.value == pytest.approx(flat[row, latent], rel=1e-4)
        lo = max(0, ctx.position - 15)
        assert ctx.token_ids == tokens[c, lo : ctx.position + 5].tolist()
        assert ctx.tokens == [tok.decode([t]) for t in ctx.token_ids]
        marked = tok.decode([int(tokens[c, ctx.position])])
        assert f"{MARK_OPEN}{marked}{MARK_CLOSE}" in ctx.text
        assert ctx.text.replace(MARK_OPEN, "").replace(MARK_CLOSE, "") == "".join(ctx.tokens)
        assert ctx.acts[ctx.peak] == ctx.value
    weak = rep.sample_contexts(latent)
    assert weak and all(0 < w.value <= flat[:, latent].max() for w in weak)
    assert [w.value for w in weak] == sorted(w.value for w in weak)


def test_logit_effects_equal_direct_computation(report_dir, tiny_model_dir, sae_weights):
    """Through HF's own modules: effect = (W_dec * final RMSNorm weight) @ lm_head.weight.T."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    W_dec = torch.tensor(sae_weights[2], dtype=torch.float32)
    with torch.no_grad():
        effect = (W_dec * hf.model.norm.weight) @ hf.lm_head.weight.T  # [L, vocab]
    rep = Report.open(report_dir)
    n = rep.arrays["logit_top_ids"].shape[1]
    top = effect.topk(n, dim=1)
    bottom = (-effect).topk(n, dim=1)
    np.testing.assert_array_equal(rep.arrays["logit_top_ids"], top.indices.numpy())
    np.testing.assert_allclose(rep.arrays["logit_top_values"], top.values.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(rep.arrays["logit_bottom_ids"], bottom.indices.numpy())
    np.testing.assert_allclose(
        rep.arrays["logit_bottom_values"], -bottom.values.numpy(), rtol=1e-4, atol=1e-5
    )
    promoted = rep.logit_effects(7)["promoted"]
    assert promoted[0][0] == rep.vocab[int(top.indices[7, 0])]


def test_analyze_refuses_a_wrong_hook(tmp_path, tiny_store, sae_weights, capsys):
    sae = write_relu_sae(
        tmp_path / "sae", tiny_store, "blocks.7.hook_resid_post", *sae_weights, record_as_list=False
    )
    assert main(["analyze", "--sae", str(sae), "--out", str(tmp_path / "r"), "--device", "cpu"]) == 2
    assert "has no hook 'blocks.7.hook_resid_post'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    reason = chromium_missing()
    if reason:
        pytest.skip(reason)
    driver = chromium_driver(tmp_path_factory.mktemp("chromium-profile"))
    yield driver
    driver.quit()


def test_dashboard_in_a_real_browser(browser, report_dir):
    from selenium.webdriver.common.by import By

    rep = Report.open(report_dir)
    wait = open_page(browser, report_dir / "index.html")
    rows = browser.find_elements(By.CSS_SELECTOR, "#rows tr")
    ranking = rep.ranking()
    assert [int(r.get_attribute("data-latent")) for r in rows] == ranking[:100]

    latent = next(i for i in ranking if i >= 128)  # lives in the second shard
    search = browser.find_element(By.ID, "search")
    search.send_keys(str(latent))
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#rows tr")) == 1)
    row = browser.find_element(By.CSS_SELECTOR, "#rows tr")
    assert int(row.get_attribute("data-latent")) == latent
    # searching a token finds the best-ranked latent that peaks on it
    first = ranking[0]
    peak = rep.vocab[int(rep.column("peak_token")[first])]
    search.clear()
    search.send_keys(peak.strip() or peak)
    wait.until(
        lambda d: (
            first
            in [int(r.get_attribute("data-latent")) for r in d.find_elements(By.CSS_SELECTOR, "#rows tr")]
        )
    )

    browser.get((report_dir / "index.html").as_uri() + f"#latent/{latent}")
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#top .ctx")) > 0)
    assert browser.find_element(By.ID, "latent-title").text == f"Latent {latent}"
    shown = browser.find_elements(By.CSS_SELECTOR, "#top .ctx")
    stored = rep.top_contexts(latent)
    assert len(shown) == len(stored)
    for div, ctx in zip(shown, stored):
        spans = div.find_elements(By.CSS_SELECTOR, ".tok")
        assert len(spans) == len(ctx.tokens)
        for span, act in zip(spans, ctx.acts):
            value = span.get_attribute("data-act")
            assert (value is None) if np.isnan(act) else float(value) == act  # exactly the stored float32
        assert "peak" in spans[ctx.peak].get_attribute("class")
        assert int(div.get_attribute("data-context")) == ctx.context
    assert browser.find_elements(By.CSS_SELECTOR, "#histogram rect.bar")
    promoted = browser.find_elements(By.CSS_SELECTOR, "#logits td.tokcell")
    best = rep.logit_effects(latent)["promoted"][0][0]
    assert promoted[0].get_attribute("textContent") == best.replace("\n", "↵")
    logs = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not logs, logs


def test_wandb_offline_logs_tables_and_cards(report_dir, tmp_path, monkeypatch):
    from saepipe.analyze.wandb_log import log_report

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = log_report(report_dir, "saepipe-test", n_cards=2)
    files = [p.name for p in Path(run_dir).rglob("*")]
    assert any(n.startswith("latents") and n.endswith(".table.json") for n in files), files
    assert sum(n.endswith(".html") for n in files) == 2, files


def test_chromium_is_debians(browser):
    """The browser under test is the system one, not a downloaded copy."""
    out = subprocess.run([shutil.which("chromium"), "--version"], capture_output=True, text=True).stdout
    assert "Chromium" in out


def test_analyze_reads_a_topk_sae_written_by_the_train_stage(tmp_path, tiny_store):
    """Through saepipe.train's own writer: per-token counts equal the contract's top-k encoding."""
    from saepipe.train.sae_dir import save_sae
    from saepipe.train.saes import build_sae

    store = open_store(str(tiny_store))
    torch.manual_seed(0)
    sae = build_sae("topk", store.d_model, 48, k=3)
    extra = {
        "saepipe": {
            "store": {"path": str(tiny_store), "model_fingerprint": store.settings["model"]["fingerprint"]}
        }
    }
    save_sae(sae, tmp_path / "sae", HOOK, store.settings["model"]["name"], **extra)
    out = tmp_path / "report"
    args = ["analyze", "--sae", str(tmp_path / "sae"), "--out", str(out), "--device", "cpu", "--no-dashboard"]
    assert main(args) == 0
    assert not (out / "index.html").exists()
    x = torch.from_numpy(store.activations(HOOK)[:, 1:].reshape(-1, store.d_model))
    with torch.no_grad():
        pre = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
        kth = pre.topk(3, dim=1).values[:, -1:]
    n_active = ((pre >= kth) & (pre > 0)).sum(0).numpy()
    np.testing.assert_array_equal(Report.open(out).column("n_active"), n_active)


def test_dashboard_shows_explanations_scores_and_sorts_by_any_score(browser, report_dir):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from saepipe.analyze.dashboard import _predicted

    rep = Report.open(report_dir)
    wait = open_page(browser, report_dir / "index.html")
    info = rep.meta["ranking"]
    assert browser.find_element(By.ID, "ties").text.endswith(
        f"{info['ranked']} latents, {info['tied']} tied, {info['unscored']} unscored"
    )
    rows = browser.find_elements(By.CSS_SELECTOR, "#rows tr")
    first = int(rows[0].get_attribute("data-latent"))
    assert (
        rows[0].find_element(By.CSS_SELECTOR, "td.expl").get_attribute("title")
        == rep.stats(first)["explanation"]
    )

    # any score column sorts the list, by a header click or from the select
    def shown_order():
        return [
            int(r.get_attribute("data-latent")) for r in browser.find_elements(By.CSS_SELECTOR, "#rows tr")
        ]

    for column, how in (
        ("detection_auroc", "click"),
        ("simulation", "select"),
        ("heldout_inactive", "select"),
    ):
        if how == "click":
            browser.find_element(By.CSS_SELECTOR, f"th[data-sort='{column}']").click()
        else:
            Select(browser.find_element(By.ID, "rankby")).select_by_value("col:" + column)
        values = rep.column(column)
        ids = [i for i in range(rep.n_latents) if np.isfinite(values[i])]
        want = sorted(ids, key=lambda i: (-values[i], i))[:100]
        wait.until(lambda d, want=want: shown_order() == want)
        assert len(set(values[want].round(12))) > 3, f"{column}: sorting is vacuous"

    latent = next(i for i in rep.ranking() if rep.heldout_contexts(i) and len(rep.explanation(i)["patterns"]))
    browser.get((report_dir / "index.html").as_uri() + f"#latent/{latent}")
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#heldout .ctx")) > 0)
    e = rep.explanation(latent)
    assert browser.find_element(By.ID, "explanation-text").text == e["explanation"]
    for k in ("detection_auroc", "fuzzing_auroc", "simulation", "heldout_active"):
        cell = browser.find_element(By.CSS_SELECTOR, f"#scores tr[data-score='{k}'] td").text
        assert float(cell) == pytest.approx(float(e[k]), rel=1e-3), k
    assert len(browser.find_elements(By.CSS_SELECTOR, "#patterns tr")) == len(e["patterns"]) + 1

    held = rep.heldout_contexts(latent)
    shown = browser.find_elements(By.CSS_SELECTOR, "#heldout .ctx")
    assert len(shown) == len(held)
    tokens = rep.arrays["heldout_window_tokens"][latent, : len(held)]
    predicted = _predicted(rep, latent, tokens)
    coloured = 0
    for j, (div, ctx, pred) in enumerate(zip(shown, held, predicted)):
        spans = div.find_elements(By.CSS_SELECTOR, ".tok")
        assert len(spans) == len(ctx.tokens)
        slots = np.flatnonzero(pred != 0) - np.flatnonzero(tokens[j] >= 0)[0]  # spans skip outside slots
        marked = [j for j, s in enumerate(spans) if s.get_attribute("data-pred")]
        assert marked == sorted(slots.tolist())
        for span, act in zip(spans, ctx.acts):
            style = span.get_attribute("style") or ""
            # every token with activity is coloured, not only the peak
            assert ("background" in style) == (not np.isnan(act) and act > 0)
            coloured += "background" in style
    assert coloured > len(held), "no window had more than its peak token coloured"
