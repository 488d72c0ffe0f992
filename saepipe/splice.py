"""`import saepipe.splice`: run a model with SAEs spliced in (reconstruct, keep the error term, ablate,
clamp, steer) from Python. The implementation is `saepipe.train.splice`: it needs the harvest stage's model
loading and the train stage's SAEs, and training itself splices through it (`saepipe train --eval-every`),
so it sits in the train stage, below analyze. This module only re-exports it; nothing in the bottom layer
(`saepipe.config`, `saepipe.errors`, `saepipe.cli`) imports it. See `saepipe.train.splice` for the contract.
"""

from saepipe.train.splice import (
    Observed,
    Splice,
    generate,
    load_model_for,
    patched,
    run,
    spliced,
    zero_ablated,
)

__all__ = ["Observed", "Splice", "generate", "load_model_for", "patched", "run", "spliced", "zero_ablated"]
