"""`saepipe evaluate`: splice an SAE into its model and measure how much of the model's behaviour survives.

    saepipe evaluate --sae runs/sae [--store STORE] [--contexts 64] [--out eval.json]

Held-out text: contexts packed exactly as the harvest packed the store (same dataset, tokenizer, context
size, BOS) but taken after the contexts the store holds, so the SAE never trained on them (`--dataset`
swaps in another text source, packed from its start). Three forwards per batch, at the SAE's hook, the
last two through saepipe.splice (train/faithfulness.py, shared with training's --eval-every):

    clean     the original activations
    spliced   x -> decode(encode(x))
    zero      x -> 0

Position 0 is left untouched in all three when the store has a BOS there: training never saw BOS
activations (`iter_token_rows` drops them), and its huge norm would dominate every number. So are the
positions of tokens the SAE was trained without (`saepipe train --drop-special`: BOS/EOS ids wherever they
occur, e.g. document separators; saepipe.analyze.inputs.excluded_tokens). Losses are mean next-token
cross-entropy over predictions made from position 1 on when there is a BOS (the BOS position's own
prediction is identical in all three runs and is left out).

    loss_recovered = (ce_zero - ce_spliced) / (ce_zero - ce_clean)    1 = perfect, 0 = no better than zero
    kl             = mean over those positions of KL(p_clean || p_spliced), nats
    fvu            = sum |x - x_hat|^2 / sum |x - mean(x)|^2 over spliced positions
    l0             = mean number of active latents per token
    dead_fraction  = fraction of latents never active on the evaluated tokens (an upper bound on the
                     truly dead fraction: a small evaluation set misses rare latents)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from saepipe.analyze.config import EvaluateConfig
from saepipe.analyze.inputs import excluded_tokens, open_inputs
from saepipe.errors import SaepipeError
from saepipe.files import write_text_atomic
from saepipe.harvest.corpus import heldout_contexts
from saepipe.harvest.devices import resolve_device
from saepipe.harvest.models import load_store_model
from saepipe.train.faithfulness import measure
from saepipe.train.splice import Observed, Splice


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


class _Sums:
    """Running sums of the reconstruction metrics (float64), fed by the splice's `observe`."""

    def __init__(self, d_in: int, d_sae: int, device: torch.device):
        self.n_tok = 0
        self.sq_err = 0.0
        self.x_sum = torch.zeros(d_in, dtype=torch.float64, device=device)
        self.x_sq = 0.0
        self.l0 = 0.0
        self.ever_active = torch.zeros(d_sae, dtype=torch.bool, device=device)

    def observe(self, seen: Observed) -> None:
        x, z = seen.x, seen.z  # [n, d_in], [n, d_sae] at the spliced positions
        self.sq_err += float(((x - seen.recon) ** 2).sum(dtype=torch.float64))
        self.x_sum += x.sum(dim=0, dtype=torch.float64)
        self.x_sq += float((x * x).sum(dtype=torch.float64))
        active = z > 0
        self.l0 += float(active.sum())
        self.n_tok += active.shape[0]
        self.ever_active |= active.any(0)


@torch.inference_mode()
def evaluate(cfg: EvaluateConfig, progress: bool = True) -> EvalResult:
    device = resolve_device(cfg.device)
    inp = open_inputs(cfg.sae, cfg.store, None, device)
    sae, store = inp.sae, inp.store
    if store.info.is_synthetic:
        raise SaepipeError(
            f"store {store.path} holds synthetic activations (no model to splice into); evaluate an SAE trained "
            "on a harvested store, or score this one with `saepipe recovery`"
        )
    model = load_store_model(store, str(device), "cannot evaluate the SAE on it")
    tokens = heldout_contexts(store, model.tokenizer, cfg.contexts, cfg.dataset)
    sums = _Sums(sae.d_in, sae.d_sae, device)
    skip_bos = store.info.prepend_bos  # the store put BOS at position 0: leave it untouched
    splice = Splice(sae, hook=inp.hook, observe=sums.observe)
    with tqdm(total=len(tokens), unit="ctx", desc="evaluate", disable=not progress) as bar:
        (f,) = measure(
            model.bridge, [splice], tokens, cfg.batch_size, skip_bos, on_batch=bar.update,
            skip_tokens=excluded_tokens(sae.cfg, store),
        )  # fmt: skip
    mean = sums.x_sum / sums.n_tok
    total_var = sums.x_sq - sums.n_tok * float((mean * mean).sum())
    return EvalResult(
        sae=str(cfg.sae),
        hook=inp.hook,
        n_contexts=f.n_contexts,
        n_predictions=f.n_predictions,
        ce_clean=f.ce_clean,
        ce_spliced=f.ce_spliced,
        ce_zero=f.ce_zero,
        loss_recovered=f.loss_recovered,
        kl=f.kl,
        fvu=sums.sq_err / total_var,
        l0=sums.l0 / sums.n_tok,
        dead_fraction=float((~sums.ever_active).float().mean()),
    )


def save_result(result: EvalResult, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(path, json.dumps(asdict(result), indent=2) + "\n")
