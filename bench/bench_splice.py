"""Splicing cost: forward and generation time of the default model with an SAE spliced in vs without.

On SmolLM2-135M (the default model) with a random TopK SAE at blocks.3.hook_resid_post, this times, in
one process: a forward over a batch of contexts clean, with the error term kept and nothing edited (the
hook runs but changes nothing), with the reconstruction (encode + decode), and with one latent clamped
(encode + a rank-one update); and seeded greedy generation clean vs steered. Ratios are spliced / clean
time (1.0 = free). The SAE's weights do not matter for time, so no training is needed.

    python -m bench.bench_splice [--device auto] [--quick] [--width 16384]
"""

from __future__ import annotations

import torch

from bench.common import best_seconds, device_of, parser, record

HOOK = "blocks.3.hook_resid_post"


def main() -> None:
    from saepipe.harvest.models import load_model
    from saepipe.train.saes import build_sae
    from saepipe.train.splice import Splice, generate, run

    p = parser(__doc__)
    p.add_argument("--width", type=int, default=None, help="SAE width (default 16384; quick 4096)")
    args = p.parse_args()
    device = device_of(args.device)
    width = args.width or (4096 if args.quick else 16384)
    batch, ctx, new_tokens = (4, 64, 10) if args.quick else (8, 128, 20)
    model = load_model("smollm2-135m", str(device))
    bridge = model.bridge
    torch.manual_seed(0)
    sae = build_sae("topk", model.d_model, width, k=32).to(device).eval()
    tokens = torch.randint(100, 40000, (batch, ctx), device=device)
    tokens[:, 0] = model.tokenizer.bos_token_id
    cases = {
        "clean": [],
        "error kept, no edit": [Splice(sae, hook=HOOK, keep_error=True)],
        "reconstruction": [Splice(sae, hook=HOOK)],
        "clamp one latent": [Splice(sae, hook=HOOK, keep_error=True, clamp={7: 5.0})],
    }
    seconds = {name: best_seconds(lambda s=s: run(bridge, tokens, s), device) for name, s in cases.items()}
    steer = [Splice(sae, hook=HOOK, keep_error=True, steer={7: 8.0})]
    gen = {
        "clean": best_seconds(lambda: generate(bridge, "The king", [], new_tokens, temperature=0), device),
        "steered": best_seconds(
            lambda: generate(bridge, "The king", steer, new_tokens, temperature=0), device
        ),
    }
    n = batch * ctx
    figures = "; ".join(f"{k} {n / v:,.0f} tok/s" for k, v in seconds.items())
    figures += (
        f"; generation {new_tokens / gen['clean']:,.1f} vs {new_tokens / gen['steered']:,.1f} tok/s steered"
    )
    ratio = ", ".join(f"{k} {v / seconds['clean']:.2f}x" for k, v in seconds.items() if k != "clean")
    ratio += f", generation steered {gen['steered'] / gen['clean']:.2f}x (time vs clean)"
    setting = f"default model {HOOK}, TopK width {width}, batch {batch}x{ctx}, {new_tokens} generated tokens"
    print(f"{setting}\n{figures}\n{ratio}")
    record(args, "splice overhead", setting, figures, ratio)


if __name__ == "__main__":
    main()
