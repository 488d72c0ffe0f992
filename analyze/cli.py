"""Entry points of `saepipe analyze` and `saepipe evaluate` (declared in saepipe.analyze.commands).

saepipe analyze --sae runs/sae --out reports/sae            # one machine; uses CUDA when present
saepipe evaluate --sae runs/sae --contexts 128
"""

from __future__ import annotations

from pathlib import Path

from saepipe.analyze.config import AnalyzeConfig, EvaluateConfig


def run(cfg: AnalyzeConfig) -> int:
    from saepipe.analyze.analysis import analyze

    r = analyze(cfg)
    print(
        f"analyzed {r.n_latents} latents over {r.n_tokens:,} tokens in {r.seconds:.1f}s "
        f"(explanations {r.explain_seconds:.1f}s): {r.n_dead} dead, {r.n_dense} ultra-dense; report in {r.out}"
        + (f" (open {Path(r.out) / 'index.html'})" if cfg.dashboard else "")
    )
    unique = r.n_ranked - r.n_tied
    print(
        f"ranked {r.n_ranked} latents by {r.rank_by}: {r.n_tied} tied (share their score with another), "
        f"{unique} unique ({100 * unique / max(r.n_ranked, 1):.1f}%); {r.n_unscored} without a score"
    )
    return 0


def run_evaluate(cfg: EvaluateConfig) -> int:
    from saepipe.analyze.evaluate import evaluate, save_result

    result = evaluate(cfg)
    out = save_result(result, cfg.out or Path(cfg.sae) / "evaluation.json")
    print(result.table())
    print(f"saved {out}")
    return 0
