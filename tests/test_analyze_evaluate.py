"""Spliced evaluation: an identity SAE leaves the loss unchanged, zero ablation equals a direct forward with
the hook output zeroed, and the held-out text is exactly the packing that continues after the store."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.numpy import save_file

from saepipe.analyze.config import EvaluateConfig
from saepipe.analyze.evaluate import evaluate, heldout_contexts
from saepipe.cli import main
from saepipe.harvest import open_store
from saepipe.harvest.corpus import iter_texts, pack_contexts

HOOK = "blocks.0.hook_resid_post"
N_CONTEXTS = 6
SHIFT = 50.0


def write_identity_sae(path, store_path) -> None:
    """relu SAE with W_enc = W_dec = I, b_enc = 0, b_dec = -SHIFT: pre = x + SHIFT is positive for every
    activation of this model (|x| is far below SHIFT), so relu is the identity and decode gives
    (x + SHIFT) - SHIFT = x up to float32 rounding. Written by hand to the SAE dir contract."""
    store = open_store(str(store_path))
    d = store.d_model
    eye = np.eye(d, dtype=np.float32)
    tensors = {"W_enc": eye, "b_enc": np.zeros(d), "W_dec": eye, "b_dec": np.full(d, -SHIFT)}
    path.mkdir()
    save_file(
        {k: np.asarray(v, dtype=np.float32) for k, v in tensors.items()},
        str(path / "sae_weights.safetensors"),
    )
    cfg = {
        "architecture": "relu", "d_in": d, "d_sae": d, "hook_name": HOOK,
        "model_name": store.settings["model"]["name"], "dtype": "float32",
        "apply_b_dec_to_input": True, "normalize_activations": "none",
        "saepipe": {"format_version": 1, "store": {"path": str(store_path),
                    "model_fingerprint": store.settings["model"]["fingerprint"], "hook": HOOK}},
    }  # fmt: skip
    (path / "cfg.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def identity_sae(tmp_path_factory, tiny_store):
    path = tmp_path_factory.mktemp("eval") / "identity"
    write_identity_sae(path, tiny_store)
    return path


def test_heldout_contexts_continue_after_the_store(tiny_store, tiny_model_dir):
    from transformers import AutoTokenizer

    store = open_store(str(tiny_store))
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    held = heldout_contexts(store, tok, 3)
    ds = store.settings["dataset"]
    packed = pack_contexts(
        iter_texts(ds["name"], ds["config"], ds["split"], ds["text_column"]), tok, 32, True
    )
    first = np.stack(list(itertools.islice(packed, store.n_contexts + 3)))
    np.testing.assert_array_equal(first[: store.n_contexts], store.tokens())  # same packing as the harvest
    np.testing.assert_array_equal(first[store.n_contexts :], held)  # and the held-out text follows it
    stored = {r.tobytes() for r in store.tokens()}
    assert not any(r.tobytes() in stored for r in held)


def test_identity_sae_and_zero_ablation_equal_direct_forwards(identity_sae, tiny_store, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    r = evaluate(
        EvaluateConfig(sae=str(identity_sae), contexts=N_CONTEXTS, batch_size=4, device="cpu"), progress=False
    )
    # Independent reference: plain HF forwards, the zero ablation as a forward hook on decoder layer 0.
    hf = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    tokens = torch.from_numpy(
        heldout_contexts(
            open_store(str(tiny_store)), AutoTokenizer.from_pretrained(tiny_model_dir), N_CONTEXTS
        )
    ).long()

    def ce(logits: torch.Tensor) -> float:  # predictions made at positions 1..T-2 (BOS's own left out)
        return float(F.cross_entropy(logits[:, 1:-1].flatten(0, 1), tokens[:, 2:].flatten()))

    def zero_after_bos(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden.clone()
        hidden[:, 1:] = 0
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    with torch.no_grad():
        clean = ce(hf(tokens).logits)
        handle = hf.model.layers[0].register_forward_hook(zero_after_bos)
        try:
            zero = ce(hf(tokens).logits)
        finally:
            handle.remove()
    assert r.n_contexts == N_CONTEXTS and r.n_predictions == N_CONTEXTS * 30
    # Agreement to ~1e-7 nats here; 2e-6 leaves float32 headroom and is 500x below the zero-ablation gap.
    assert r.ce_clean == pytest.approx(clean, abs=2e-6)
    assert r.ce_spliced == pytest.approx(r.ce_clean, abs=2e-6)
    assert r.ce_zero == pytest.approx(zero, abs=2e-6)
    assert abs(r.ce_zero - r.ce_clean) > 1e-3, "zero ablation changed nothing: the check is vacuous"
    assert r.loss_recovered == pytest.approx(1.0, abs=2e-3)
    assert r.kl == pytest.approx(0.0, abs=1e-6)
    assert r.fvu < 1e-6
    assert r.l0 == open_store(str(tiny_store)).d_model and r.dead_fraction == 0.0


def test_evaluate_cli_writes_json(identity_sae, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert (
        main(
            ["evaluate", "--sae", str(identity_sae), "--contexts", "2", "--device", "cpu", "--out", str(out)]
        )
        == 0
    )
    saved = json.loads(out.read_text())
    assert set(saved) >= {
        "ce_clean",
        "ce_spliced",
        "ce_zero",
        "loss_recovered",
        "kl",
        "fvu",
        "l0",
        "dead_fraction",
    }
    assert "loss recovered" in capsys.readouterr().out


def test_positions_the_sae_never_trained_on_stay_clean(tiny_store, tiny_model_dir, tmp_path):
    """An SAE trained with --drop-special leaves BOS/EOS positions unspliced: the zero ablation then equals a
    direct forward that zeroes every other position, on text whose documents are short enough that EOS
    separators fall inside the contexts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sae = tmp_path / "identity"
    write_identity_sae(sae, tiny_store)
    cfg = json.loads((sae / "cfg.json").read_text())
    cfg["saepipe"]["training"] = {"drop_special": True, "special_token_ids": []}
    (sae / "cfg.json").write_text(json.dumps(cfg))
    docs = tmp_path / "docs.jsonl"
    words = ["the", "king", "is", "dead", "long", "live", "the", "king", "and", "all", "his", "men"]
    docs.write_text("".join(json.dumps({"text": " ".join(words[i % 5 :][:6])}) + "\n" for i in range(200)))
    r = evaluate(
        EvaluateConfig(sae=str(sae), contexts=4, batch_size=4, device="cpu", dataset=str(docs)),
        progress=False,
    )
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    store = open_store(str(tiny_store))
    tokens = torch.from_numpy(
        np.stack(
            list(
                itertools.islice(
                    pack_contexts(iter_texts(str(docs), None, "train", "text"), tok, 32, True), 4
                )
            )
        )
    ).long()
    special = (tokens == tok.eos_token_id) | (tokens == tok.bos_token_id)
    assert special[:, 1:].sum() >= 8, "vacuous: no EOS inside the contexts"
    hf = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, dtype=torch.float32, attn_implementation="eager"
    )

    def zero_but_special(module, args, output):
        hidden = (output[0] if isinstance(output, tuple) else output).clone()
        hidden[~special] = 0
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    with torch.no_grad():
        handle = hf.eval().model.layers[0].register_forward_hook(zero_but_special)
        try:
            logits = hf(tokens).logits
        finally:
            handle.remove()
    zero = float(F.cross_entropy(logits[:, 1:-1].flatten(0, 1), tokens[:, 2:].flatten()))
    assert store.special_token_ids == sorted({tok.bos_token_id, tok.eos_token_id})
    assert r.ce_zero == pytest.approx(zero, abs=2e-6)
