"""The three passes of `saepipe families` (saepipe.analyze.families_cmd documents the command and outputs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
from tqdm import tqdm

from saepipe.analyze.families import (
    Candidates,
    MergedDecoder,
    agglomerate,
    ancestors,
    candidate_pairs,
    cut,
    merged_decoder,
)
from saepipe.analyze.families_cmd import (
    FamiliesConfig,
    check_family_inputs,
    cut_label,
    median,
    write_json,
    write_tradeoff,
)
from saepipe.analyze.family_stats import FamilyStats, LatentStats
from saepipe.analyze.inputs import resolve_hook
from saepipe.analyze.merge import fit_directions, merged_tensors, write_merged
from saepipe.analyze.reconstruction import ReconstructionStats, encode_stream
from saepipe.analyze.recovery import cosine_matrix
from saepipe.analyze.spliced import wanted_spliced
from saepipe.analyze.splitting import cofiring, link_latents
from saepipe.errors import SaepipeError


def _load(cfg: FamiliesConfig) -> tuple[Any, Any, list, list, str]:
    from saepipe.harvest import open_store
    from saepipe.train import load_sae
    from saepipe.train.sae_dir import SAERecord

    store = open_store(cfg.store)
    wide = load_sae(cfg.sae, device=cfg.device)
    ladder = sorted(((load_sae(p, device=cfg.device), p) for p in cfg.ladder), key=lambda t: t[0].d_sae)
    baselines = [(load_sae(p, device=cfg.device), p) for p in cfg.baselines]
    for sae, path in [(wide, cfg.sae), *ladder, *baselines]:
        SAERecord.of(sae).compatible_with(store, path)
    check_family_inputs(
        wide, cfg.sae, {p: (s, "ladder") for s, p in ladder} | {p: (s, "baseline") for s, p in baselines}
    )
    if len({s.d_sae for s, _ in ladder}) != len(ladder):
        raise SaepipeError("two --ladder SAEs have the same width; give one SAE per width")
    hook = resolve_hook(store, [wide], cfg.hook)
    k = wide.k if wide.architecture == "topk" else None
    for c in cfg.cuts():
        w = c.get("width")
        if w is not None and w >= wide.d_sae:
            raise SaepipeError(
                f"--width {w} is not below the wide SAE's {wide.d_sae} latents; give a smaller one"
            )
        if w is not None and k is not None and w < int(k):
            raise SaepipeError(
                f"--width {w} is below the TopK SAE's k={k}; a merged TopK SAE keeps k latents"
            )
    return store, wide, ladder, baselines, hook


def _filter(pairs: Candidates, keep: np.ndarray, *arrays: np.ndarray) -> tuple:
    return (Candidates(pairs.i[keep], pairs.j[keep], pairs.cos[keep]), *(a[keep] for a in arrays))


def build_report(cfg: FamiliesConfig, progress: bool = True) -> dict:
    """Run the three passes; write families.json, tradeoff.csv, merged dirs and pages into cfg.out."""
    store, wide, ladder, baselines, hook = _load(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    m, d = wide.d_sae, wide.d_in
    decoder = wide.W_dec.detach().float().cpu().numpy()
    b_dec = wide.b_dec.detach().float().cpu().numpy()
    pairs = candidate_pairs(decoder, cfg.candidate_cos)
    total = min(store.n_tokens, cfg.max_tokens or store.n_tokens)
    bar = tqdm(total=3 * total, unit="tok", unit_scale=True, desc="families", disable=not progress)
    want_pages = cfg.pages

    # Pass 1: latent statistics, every SAE's L0/FVU, co-firing between consecutive ladder levels.
    from saepipe.analyze.split_pages import SparseTopN

    saes = [wide, *(s for s, _ in ladder), *(s for s, _ in baselines)]
    chain = [s for s, _ in ladder] + [wide]  # narrow to wide
    stats = LatentStats(pairs, m, d)
    recon = [ReconstructionStats() for _ in saes]
    co_levels: list = [None] * (len(chain) - 1)
    tops_wide = SparseTopN(m, cfg.top_contexts) if want_pages else None
    tops_parent = SparseTopN(chain[0].d_sae, cfg.top_contexts) if want_pages and ladder else None
    for batch in encode_stream(saes, store, hook, cfg.batch_tokens, cfg.max_tokens):
        z = batch.latents[0]
        stats.update(batch.x - b_dec, z)
        for r, lat, xh in zip(recon, batch.latents, batch.recon):
            r.update(batch.x, xh, lat.nnz)
        lat_chain = [*batch.latents[1 : 1 + len(ladder)], z]
        for a in range(len(co_levels)):
            c = cofiring(lat_chain[a], lat_chain[a + 1])
            co_levels[a] = c if co_levels[a] is None else co_levels[a] + c
        if tops_wide is not None:
            tops_wide.update(z, batch.addr)
        if tops_parent is not None:
            tops_parent.update(batch.latents[1], batch.addr)
        bar.update(len(batch.x))
    if stats.n_tokens == 0:
        raise SaepipeError(f"store {cfg.store} holds no tokens to measure families on")

    pair_report = cofire_by_cosine(pairs, stats, cfg.candidate_cos, cfg.max_cofire)

    # Families: ladder ancestry, candidate pairs, one agglomeration to the furthest cut.
    ancestor = None
    co, gram = stats.co, stats.gram
    if ladder:
        decs = [s.W_dec.detach().float().cpu().numpy() for s in chain]
        links = [
            link_latents(
                cosine_matrix(decs[a], decs[a + 1]), co_levels[a], cfg.link_cos, cfg.link_coactivation
            )
            for a in range(len(co_levels))
        ]
        ancestor = ancestors(links)
        same = (ancestor[pairs.i] >= 0) & (ancestor[pairs.i] == ancestor[pairs.j])
        pairs, co, gram = _filter(pairs, same, co, gram)
    cuts = cfg.cuts()
    thresholds = [c["threshold"] for c in cuts if "threshold" in c]
    widths = [c["width"] for c in cuts if "width" in c]
    merges = agglomerate(
        decoder,
        stats.mass,
        stats.fires,
        pairs,
        co,
        cfg.max_cofire,
        min_score=0.0 if widths else min(thresholds),
        min_families=min(widths) if widths else 1,
    )
    wide_name = Path(cfg.sae).name
    plans = []
    for c in cuts:
        family = cut(merges, m, threshold=c.get("threshold"), width=c.get("width"), live=stats.fires > 0)
        md = merged_decoder(decoder, stats.mass, family, cfg.direction, (pairs.i, pairs.j, gram), stats.sq)
        parent = None
        if ancestor is not None:
            parent = np.full(len(md.decoder), -1)
            parent[family[family >= 0]] = ancestor[family >= 0]  # members of a family share it
        plans.append({"cut": c, "name": cut_label(wide_name, c), "md": md, "parent": parent})

    # Pass 2: family statistics and the merged encoder's affine fit.
    fit = [fit_directions(stats.xx, stats.xz, p["md"]) for p in plans]
    fstats = [FamilyStats(p["md"], decoder, f, p["parent"]) for p, f in zip(plans, fit)]
    ftops = [SparseTopN(len(p["md"].decoder), cfg.top_contexts) for p in plans] if want_pages else []
    pass2 = [wide, *([chain[0]] if ladder else [])]
    for batch in encode_stream(pass2, store, hook, cfg.batch_tokens, cfg.max_tokens):
        parent_acts = batch.latents[1] if ladder else None
        for k, fs in enumerate(fstats):
            a = fs.update(batch.x - b_dec, batch.latents[0], parent_acts)
            if ftops:
                ftops[k].update(a, batch.addr)
        bar.update(len(batch.x))
    paths = []
    for p, f, fs in zip(plans, fit, fstats):
        alpha, beta = fs.affine()
        arch, tensors = merged_tensors(wide, p["md"], f, alpha, beta)
        info = {
            "cut": p["cut"],
            "direction": cfg.direction,
            "families_report": str((out / "families.json").resolve()),
        }
        p["alpha"], p["beta"], p["arch"] = alpha, beta, arch
        paths.append(
            str(write_merged(out / "merged" / p["name"], wide, cfg.sae, arch, tensors, p["md"], info))
        )

    # Pass 3: the written merged dirs against the exact family code.
    from saepipe.train import load_sae

    merged = [load_sae(p, device=cfg.device) for p in paths]
    exact = [ReconstructionStats() for _ in plans]
    fitted = [ReconstructionStats() for _ in plans]
    agree = [
        np.zeros((3, len(p["md"].decoder)), np.int64) for p in plans
    ]  # both fire, exact fires, fitted fires
    U = [p["md"].decoder.astype(np.float64) for p in plans]
    for batch in encode_stream([wide, *merged], store, hook, cfg.batch_tokens, cfg.max_tokens):
        for k, fs in enumerate(fstats):
            a = fs.codes(batch.latents[0])
            exact[k].update(batch.x, np.asarray(a @ U[k]) + b_dec, a.nnz)
            zf = batch.latents[1 + k]
            fitted[k].update(batch.x, batch.recon[1 + k], zf.nnz)
            ea, fa = sp.csr_matrix(a > 0), sp.csr_matrix(zf > 0)
            agree[k] += np.stack([_col(ea.multiply(fa)), _col(ea), _col(fa)]).astype(np.int64)
        bar.update(len(batch.x))
    bar.close()

    got = wanted_spliced(
        cfg.loss_recovered, store, cfg.store, [cfg.sae, *paths, *(p for _, p in ladder), *(p for _, p in baselines)],
        cfg.eval_contexts, cfg.eval_batch_size, cfg.device, progress,
    )  # fmt: skip
    spliced = {p: {"loss_recovered": v["loss_recovered"], "kl": v["kl"]} for p, v in got.items()}
    tradeoff = [_row(cfg.sae, "wide", wide, recon[0], spliced)]
    for k, (p, path) in enumerate(zip(plans, paths)):
        tradeoff.append(
            {"name": p["name"] + " (exact)", "role": "merged, exact code", "architecture": "wide SAE + sums"}
            | {"d_sae": len(p["md"].decoder), "l0": exact[k].l0, "fvu": exact[k].fvu}
        )
        both, ne, nf = agree[k].sum(1)
        row = _row(path, "merged", merged[k], fitted[k], spliced)
        tradeoff.append(row | {"firing_f1": float(2 * both / max(ne + nf, 1))})
    for (s, p), r in zip(ladder, recon[1 : 1 + len(ladder)]):
        tradeoff.append(_row(p, "ladder", s, r, spliced))
    for (s, p), r in zip(baselines, recon[1 + len(ladder) :]):
        tradeoff.append(_row(p, "baseline", s, r, spliced))

    cut_reports = [
        _cut_report(p, path, fs, ag, decoder, stats, chain[0] if ladder else None)
        for p, path, fs, ag in zip(plans, paths, fstats, agree)
    ]
    report = {
        "sae": cfg.sae,
        "store": cfg.store,
        "hook": hook,
        "settings": cfg.model_dump(),
        "n_tokens": stats.n_tokens,
        "n_latents": m,
        "dead_latents": int((stats.fires == 0).sum()),
        "candidate_pairs": len(pairs.i),
        "pair_cofire": pair_report,
        "merges": len(merges),
        "ladder": [{"path": p, "d_sae": s.d_sae} for s, p in ladder],
        "tradeoff": tradeoff,
        "cuts": cut_reports,
    }
    write_json(out / "families.json", report)
    write_tradeoff(tradeoff, out / "tradeoff.csv")
    if want_pages:
        from saepipe.analyze.family_pages import write_family_pages
        from saepipe.analyze.split_pages import tokenizer_decode

        write_family_pages(
            out, report, tops_wide, tops_parent, ftops, store, tokenizer_decode(store), cfg.splitting
        )
    return report


def cofire_by_cosine(pairs: Candidates, stats: LatentStats, floor: float, max_cofire: float) -> list[dict]:
    """How exclusive similar latents are, measured: for candidate pairs (both alive) with decoder cosine at
    least each band's `cos_min`, quantiles of co-firing (tokens where both fire / the rarer one's firing
    tokens), the share at most `max_cofire` (mergeable), and the median co-firing chance would give."""
    low = np.minimum(stats.fires[pairs.i], stats.fires[pairs.j])
    ok = low > 0
    frac = stats.co[ok] / low[ok]
    chance = stats.fires[pairs.i][ok] * stats.fires[pairs.j][ok] / max(stats.n_tokens, 1) / low[ok]
    out = []
    for lo in sorted(b for b in {floor, 0.3, 0.4, 0.5, 0.7} if b >= floor):
        sel = pairs.cos[ok] >= lo
        if sel.any():
            q = np.quantile(frac[sel], [0.1, 0.5, 0.9])
            out.append({"cos_min": lo, "pairs": int(sel.sum()), "cofire_q10_q50_q90": [float(v) for v in q],
                        "share_exclusive": float((frac[sel] <= max_cofire).mean()),
                        "chance_median": float(np.median(chance[sel]))})  # fmt: skip
    return out


def _col(m: sp.spmatrix) -> np.ndarray:
    return np.asarray(m.sum(axis=0)).ravel()


def _row(path: str, role: str, sae: Any, r: ReconstructionStats, spliced: dict) -> dict:
    return {"name": Path(path).name, "role": role, "architecture": sae.architecture, "d_sae": sae.d_sae,
            "l0": r.l0, "fvu": r.fvu, "path": path} | spliced.get(path, {})  # fmt: skip


def _cut_report(
    plan: dict,
    path: str,
    fs: FamilyStats,
    agree: np.ndarray,
    decoder: np.ndarray,
    stats: LatentStats,
    parent_sae: Any,
) -> dict:
    md: MergedDecoder = plan["md"]
    unit = decoder / np.maximum(np.linalg.norm(decoder, axis=1, keepdims=True), 1e-12)
    cos_u = (unit * md.decoder[md.family]).sum(1) / np.maximum(
        np.linalg.norm(md.decoder[md.family], axis=1), 1e-12
    )
    pdec = None
    if parent_sae is not None:
        pdec = parent_sae.W_dec.detach().float().cpu().numpy()
        pdec = pdec / np.maximum(np.linalg.norm(pdec, axis=1, keepdims=True), 1e-12)
    live = np.flatnonzero(md.family >= 0)
    order = live[np.argsort(md.family[live], kind="stable")]
    starts = np.r_[0, np.cumsum(md.sizes)]
    families = []
    for f in range(len(md.decoder)):
        idx = order[starts[f] : starts[f + 1]]
        both, ne, nf = agree[:, f]
        fam = {
            "family": f,
            "size": int(md.sizes[f]),
            "members": [
                {
                    "latent": int(i),
                    "weight": float(md.weight[i]),
                    "cos": float(cos_u[i]),
                    "fires": int(stats.fires[i]),
                    "mass": float(stats.mass[i]),
                }
                for i in idx
            ],
            **fs.summary(f),
            "firing_f1": float(2 * both / (ne + nf)) if ne + nf else 1.0,
        }
        if md.sizes[f] > 1:
            fam["encoder"] = {"alpha": float(plan["alpha"][f]), "beta": float(plan["beta"][f])}
        if plan["parent"] is not None and plan["parent"][f] >= 0:
            par = int(plan["parent"][f])
            u = md.decoder[f] / max(np.linalg.norm(md.decoder[f]), 1e-12)
            fam["parent"] = {"latent": par, "cos": float(pdec[par] @ u)}
        families.append(fam)
    multi = [fam for fam in families if fam["size"] > 1]
    return {
        "name": plan["name"],
        "cut": plan["cut"],
        "dir": path,
        "architecture": plan["arch"],
        "n_families": len(families),
        "reached": "width" not in plan["cut"] or len(families) <= plan["cut"]["width"],
        "n_merged": len(multi),
        "largest": int(md.sizes.max()) if len(md.sizes) else 0,
        "median_sibling_cofire": median([fam["sibling_cofire"] for fam in multi]),
        "median_energy_kept": median([fam["energy_kept"] for fam in multi]),
        "size_histogram": np.bincount(md.sizes).tolist(),
        "families": families,
    }
