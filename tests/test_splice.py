"""saepipe.splice changes a real model exactly as its contract says: with the error term kept and nothing
edited it is the clean model; a silent latent's ablation changes nothing; a clamp moves the residual by
the latent's decoder row times the change; steering moves the logits as the latent's logit effects
predict; BOS positions keep their activations; generation is spliced at every step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import saepipe.splice as splice_api
from saepipe.analyze.logits import logit_effects, unembedding_of
from saepipe.errors import SaepipeError
from saepipe.harvest import open_store
from saepipe.harvest.hooks import recording, resolve_hooks
from saepipe.harvest.models import load_model
from saepipe.train import load_sae, save_sae
from saepipe.train.saes import build_sae
from saepipe.train.splice import Splice, _bos_mask, generate, run, spliced, zero_ablated

H0, H1 = "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"
NEXT = "blocks.1.hook_resid_pre"  # the residual block 1 reads: H0's output after the splice


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_model(str(tiny_model_dir), "cpu")


@pytest.fixture(scope="module")
def tokens(tiny_store) -> torch.Tensor:
    """[4, 32] real contexts, BOS at position 0."""
    return torch.from_numpy(open_store(str(tiny_store)).tokens()[:4]).long()


def make_sae(tmp_path, arch: str, hook: str, seed: int = 0):
    """A random SAE written as an SAE dir and loaded back (the way users get one)."""
    torch.manual_seed(seed)
    sae = build_sae(arch, 64, 256, k=8)
    with torch.no_grad():
        sae.b_enc.normal_(std=0.05)
        if sae.has_threshold:
            sae.threshold.fill_(0.02)
    path = save_sae(sae, tmp_path / f"{arch}-{hook}-{seed}", hook_name=hook, model_name="tiny")
    return load_sae(path), path


def residual(model, tokens, point: str, *splices: Splice) -> torch.Tensor:
    """[batch, pos, d] activation at `point` with `splices` in place."""
    bridge = model.bridge
    with (
        torch.inference_mode(),
        spliced(bridge, *splices),
        recording(bridge, resolve_hooks(bridge, [point])) as acts,
    ):
        bridge(tokens, return_type="logits")
    return acts[point].clone()


@pytest.mark.parametrize("arch", ["relu", "topk", "jumprelu"])
def test_error_term_kept_and_nothing_edited_is_the_clean_model(arch, model, tokens, tmp_path):
    sae, _ = make_sae(tmp_path, arch, H0)
    other, _ = make_sae(tmp_path, "topk", H1, seed=1)
    seen = []
    clean = run(model.bridge, tokens)
    kept = run(model.bridge, tokens, [Splice(sae, keep_error=True, observe=seen.append)])
    both = run(model.bridge, tokens, [Splice(sae, keep_error=True), Splice(other, keep_error=True)])
    torch.testing.assert_close(kept, clean, rtol=0, atol=1e-6)
    torch.testing.assert_close(both, clean, rtol=0, atol=1e-6)
    assert seen and seen[0].z.shape == (4 * 31, 256), "the SAE did not see the non-BOS positions"
    replaced = run(model.bridge, tokens, [Splice(sae)])
    assert (replaced - clean).abs().max() > 1e-2, "vacuous: the reconstruction changes nothing"


def test_generation_is_spliced_at_every_step(model, tmp_path):
    sae, _ = make_sae(tmp_path, "topk", H0)
    bridge, prompt = model.bridge, "The king is"
    clean = generate(bridge, prompt, [], tokens=8, seed=3)
    assert generate(bridge, prompt, [], tokens=8, seed=3) == clean  # seeded: reproducible
    assert generate(bridge, prompt, [Splice(sae, keep_error=True)], tokens=8, seed=3) == clean
    greedy = generate(bridge, [prompt, "To be or not to be, that"], [], tokens=6, temperature=0)
    assert greedy == generate(
        bridge, [prompt, "To be or not to be, that"], [Splice(sae, keep_error=True)], tokens=6, temperature=0
    )
    # A strong steer changes the continuation; only the steps after the prompt can show that here.
    steered = generate(bridge, prompt, [Splice(sae, keep_error=True, steer={5: 50.0})], tokens=8, seed=3)
    assert steered != clean


@pytest.mark.parametrize("keep_error", [True, False])
def test_ablating_a_silent_latent_changes_nothing(keep_error, model, tokens, tmp_path):
    sae, _ = make_sae(tmp_path, "topk", H0)
    x = residual(model, tokens, H0)[:, 1:]  # the positions the splice changes
    with torch.no_grad():
        fired = (sae.encode(x) > 0).flatten(0, 1).any(0)
    silent, active = int((~fired).nonzero()[0]), int(fired.nonzero()[0])
    base = run(model.bridge, tokens, [Splice(sae, keep_error=keep_error)])
    same = run(model.bridge, tokens, [Splice(sae, keep_error=keep_error, ablate=[silent])])
    torch.testing.assert_close(same, base, rtol=0, atol=0)
    changed = run(model.bridge, tokens, [Splice(sae, keep_error=keep_error, ablate=[active])])
    assert (changed - base).abs().max() > 1e-4, "vacuous: ablating an active latent changed nothing too"


@pytest.mark.parametrize("keep_error", [True, False])
def test_clamp_moves_the_residual_by_the_decoder_row_times_the_change(keep_error, model, tokens, tmp_path):
    sae, path = make_sae(tmp_path, "relu", H0)
    latent, value = 17, 3.0
    # Independent reference: the code from the SAE dir's files, in numpy.
    t = load_file(str(path / "sae_weights.safetensors"))
    x = residual(model, tokens, H0).numpy()
    z = np.maximum((x - t["b_dec"]) @ t["W_enc"] + t["b_enc"], 0)[..., latent]  # [batch, pos]
    expected = (value - z)[..., None] * t["W_dec"][latent]  # [batch, pos, d]
    expected[:, 0] = 0  # the BOS position keeps its activation
    assert np.abs(value - z[:, 1:]).min() > 0.1, "vacuous: the clamp value equals the latent's own"

    base = residual(model, tokens, NEXT, Splice(sae, keep_error=keep_error))
    clamped = residual(model, tokens, NEXT, Splice(sae, keep_error=keep_error, clamp={latent: value}))
    np.testing.assert_allclose((clamped - base).numpy(), expected, rtol=0, atol=2e-5)


def test_steering_moves_the_logits_as_the_latent_logit_effects_predict(model, tokens, tmp_path):
    """At the last block's output only the final norm and unembedding follow, so a steered latent must
    raise the tokens its logit effects promote above those they suppress, at every position."""
    sae, _ = make_sae(tmp_path, "topk", H1)
    unembed = unembedding_of(model.bridge)
    clean = run(model.bridge, tokens)
    for latent in (0, 5, 17, 101):
        effects = logit_effects(sae.W_dec[latent : latent + 1].detach(), unembed, 10)
        top, bottom = effects.top_ids[0], effects.bottom_ids[0]
        delta = (run(model.bridge, tokens, [Splice(sae, keep_error=True, steer={latent: 2.0})]) - clean)[
            :, 1:
        ]
        lowest_top = delta[..., top].min(-1).values  # [batch, pos]
        highest_bottom = delta[..., bottom].max(-1).values
        assert bool((lowest_top > highest_bottom).all()), f"latent {latent}"
        assert float(delta[..., top].mean()) > 0 > float(delta[..., bottom].mean())
        assert float(delta.abs().max()) > 0.05, "vacuous: steering moved nothing"


def test_bos_keeps_its_activation_in_left_padded_batches(model, tmp_path):
    sae, _ = make_sae(tmp_path, "topk", H0)
    tok = model.tokenizer
    bos, pad = tok.bos_token_id, tok.pad_token_id
    body = tok("The king is dead", add_special_tokens=False)["input_ids"]
    tokens = torch.tensor([[bos, *body, *body[:2]], [pad, pad, bos, *body]])
    at_bos = _bos_mask(tokens, bos, pad)
    assert at_bos.tolist()[0][0] and at_bos.tolist()[1][2] and int(at_bos.sum()) == 2
    clean = residual(model, tokens, NEXT)
    replaced = residual(model, tokens, NEXT, Splice(sae))
    torch.testing.assert_close(replaced[at_bos], clean[at_bos], rtol=0, atol=0)
    assert ((replaced - clean).abs().amax(-1)[~at_bos] > 1e-3).all()
    with (
        torch.inference_mode(),
        zero_ablated(model.bridge, H0),
        recording(model.bridge, resolve_hooks(model.bridge, [NEXT])) as acts,
    ):
        model.bridge(tokens)
    assert (acts[NEXT][~at_bos] == 0).all() and (acts[NEXT][at_bos] == clean[at_bos]).all()
    everything = residual_all(model, tokens, Splice(sae))
    assert (everything[at_bos] - clean[at_bos]).abs().max() > 1e-3  # skip_bos=False splices BOS too


def residual_all(model, tokens, splice: Splice) -> torch.Tensor:
    bridge = model.bridge
    with (
        torch.inference_mode(),
        spliced(bridge, splice, skip_bos=False),
        recording(bridge, resolve_hooks(bridge, [NEXT])) as acts,
    ):
        bridge(tokens)
    return acts[NEXT].clone()


def test_hooks_are_removed_even_after_an_error(model, tokens, tmp_path):
    sae, _ = make_sae(tmp_path, "topk", H0)
    clean = run(model.bridge, tokens)
    with pytest.raises(RuntimeError, match="boom"), spliced(model.bridge, Splice(sae)):
        raise RuntimeError("boom")
    torch.testing.assert_close(run(model.bridge, tokens), clean, rtol=0, atol=0)


def test_bad_latents_and_hooks_are_one_line_errors(model, tmp_path):
    sae, _ = make_sae(tmp_path, "topk", H0)
    with pytest.raises(
        SaepipeError, match=r"latent 256 is out of range: the SAE has 256 latents \(0\.\.255\)"
    ):
        Splice(sae, clamp={256: 1.0})
    narrow = build_sae("topk", 16, 32, k=2)
    with pytest.raises(SaepipeError, match="width 64 but the SAE reads d_in=16"):
        run(model.bridge, torch.tensor([[1, 2, 3]]), [Splice(narrow, hook=H0)])
    with (
        pytest.raises(SaepipeError, match="unknown hook"),
        spliced(model.bridge, Splice(sae, hook="blocks.0.hook_resid_pots")),
    ):
        pass


def test_gradients_flow_through_the_splice(model, tokens, tmp_path):
    """Attribution needs d(loss)/d(earlier weights) through a spliced SAE: nothing in the path is no_grad."""
    sae, _ = make_sae(tmp_path, "topk", H0)
    bridge = model.bridge
    weights = [p for n, p in bridge.named_parameters() if "layers.0." in n]  # reach the loss only via H0
    assert weights
    with spliced(bridge, Splice(sae, keep_error=False, clamp={3: 1.0}), skip_bos=False):  # BOS would leak
        loss = bridge(tokens[:1], return_type="loss")
    grads = torch.autograd.grad(loss, weights, allow_unused=True)
    assert any(g is not None and float(g.abs().sum()) > 0 for g in grads)


def test_saepipe_splice_is_the_train_module():
    assert splice_api.Splice is Splice and splice_api.spliced is spliced and splice_api.generate is generate


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_splice_on_cuda(tiny_model_dir, tiny_store, tmp_path):
    gpu = load_model(str(tiny_model_dir), "cuda")
    tokens = torch.from_numpy(open_store(str(tiny_store)).tokens()[:4]).long().cuda()
    sae, _ = make_sae(tmp_path, "topk", H0)
    clean = run(gpu.bridge, tokens)
    torch.testing.assert_close(
        run(gpu.bridge, tokens, [Splice(sae, keep_error=True)]), clean, rtol=0, atol=1e-5
    )
    assert sae.W_dec.device.type == "cuda"
    cpu_logits = run(
        load_model(str(tiny_model_dir), "cpu").bridge, tokens.cpu(), [Splice(sae.cpu(), clamp={3: 2.0})]
    )
    gpu_logits = run(gpu.bridge, tokens, [Splice(sae, clamp={3: 2.0})])
    torch.testing.assert_close(gpu_logits.cpu(), cpu_logits, rtol=1e-3, atol=1e-3)
    assert generate(
        gpu.bridge, "The king is", [Splice(sae, keep_error=True)], tokens=5, temperature=0
    ) == generate(gpu.bridge, "The king is", [], tokens=5, temperature=0)
