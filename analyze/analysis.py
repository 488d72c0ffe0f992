"""`saepipe analyze`: stream a store through an SAE and write the report (tables, arrays, dashboard).

    saepipe analyze --sae runs/sae --store stores/smollm2 --out reports/sae [--top-k 20] [--tokens N]

Steps: open the SAE (saepipe.train.load_sae) and its store; one streaming pass for the statistics
(saepipe.analyze.stats, fed sparse codes by `SAE.encode_sparse`); explain every latent and score the
explanations on held-out contexts (saepipe.analyze.explanations), and with --explainer also with a
language model (saepipe.analyze.lm_explainer); logit effects from the model's unembedding
(saepipe.analyze.logits); write the report (saepipe.analyze.report), then the dashboard and, if asked,
the W&B summary.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from saepipe.analyze.config import AnalyzeConfig
from saepipe.analyze.explanations import explain_and_score, explain_and_score_fast
from saepipe.analyze.inputs import open_inputs
from saepipe.analyze.logits import logit_effects, unembedding_of
from saepipe.analyze.ranking import classify, order, scores
from saepipe.analyze.report import write_report
from saepipe.analyze.stats import collect_stats
from saepipe.analyze.stats_fast import simple_stats
from saepipe.errors import SaepipeError
from saepipe.files import check_out_dir
from saepipe.harvest.devices import resolve_device
from saepipe.harvest.models import load_store_model


@dataclass(frozen=True)
class AnalyzeResult:
    out: Path
    n_latents: int
    n_tokens: int
    n_dead: int
    n_dense: int
    seconds: float
    rank_by: str
    n_ranked: int
    """Latents ranked by `rank_by` (live, not ultra-dense, with a defined score)."""
    n_tied: int
    """Ranked latents whose score another ranked latent shares."""
    n_unscored: int
    """Live, not ultra-dense latents without a score under `rank_by` (e.g. no held-out activation)."""
    explain_seconds: float
    """Time spent explaining and scoring (deterministic explainer; the language model's not included)."""


# What a report dir holds (saepipe.analyze.report, saepipe.analyze.dashboard): a killed run leaves some of it.
REPORT_ENTRIES = {
    "report.json",
    "latents.parquet",
    "arrays.safetensors",
    "vocab.json",
    "index.html",
    "assets",
    "data",
}


def check_out(out: str) -> None:
    """Refuse to scatter a report over a file or an unrelated non-empty directory; a report dir, finished
    or left by a killed run, is rewritten (its temporary `*.partial*` files are dropped first)."""
    check_out_dir(out, "give a directory for the report", _not_a_report, probe=False)
    path = Path(out)
    for p in path.rglob("*.partial*") if path.is_dir() else ():
        p.unlink()


def _not_a_report(path: Path) -> str | None:
    foreign = [p.name for p in path.iterdir() if p.name not in REPORT_ENTRIES and ".partial" not in p.name]
    return f"holds no report (it has {foreign[0]})" if foreign else None


def analyze(cfg: AnalyzeConfig, progress: bool = True) -> AnalyzeResult:
    t0 = time.perf_counter()
    check_out(cfg.out)
    device = resolve_device(cfg.device)
    inp = open_inputs(cfg.sae, cfg.store, cfg.hook, device)
    sae, store = inp.sae, inp.store
    if store.info.is_synthetic:  # no model, no logits
        raise SaepipeError(
            f"store {store.path} holds synthetic activations (no model for contexts and logit effects); score "
            "the SAE with `saepipe recovery` instead"
        )
    n_latents = sae.d_sae
    simple = simple_stats()
    stats = collect_stats(
        store,
        inp.hook,
        sae.encode if simple else sae.encode_sparse,
        n_latents,
        cfg.top_k,
        cfg.samples,
        device,
        max_tokens=cfg.tokens,
        batch_tokens=cfg.batch_tokens,
        seed=cfg.seed,
        progress=progress,
        reservoir=cfg.score_samples,
        pool_contexts=cfg.score_contexts,
    )
    t_explain = time.perf_counter()
    first = store.info.first_position
    table = (explain_and_score if simple else explain_and_score_fast)(stats, first, cfg.score_min_active)
    explain_seconds = time.perf_counter() - t_explain
    model = load_store_model(store, str(device), "logit effects would be wrong")
    effects = logit_effects(sae.W_dec.detach(), unembedding_of(model.bridge), cfg.logit_tokens)
    tok = model.tokenizer
    lm = None
    if cfg.explainer:
        from saepipe.analyze.lm_explainer import explain_with_lm

        dead, dense = classify(stats, cfg.dense_threshold)
        best = order(scores(stats, table.scores["score"])[cfg.rank_by], dead, dense)[: cfg.explainer_latents]
        lm = explain_with_lm(cfg, stats, first, best, lambda ids: [tok.decode([i]) for i in ids], progress)
    meta = {
        "sae": str(cfg.sae),
        "sae_cfg": sae.cfg,
        "store": str(store.path),
        "hook": inp.hook,
        "model": store.info.model_name,
        "histogram": "log10(activation) of active tokens, fixed edges hist_edges; outside values clipped",
        "explanation": "n-gram explanations scored on held-out contexts; see saepipe.analyze.scoring",
        "interpretability": "token concentration of the top contexts; see saepipe.analyze.ranking",
        "logit_effects": "direct path through the final norm's scale and W_U; see saepipe.analyze.logits",
    }
    out = write_report(
        cfg.out,
        stats,
        effects,
        lambda ids: [tok.decode([i]) for i in ids],
        meta,
        cfg.rank_by,
        cfg.dense_threshold,
        table,
        lm,
    )
    if cfg.dashboard:
        from saepipe.analyze.dashboard import write_dashboard

        write_dashboard(out)
    dead = int((stats.n_active == 0).sum())
    dense = int((stats.density > cfg.dense_threshold).sum())
    if cfg.wandb:
        from saepipe.analyze.wandb_log import log_report

        log_report(out, cfg.wandb_project, cfg.wandb_cards)
    r = json.loads((out / "report.json").read_text())["ranking"]
    return AnalyzeResult(
        out, n_latents, stats.n_tokens, dead, dense, time.perf_counter() - t0,
        cfg.rank_by, r["ranked"], r["tied"], r["unscored"], explain_seconds,
    )  # fmt: skip
