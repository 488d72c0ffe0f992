"""The language-model explainer's mechanics on a tiny random-weight Llama: prompts go in batches, answers
come from the cache on a rerun, and a changed prompt input, model or setting is never served a cached answer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import write_relu_sae

from saepipe.analyze.lm_explainer import LMClient, parse_explanation
from saepipe.analyze.report import Report
from saepipe.cli import main
from saepipe.harvest import open_store

HOOK = "blocks.1.hook_resid_post"
PROMPTS = [f"Is the word number {i} a fruit? Answer 1 or 0." for i in range(5)]


def client(model_dir, cache, batch=2) -> LMClient:
    return LMClient(str(model_dir), torch.device("cpu"), batch, cache)


def test_batched_calls_and_the_cache(tiny_model_dir, tmp_path):
    c = client(tiny_model_dir, tmp_path / "cache")
    prompts = [c.chat(p) for p in PROMPTS]
    probs = c.yes_probability(prompts)
    assert c.forward_calls == 3  # 5 prompts in batches of 2
    assert all(0 < p < 1 for p in probs) and len(set(probs)) > 1
    texts = c.generate(prompts[:3])
    assert c.forward_calls == 5 and all(isinstance(t, str) for t in texts)

    # batching (left padding) gives the answers one prompt at a time would
    alone = client(tiny_model_dir, tmp_path / "alone", batch=1)
    np.testing.assert_allclose(alone.yes_probability(prompts), probs, atol=1e-4)
    assert alone.forward_calls == 5

    # a rerun (a new process: a new client on the same cache) sends nothing to the model
    again = client(tiny_model_dir, tmp_path / "cache")
    assert again.yes_probability(prompts) == probs and again.generate(prompts[:3]) == texts
    assert again.forward_calls == 0

    # one changed prompt input: only that prompt is asked again
    changed = [*prompts[:4], again.chat(PROMPTS[4].replace("fruit", "colour"))]
    out = again.yes_probability(changed)
    assert again.forward_calls == 1 and out[:4] == probs[:4]
    # another batch size is another setting: asked again, never served the other's answers
    other = client(tiny_model_dir, tmp_path / "cache", batch=3)
    other.yes_probability(prompts)
    assert other.forward_calls == 2


def test_other_weights_miss_the_cache(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)  # tied with the embedding: other weights, same config
    other_dir = tmp_path / "other"
    model.save_pretrained(other_dir)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(other_dir)
    a = client(tiny_model_dir, tmp_path / "cache")
    a.yes_probability([a.chat(PROMPTS[0])])
    b = client(other_dir, tmp_path / "cache")
    assert b.fingerprint != a.fingerprint
    b.yes_probability([b.chat(PROMPTS[0])])
    assert b.forward_calls == 1


def test_parse_explanation():
    assert parse_explanation("Thinking...\n[EXPLANATION]: names of rivers\nmore") == "names of rivers"
    assert parse_explanation("\n  the token 'er'\n") == "the token 'er'"
    assert parse_explanation("") == "(no explanation)"


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory, tiny_store):
    store = open_store(str(tiny_store))
    d = store.d_model
    rng = np.random.default_rng(3)
    W = rng.standard_normal((d, 32)) / d**0.5
    b_dec = store.stats(HOOK).mean
    pre = (store.activations(HOOK)[:, 1:].reshape(-1, d) - b_dec) @ W
    b = -np.quantile(pre, 0.97, axis=0)
    return write_relu_sae(tmp_path_factory.mktemp("lm") / "sae", tiny_store, HOOK, W, b, W.T, b_dec)


def test_analyze_with_an_lm_explainer(sae_dir, tiny_model_dir, tmp_path):
    cache = tmp_path / "cache"
    args = ["analyze", "--sae", str(sae_dir), "--out", str(tmp_path / "r"), "--device", "cpu", "--no-dashboard",
            "--explainer", str(tiny_model_dir), "--explainer-latents", "3", "--explainer-examples", "2",
            "--explainer-batch", "4", "--explainer-cache", str(cache)]  # fmt: skip
    assert main(args) == 0
    rep = Report.open(tmp_path / "r")
    explained = [i for i in range(rep.n_latents) if rep.stats(i)["lm_explanation"]]
    assert explained == sorted(rep.ranking()[:3])
    for i in explained:
        s = rep.stats(i)
        assert 0 <= s["lm_detection_auroc"] <= 1 and 0 <= s["lm_fuzzing_auroc"] <= 1
        assert s["lm_score"] == pytest.approx(s["lm_detection_auroc"] + s["lm_fuzzing_auroc"] - 1)
    assert rep.meta["lm_explainer"] is True
    (cache_file,) = cache.glob("*.jsonl")
    n_answers = len(cache_file.read_text().splitlines())
    assert n_answers > 3 * 4  # an explanation, detection and fuzzing prompts per latent

    assert main(args) == 0  # the rerun: every answer from the cache
    assert len(cache_file.read_text().splitlines()) == n_answers
    assert [Report.open(tmp_path / "r").stats(i)["lm_explanation"] for i in explained] == [
        rep.stats(i)["lm_explanation"] for i in explained
    ]
    args[args.index("--explainer-examples") + 1] = "3"  # other examples in every prompt: all new
    assert main(args) == 0
    keys = [json.loads(line)["key"] for line in cache_file.read_text().splitlines()]
    assert len(keys) > n_answers + 3 and len(set(keys)) == len(keys)
