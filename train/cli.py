"""`saepipe train`: train the SAEs, then print where they are.

    one process:    saepipe train --store STORE --hook blocks.3.hook_resid_post --arch topk --width 4096 \
                        --k 32 --tokens 10000000 --out RUN
    several GPUs:   accelerate launch --multi_gpu --num_processes 8 -m saepipe train ...   (same flags)
    several nodes:  see saepipe.train.distributed
"""

from __future__ import annotations

from saepipe.train import distributed
from saepipe.train.config import TrainConfig
from saepipe.train.trainer import train


def run(cfg: TrainConfig) -> int:
    try:
        res = train(cfg)
        if not res.already_complete:
            rate = res.tokens / max(res.seconds, 1e-9)
            distributed.print0(
                f"trained {len(res.sae_dirs)} SAE(s) for {res.steps:,} steps ({res.tokens:,} tokens, "
                f"{rate:,.0f} tokens/s) into {res.out}: {', '.join(p.name for p in res.sae_dirs.values())}"
            )
        return 0
    finally:
        distributed.shutdown()
