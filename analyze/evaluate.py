"""`saepipe evaluate`: splice an SAE into its model and measure how much of the model's behaviour survives.

    saepipe evaluate --sae runs/sae [--store STORE] [--contexts 64] [--out eval.json]

Held-out text: contexts packed exactly as the harvest packed the store (same dataset, tokenizer, context
size, BOS) but taken after the contexts the store holds, so the SAE never trained on them (`--dataset`
swaps in another text source, packed from its start). Three forwards per batch, at the SAE's hook:

    clean     the original activations
    spliced   x -> decode(encode(x))
    zero      x -> 0

Position 0 is left untouched in all three when the store has a BOS there: training never saw BOS
activations (`iter_token_rows` drops them), and its huge norm would dominate every number. So are the
positions of tokens the SAE was trained without (`saepipe train --drop-special`: BOS/EOS ids wherever they
occur, e.g. document separators; saepipe.analyze.inputs.excluded_tokens). Losses are mean next-token
cross-entropy over predictions made from position `first` on (the BOS position's own prediction is
identical in all three runs and is left out).

    loss_recovered = (ce_zero - ce_spliced) / (ce_zero - ce_clean)    1 = perfect, 0 = no better than zero
    kl             = mean over those positions of KL(p_clean || p_spliced), nats
    fvu            = sum |x - x_hat|^2 / sum |x - mean(x)|^2 over spliced positions
    l0             = mean number of active latents per token
    dead_fraction  = fraction of latents never active on the evaluated tokens (an upper bound on the
                     truly dead fraction: a small evaluation set misses rare latents)
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from saepipe.analyze.config import EvaluateConfig
from saepipe.analyze.inputs import excluded_tokens, open_inputs
from saepipe.errors import SaepipeError
from saepipe.harvest.corpus import iter_texts, pack_contexts
from saepipe.harvest.hooks import resolve_hooks
from saepipe.harvest.models import load_model, resolve_device
from saepipe.harvest.store import ActivationStore


@dataclass(frozen=True)
class EvalResult:
    sae: str
    hook: str
    n_contexts: int
    n_predictions: int
    """Next-token predictions each loss averages over."""
    ce_clean: float
    ce_spliced: float
    ce_zero: float
    loss_recovered: float
    kl: float
    fvu: float
    l0: float
    dead_fraction: float

    def table(self) -> str:
        rows = [
            ("CE clean", self.ce_clean),
            ("CE spliced (SAE)", self.ce_spliced),
            ("CE zero ablation", self.ce_zero),
            ("loss recovered", self.loss_recovered),
            ("KL to clean (nats)", self.kl),
            ("FVU", self.fvu),
            ("L0", self.l0),
            ("dead fraction", self.dead_fraction),
        ]
        head = f"{self.sae} at {self.hook}: {self.n_contexts} held-out contexts, {self.n_predictions} predictions"
        return "\n".join([head, *(f"  {name:<20} {value:>10.4f}" for name, value in rows)])


def heldout_contexts(
    store: ActivationStore, tokenizer: Any, n: int, dataset: str | None = None
) -> np.ndarray:
    """[m <= n, context_size] int32 contexts packed like the store's, after the ones it holds."""
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


@contextlib.contextmanager
def replaced(
    bridge: Any, point: str, fn: Callable[[torch.Tensor], torch.Tensor], where: torch.Tensor
) -> Iterator[None]:
    """Within the block, the positions `where` [batch, T] bool of hook `point` are replaced by `fn` of
    their rows [n, d]; the hook is removed in finally."""

    def hook(x: torch.Tensor, hook: Any) -> torch.Tensor:
        out = x.clone()
        out[where] = fn(x[where]).to(x.dtype)
        return out

    with bridge.hooks(fwd_hooks=[(point, hook)]):  # TransformerBridge removes its hooks in a finally
        yield


class _Sums:
    """Running sums for the metrics (float64)."""

    def __init__(self, d_in: int, d_sae: int, device: torch.device):
        self.ce = {"clean": 0.0, "spliced": 0.0, "zero": 0.0}
        self.kl = 0.0
        self.n_pred = 0
        self.n_tok = 0
        self.sq_err = 0.0
        self.x_sum = torch.zeros(d_in, dtype=torch.float64, device=device)
        self.x_sq = 0.0
        self.l0 = 0.0
        self.ever_active = torch.zeros(d_sae, dtype=torch.bool, device=device)


@torch.inference_mode()
def evaluate(cfg: EvaluateConfig, progress: bool = True) -> EvalResult:
    device = resolve_device(cfg.device)
    inp = open_inputs(cfg.sae, cfg.store, None, device)
    sae, store = inp.sae, inp.store
    if store.settings["model"]["name"] == "synthetic":  # written by `saepipe synth`
        raise SaepipeError(
            f"store {store.path} holds synthetic activations (no model to splice into); evaluate an SAE trained "
            "on a harvested store, or score this one with `saepipe recovery`"
        )
    model = load_model(store.settings["model"]["name"], str(device))
    if model.fingerprint != store.settings["model"]["fingerprint"]:
        raise SaepipeError(
            f"model {store.settings['model']['name']} no longer has the weights store {store.path} was harvested "
            "with (fingerprints differ); cannot evaluate the SAE on it"
        )
    bridge = model.bridge
    point = resolve_hooks(bridge, [inp.hook])[inp.hook]
    tokens = heldout_contexts(store, model.tokenizer, cfg.contexts, cfg.dataset)
    first = 1 if store.settings["prepend_bos"] else 0
    excluded = torch.tensor(excluded_tokens(sae.cfg, store), dtype=torch.long, device=device)
    sums = _Sums(int(sae.cfg["d_in"]), int(sae.cfg["d_sae"]), device)

    def splice(x: torch.Tensor) -> torch.Tensor:  # the spliced positions' rows [n, d]
        xf = x.float()
        z = sae.encode(xf)
        x_hat = sae.decode(z)
        sums.sq_err += float(((xf - x_hat) ** 2).sum(dtype=torch.float64))
        sums.x_sum += xf.sum(dim=0, dtype=torch.float64)
        sums.x_sq += float((xf * xf).sum(dtype=torch.float64))
        active = z > 0
        sums.l0 += float(active.sum())
        sums.n_tok += active.shape[0]
        sums.ever_active |= active.any(0)
        return x_hat

    bar = tqdm(total=len(tokens), unit="ctx", desc="evaluate", disable=not progress)
    for b in range(0, len(tokens), cfg.batch_size):
        batch = torch.from_numpy(tokens[b : b + cfg.batch_size]).long().to(device)
        target = batch[:, first + 1 :].reshape(-1)
        where = ~torch.isin(batch, excluded)
        where[:, :first] = False

        def log_probs(logits: torch.Tensor) -> torch.Tensor:
            return F.log_softmax(logits[:, first:-1].float(), dim=-1).flatten(0, 1)

        clean = log_probs(bridge(batch, return_type="logits"))
        sums.ce["clean"] += float(F.nll_loss(clean, target, reduction="sum"))
        with replaced(bridge, point, splice, where):
            spliced = log_probs(bridge(batch, return_type="logits"))
        sums.ce["spliced"] += float(F.nll_loss(spliced, target, reduction="sum"))
        sums.kl += float(F.kl_div(spliced, clean, log_target=True, reduction="sum"))
        del spliced
        with replaced(bridge, point, torch.zeros_like, where):
            zero = log_probs(bridge(batch, return_type="logits"))
        sums.ce["zero"] += float(F.nll_loss(zero, target, reduction="sum"))
        sums.n_pred += len(target)
        bar.update(len(batch))
    bar.close()

    ce = {k: v / sums.n_pred for k, v in sums.ce.items()}
    mean = sums.x_sum / sums.n_tok
    total_var = sums.x_sq - sums.n_tok * float((mean * mean).sum())
    denom = ce["zero"] - ce["clean"]
    return EvalResult(
        sae=str(cfg.sae),
        hook=inp.hook,
        n_contexts=len(tokens),
        n_predictions=sums.n_pred,
        ce_clean=ce["clean"],
        ce_spliced=ce["spliced"],
        ce_zero=ce["zero"],
        loss_recovered=(ce["zero"] - ce["spliced"]) / denom if denom != 0 else float("nan"),
        kl=sums.kl / sums.n_pred,
        fvu=sums.sq_err / total_var,
        l0=sums.l0 / sums.n_tok,
        dead_fraction=float((~sums.ever_active).float().mean()),
    )


def save_result(result: EvalResult, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".partial{os.getpid()}")
    tmp.write_text(json.dumps(asdict(result), indent=2) + "\n")
    os.replace(tmp, path)
    return path
