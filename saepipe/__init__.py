"""saepipe: harvest activations into Zarr v3 stores, train SAEs on them, analyze what width does.

The three stages live in `saepipe.harvest`, `saepipe.train` and `saepipe.analyze` (folders `harvest/`,
`train/`, `analyze/` at the repo root); this package holds only what all of them share: the user-error
type, the config base class and the one CLI, plus `saepipe.splice`, a re-export of `saepipe.train.splice`
for users (nothing here imports it).
"""

__version__ = "0.1.0"
