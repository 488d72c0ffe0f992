"""The default model is really the pretrained SmolLM2-135M, and harvesting it matches a direct forward."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from saepipe.harvest import open_store
from saepipe.harvest.config import HarvestConfig
from saepipe.harvest.harvester import harvest
from saepipe.harvest.models import load_model

ENGLISH = (
    "The history of the city begins in the early nineteenth century, when a small group of farmers settled "
    "along the river. Over the following decades, the town grew into an important center of trade, and a "
    "railway line connected it to the capital. Today the city is known for its university, its museums and "
    "its parks. Many visitors come in the summer to walk along the old harbor, where fishing boats still "
    "unload their catch every morning. The local government has invested in public transport, and a new "
    "tram line opened last year. Schools in the area have a good reputation, and many families move here "
    "because of the quality of life. In the evening, people gather in the main square to eat, talk and "
    "listen to music. The weather is mild for most of the year, although winters can be wet and windy."
)


@pytest.mark.slow
def test_default_model_is_pretrained():
    model = load_model("smollm2-135m", device="cpu")
    assert (model.n_layers, model.d_model) == (30, 576)
    ids = model.tokenizer(ENGLISH, add_special_tokens=False)["input_ids"]
    tokens = torch.tensor([[model.tokenizer.bos_token_id, *ids]])
    with torch.no_grad():
        loss = float(model.bridge(tokens, return_type="loss"))
    # Pretrained: ~2.4 nats on ordinary English; a random-weight model of this vocabulary scores ~10.8.
    assert 1.5 < loss < 3.2, loss


@pytest.mark.slow
def test_default_harvest_matches_hf_forward(tmp_path, default_model_dir, small_corpus):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "store"
    harvest(
        HarvestConfig(out=str(out), dataset=str(small_corpus), hooks=["blocks.3.hook_resid_post"], tokens=8 * 64,
                      context_size=64, batch_size=8, contexts_per_chunk=8, chunks_per_shard=1),
        progress=False,
    )  # fmt: skip
    store = open_store(str(out))
    assert store.settings["dtype"] == "float16" and store.d_model == 576
    hf = AutoModelForCausalLM.from_pretrained(
        default_model_dir, dtype=torch.float32, attn_implementation="eager"
    )
    with torch.no_grad():
        hidden = hf.eval()(torch.from_numpy(store.tokens()).long(), output_hidden_states=True).hidden_states[
            4
        ]
    got = store.activations("blocks.3.hook_resid_post").astype(np.float32)
    # float16 storage: relative error ~5e-4 of each value's magnitude
    np.testing.assert_allclose(got, hidden.numpy(), rtol=2e-3, atol=2e-2)


@pytest.mark.slow
def test_store_key_does_not_depend_on_where_the_model_was_converted(tmp_path, monkeypatch, small_corpus):
    """The packaged model is converted into a directory whose name varies with the install (and here with
    SAEPIPE_HOME); its store's settings, and so its cache key, must be the same either way."""
    from saepipe.harvest.cache import store_key
    from saepipe.harvest.models import local_checkpoint

    settings, conversions = [], []
    for home in ("a", "b"):
        if conversions:  # the same conversion in another home, copied rather than redone (slow)
            monkeypatch.setenv("SAEPIPE_HOME", str(tmp_path / home))
            shutil.copytree(conversions[0], tmp_path / home / "models" / conversions[0].name)
        conversions.append(local_checkpoint("smollm2-135m"))  # first: the one every other test uses
        out = tmp_path / home / "store"
        harvest(
            HarvestConfig(out=str(out), dataset=str(small_corpus), hooks=["blocks.0.hook_resid_post"],
                          tokens=2 * 32, context_size=32, batch_size=2, contexts_per_chunk=2, chunks_per_shard=1),
            progress=False,
        )  # fmt: skip
        settings.append(open_store(str(out)).settings)
    assert conversions[0] != conversions[1]  # two conversions, in two places
    assert settings[0] == settings[1] and store_key(settings[0]) == store_key(settings[1])


def test_a_second_install_of_the_model_reuses_its_conversion(tmp_path):
    """Another virtualenv holds the same .gguf at another path: it must find the conversion already made
    (converting again costs a minute and ~0.5 GB per install), and a different file must not."""
    from saepipe.harvest.models import ALIASES, _content_key, _find_package_gguf, local_checkpoint

    converted = local_checkpoint("smollm2-135m")
    packaged = _find_package_gguf(ALIASES["smollm2-135m"])
    other_install = tmp_path / "venv2" / packaged.name
    other_install.parent.mkdir()
    shutil.copyfile(packaged, other_install)
    assert local_checkpoint(str(other_install)) == converted
    changed = tmp_path / "venv3" / packaged.name
    changed.parent.mkdir()
    shutil.copyfile(packaged, changed)
    with changed.open("r+b") as fh:  # one byte of the weights differs: another model, another conversion
        fh.seek(-1, 2)
        last = fh.read(1)
        fh.seek(-1, 2)
        fh.write(bytes([last[0] ^ 1]))
    assert _content_key(changed) != _content_key(packaged)
