"""Log a finished report to Weights & Biases: the per-latent summary table and a few latent cards.

A card is a small self-contained HTML block (statistics, logit effects, top contexts with the peak token
marked) for one of the top-ranked latents. Runs offline when WANDB_MODE=offline (the test suite sets it).
"""

from __future__ import annotations

import html
from pathlib import Path

from saepipe.analyze.report import Report


def latent_card(rep: Report, latent: int, n_contexts: int = 5) -> str:
    """HTML card of one latent (no scripts, no external resources)."""
    s = rep.stats(latent)
    effects = rep.logit_effects(latent)
    rows = "".join(
        f"<div style='font-family:monospace;white-space:pre-wrap'>{c.value:.4g}: {html.escape(c.text)}</div>"
        for c in rep.top_contexts(latent, n_contexts)
    )
    promoted = ", ".join(html.escape(t) for t, _ in effects["promoted"][:5])
    suppressed = ", ".join(html.escape(t) for t, _ in effects["suppressed"][:5])
    explanation = html.escape(str(s.get("explanation") or ""))
    return (
        f"<h3>Latent {latent}</h3><p>density {s['density']:.4g} · max {s['max']:.4g} · "
        f"explanation score {s['score_explanation']:.3f} · "
        f"interpretability {s['score_interpretability']:.3f}</p><p>{explanation}</p>"
        f"<p>promotes: {promoted}<br>suppresses: {suppressed}</p>{rows}"
    )


def log_report(report_dir: str | Path, project: str, n_cards: int) -> str:
    """Log to a new W&B run; returns the run's local directory."""
    import wandb

    rep = Report.open(report_dir)
    run = wandb.init(
        project=project, job_type="analyze", config={k: v for k, v in rep.meta.items() if k != "sae_cfg"}
    )
    try:
        df = rep.table.to_pandas()
        run.log({"latents": wandb.Table(dataframe=df)})
        run.summary.update(
            {
                "n_latents": rep.n_latents,
                "n_dead": len(rep.dead),
                "n_dense": len(rep.dense),
                "n_tokens": rep.meta["n_tokens"],
            }
        )
        for latent in rep.ranking()[:n_cards]:
            run.log({f"latent_cards/{latent}": wandb.Html(latent_card(rep, latent))})
        return str(run.dir)
    finally:
        run.finish()
