"""The optional language-model explainer and scorer (`saepipe analyze --explainer MODEL`), after delphi.

For the best-ranked latents (`--explainer-latents`), on the same build and held-out material as the
deterministic explainer (saepipe.analyze.heldout):

- **explain**: the model reads build windows (top contexts first, then sampled ones), the tokens where the
  latent is active above 0.3 of the window's maximum marked <<like this>> (delphi's highlighting), and
  answers `[EXPLANATION]: ...`;
- **detection**: for held-out windows where the latent is active and where it is inactive, the model is
  asked whether the described feature is active in the text; its probability of "1" against "0" is the
  prediction;
- **fuzzing**: held-out active windows with the active tokens marked, and the same windows with every mark
  moved by one token (delphi's "active" fuzzing); the model is asked whether the marks are right.

Scores are the deterministic path's (saepipe.analyze.scoring): AUROC, precision, recall and balanced
accuracy at p > 0.5; no simulation, so `lm_score` is the mean of the two AUROCs mapped to [-1, 1].

Calls are batched (`--explainer-batch` prompts per forward, left-padded; scoring needs one forward per
batch, explaining a greedy generation) and every answer is cached in a JSON-lines file per model under
`--explainer-cache`, keyed by a sha256 of everything that determines it: the model's weights
(fingerprint), the kind of call, the exact prompt text, the generation settings, the batch size, dtype,
device type and the torch/transformers versions. A changed example, explanation, model or setting is a
different key, so a stale answer is never served.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from saepipe.analyze.config import AnalyzeConfig
from saepipe.analyze.heldout import Split, Windows
from saepipe.analyze.scoring import auroc, binary, combine
from saepipe.analyze.stats import LatentStats
from saepipe.errors import SaepipeError

HIGHLIGHT = 0.3
"""Tokens above this fraction of a window's largest activation are marked (delphi's default)."""
MAX_NEW_TOKENS = 40
LM_COLUMNS = ["lm_score", "lm_detection_auroc", "lm_detection_balanced_accuracy", "lm_fuzzing_auroc",
              "lm_fuzzing_balanced_accuracy"]  # fmt: skip


class AnswerCache:
    """sha256 key -> answer, one JSON line each, appended as answers come (a killed run keeps what it had;
    an unreadable line, e.g. half-written, is ignored)."""

    def __init__(self, path: Path):
        self.path = path
        self.answers: dict[str, Any] = {}
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                    self.answers[rec["key"]] = rec["answer"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue

    def put(self, items: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            for k, v in items.items():
                f.write(json.dumps({"key": k, "answer": v}, ensure_ascii=False) + "\n")
        self.answers.update(items)


class LMClient:
    """A local causal LM answering prompts in batches, through the cache."""

    def __init__(self, name: str, device: torch.device, batch: int, cache_dir: str | Path | None):
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from saepipe.harvest.models import _cached_fingerprint, local_checkpoint, saepipe_home

        local = local_checkpoint(name)
        source = str(local) if local is not None else name
        transformers.utils.logging.disable_progress_bar()
        try:
            self.tok = AutoTokenizer.from_pretrained(source)
            self.model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).to(device).eval()
        except (OSError, ValueError) as e:
            raise SaepipeError(
                f"--explainer {name}: could not load it ({type(e).__name__}); give a local Hugging Face model "
                "directory, smollm2-135m, or a hub id while online"
            ) from None
        self.tok.padding_side = "left"
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.device, self.batch = device, batch
        self.fingerprint = _cached_fingerprint(local, self.model, "float32")
        root = Path(cache_dir) if cache_dir else saepipe_home() / "explainer-cache"
        self.cache = AnswerCache(root / f"{self.fingerprint[:32]}.jsonl")
        self.forward_calls = 0
        """Batches sent to the model (cache hits send none)."""
        self.ids = [self.tok.encode(d, add_special_tokens=False)[-1] for d in ("0", "1")]

    def chat(self, user: str) -> str:
        """The prompt as the model expects it: its chat template when it has one."""
        if getattr(self.tok, "chat_template", None):
            messages = [{"role": "user", "content": user}]
            return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return user + "\n"

    def _key(self, kind: str, prompt: str, settings: dict[str, Any]) -> str:
        import transformers

        record = {
            "model": self.fingerprint, "kind": kind, "prompt": prompt, "settings": settings,
            "batch": self.batch, "dtype": "float32", "device": self.device.type,
            "versions": [torch.__version__, transformers.__version__],
        }  # fmt: skip
        return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()

    def _cached(self, kind: str, prompts: Sequence[str], settings: dict[str, Any], run: Callable) -> list:
        keys = [self._key(kind, p, settings) for p in prompts]
        todo = sorted({k: p for k, p in zip(keys, prompts) if k not in self.cache.answers}.items())
        for b in range(0, len(todo), self.batch):
            part = todo[b : b + self.batch]
            with torch.inference_mode():
                answers = run([p for _, p in part])
            self.forward_calls += 1
            self.cache.put({k: a for (k, _), a in zip(part, answers)})
        return [self.cache.answers[k] for k in keys]

    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        return {k: v.to(self.device) for k, v in enc.items()}

    def generate(self, prompts: Sequence[str]) -> list[str]:
        """Greedy completions (at most MAX_NEW_TOKENS tokens) of chat-formatted prompts."""

        def run(batch: list[str]) -> list[str]:
            enc = self._encode(batch)
            out = self.model.generate(
                **enc, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=self.tok.pad_token_id
            )
            return self.tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)

        return self._cached("generate", prompts, {"max_new_tokens": MAX_NEW_TOKENS, "greedy": True}, run)

    def yes_probability(self, prompts: Sequence[str]) -> list[float]:
        """P("1") / (P("0") + P("1")) for the next token after each chat-formatted prompt."""

        def run(batch: list[str]) -> list[float]:
            logits = self.model(**self._encode(batch)).logits[:, -1, self.ids].float()
            return torch.softmax(logits, -1)[:, 1].tolist()

        return self._cached("yes_probability", prompts, {"answers": ["0", "1"]}, run)


def window_text(w: Windows, i: int, decode: Callable[[int], str], marks: np.ndarray | None = None) -> str:
    """Window i as text; `marks` [W] bool puts <<...>> around runs of marked tokens."""
    out, open_ = [], False
    for s in np.flatnonzero(w.tokens[i] >= 0):
        m = bool(marks[s]) if marks is not None else False
        if m and not open_:
            out.append("<<")
        if not m and open_:
            out.append(">>")
        open_ = m
        out.append(decode(int(w.tokens[i, s])))
    if open_:
        out.append(">>")
    return "".join(out).replace("\n", "\\n")


def highlight(w: Windows, i: int) -> np.ndarray:
    a = np.nan_to_num(w.acts[i], nan=0.0)
    return a > HIGHLIGHT * a.max() if a.max() > 0 else np.zeros(len(a), bool)


def explain_prompt(build: Windows, n: int, decode: Callable[[int], str]) -> str:
    examples = "\n".join(
        f"Example {j + 1}: {window_text(build, j, decode, highlight(build, j))}"
        for j in range(min(n, len(build.tokens)))
    )
    return (
        "You are studying one feature of a language model. In each example below, the tokens where the "
        "feature is active are marked <<like this>>.\n"
        f"{examples}\n"
        "Describe in a short phrase what the feature responds to. Answer with one line: [EXPLANATION]: <phrase>"
    )


def detection_prompt(explanation: str, text: str) -> str:
    return (
        f"A feature of a language model is described as: {explanation}\nText: {text}\n"
        "Is this feature active anywhere in the text? Answer 1 for yes or 0 for no."
    )


def fuzzing_prompt(explanation: str, text: str) -> str:
    return (
        f"A feature of a language model is described as: {explanation}\n"
        f"In the text below, some tokens are marked <<like this>>.\nText: {text}\n"
        "Are the marked tokens the ones the description refers to? Answer 1 for yes or 0 for no."
    )


def parse_explanation(answer: str) -> str:
    m = re.search(r"\[EXPLANATION\]:\s*(.+)", answer)
    text = m.group(1) if m else next((line for line in answer.splitlines() if line.strip()), "")
    return text.strip()[:200] or "(no explanation)"


def _shifted(marks: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """The marks moved one token right, or left when that would leave the tokens of the window."""
    right = np.zeros_like(marks)
    right[1:] = marks[:-1]
    if not marks[-1] and (right <= valid).all():
        return right
    left = np.zeros_like(marks)
    left[:-1] = marks[1:]
    return left & valid


def explain_with_lm(
    cfg: AnalyzeConfig,
    stats: LatentStats,
    first: int,
    latents: np.ndarray,
    decode_ids: Callable[[list[int]], list[str]],
    progress: bool = False,
    client: LMClient | None = None,
) -> dict[str, Any]:
    """Explain and score `latents` with the model `cfg.explainer`; the report's lm_* columns [L]."""
    from saepipe.harvest.devices import resolve_device

    client = client or LMClient(
        cfg.explainer, resolve_device(cfg.device), cfg.explainer_batch, cfg.explainer_cache
    )
    split = Split(stats, first)
    vocab: dict[int, str] = {}

    def decode(t: int) -> str:
        if t not in vocab:
            vocab[t] = decode_ids([t])[0]
        return vocab[t]

    n = cfg.explainer_examples
    mats = {int(i): split.material(int(i)) for i in latents}
    latents = [i for i in mats if len(mats[i].examples.tokens)]
    answers = client.generate([client.chat(explain_prompt(mats[i].examples, n, decode)) for i in latents])
    texts = {i: parse_explanation(a) for i, a in zip(latents, answers)}

    neg_all = split.pool_windows
    jobs: list[tuple[int, str, bool, str]] = []  # latent, kind, label, prompt
    for i in tqdm(latents, desc="explainer prompts", disable=not progress):
        pos, e = mats[i].positives, texts[i]
        inactive = np.flatnonzero(~(mats[i].pool_acts > 0).any(1))
        negs = (
            inactive[np.linspace(0, len(inactive) - 1, min(n, len(inactive))).astype(int)]
            if len(inactive)
            else []
        )
        for j in range(min(n, len(pos.tokens))):
            jobs.append((i, "det", True, detection_prompt(e, window_text(pos, j, decode))))
            valid = pos.tokens[j] >= 0
            marks = (np.nan_to_num(pos.acts[j]) > 0) & valid
            jobs.append((i, "fuzz", True, fuzzing_prompt(e, window_text(pos, j, decode, marks))))
            jobs.append(
                (i, "fuzz", False, fuzzing_prompt(e, window_text(pos, j, decode, _shifted(marks, valid))))
            )
        for j in negs:
            jobs.append((i, "det", False, detection_prompt(e, window_text(neg_all, int(j), decode))))
    probs = client.yes_probability([client.chat(p) for *_, p in jobs])

    L = len(stats.n_active)
    cols: dict[str, Any] = {k: np.full(L, np.nan) for k in LM_COLUMNS}
    cols["lm_explanation"] = [""] * L
    for i in latents:
        got = {(kind, lab): np.array([p for (j, k, lb, _), p in zip(jobs, probs) if j == i and k == kind and lb == lab])
               for kind in ("det", "fuzz") for lab in (True, False)}  # fmt: skip
        det = auroc(got["det", True], got["det", False])
        fuzz = auroc(got["fuzz", True], got["fuzz", False])
        cols["lm_explanation"][i] = texts[i]
        cols["lm_score"][i] = combine(det, fuzz, np.nan)
        cols["lm_detection_auroc"][i] = det
        cols["lm_detection_balanced_accuracy"][i] = binary(got["det", True] > 0.5, got["det", False] > 0.5)[2]
        cols["lm_fuzzing_auroc"][i] = fuzz
        cols["lm_fuzzing_balanced_accuracy"][i] = binary(got["fuzz", True] > 0.5, got["fuzz", False] > 0.5)[2]
    return cols
