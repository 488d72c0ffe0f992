"""The harvest stage's `saepipe` subcommands."""

from saepipe.config import Command

COMMANDS = {
    "harvest": Command(
        "run a model over text and store hook activations in a Zarr v3 store",
        "saepipe.harvest.config:HarvestConfig",
        "saepipe.harvest.cli:run",
    ),
    "cache": Command(
        "list, inspect, verify or remove the activation stores in a cache",
        "saepipe.harvest.cache_cli:CacheConfig",
        "saepipe.harvest.cache_cli:run",
    ),
    "synth": Command(
        "generate synthetic activations with known ground-truth features into an ordinary store",
        "saepipe.harvest.config:SynthConfig",
        "saepipe.harvest.synthetic:run",
    ),
}
