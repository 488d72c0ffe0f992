"""SAELens's activation cache (`CacheActivationsRunner`) over given tokens; run by bench/bench_harvest.py
with the python of a separate SAELens virtualenv (sae-lens pins transformer-lens below 4; saepipe needs 4).

    <saelens-venv>/bin/python bench/saelens_cache.py --model-dir DIR --tokens TOKENS.npy --hook HOOK --out DIR

Imports nothing from saepipe. Prints one JSON line: tokens, seconds (the runner's `run()`, model loading
excluded, as saepipe's harvest figure excludes it), bytes on disk, versions.

The model is the local Hugging Face checkpoint saepipe converts the default model into. TransformerLens 3.x
reads a local checkpoint's config and weights, but `HookedTransformer.from_pretrained` first checks the
name against its list of official models, where SmolLM2 is absent; the directory is added to that list
for this process, and the runner then loads it exactly as it loads any model
(`from_pretrained_no_processing`, float32).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", required=True)
    p.add_argument("--tokens", required=True, help=".npy of int32 [n_contexts, context_size], BOS included")
    p.add_argument("--hook", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--buffer-tokens", type=int, default=32768, help="tokens per cached shard")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()

    import datasets
    import sae_lens
    import torch
    import transformer_lens
    from sae_lens import CacheActivationsRunner, CacheActivationsRunnerConfig
    from transformer_lens import supported_models

    datasets.disable_progress_bars()
    model_dir = str(Path(args.model_dir).resolve())
    supported_models.OFFICIAL_MODEL_NAMES.append(model_dir)  # see the module docstring
    tokens = np.load(args.tokens, allow_pickle=False)
    n, T = tokens.shape
    ds = datasets.Dataset.from_dict({"input_ids": tokens.astype(np.int64).tolist()})
    d_in = int(json.loads((Path(model_dir) / "config.json").read_text())["hidden_size"])
    buffer_tokens = min(args.buffer_tokens, n * T)
    if (n * T) % buffer_tokens:  # the runner fills whole buffers, cycling the dataset to do so
        raise SystemExit(f"{n * T} tokens are not a whole number of {buffer_tokens}-token buffers")
    cfg = CacheActivationsRunnerConfig(
        dataset_path=args.tokens,  # only names the run; the tokens come from `override_dataset`
        model_name=model_dir,
        model_batch_size=args.batch_size,
        hook_name=args.hook,
        d_in=d_in,
        training_tokens=n * T,
        context_size=T,
        new_cached_activations_path=args.out,
        dtype="float32",
        device=args.device,
        buffer_size_gb=(buffer_tokens * d_in * 4 + 1) / 1e9,  # + 1: float rounding must not lose a token
        prepend_bos=False,  # the tokens already start with BOS
    )
    runner = CacheActivationsRunner(cfg, override_dataset=ds)  # loads the model
    t0 = time.perf_counter()
    out = runner.run()
    seconds = time.perf_counter() - t0
    disk = sum(f.stat().st_size for f in Path(args.out).rglob("*") if f.is_file())
    print(
        json.dumps(
            {
                "tokens": len(out) * T,
                "seconds": seconds,
                "bytes": disk,
                "sae_lens": sae_lens.__version__,
                "transformer_lens": getattr(transformer_lens, "__version__", "?"),
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "pid": os.getpid(),
            }
        )
    )


if __name__ == "__main__":
    main()
