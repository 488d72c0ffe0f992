"""`import saepipe.splice`: run a model with SAEs spliced in (reconstruct, keep the error term, ablate,
clamp, steer) from Python. The implementation is `saepipe.analyze.splice` (it needs the harvest stage's
model loading and the train stage's SAEs); this module only re-exports it, and nothing in the bottom
layer (`saepipe.config`, `saepipe.errors`, `saepipe.cli`) imports it. See that module for the contract.
"""

from saepipe.analyze.splice import (
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
