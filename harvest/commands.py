"""The harvest stage's `saepipe` subcommands."""

from saepipe.config import Command

COMMANDS = {
    "harvest": Command(
        "run a model over text and store hook activations in a Zarr v3 store",
        "saepipe.harvest.config:HarvestConfig",
        "saepipe.harvest.cli:run",
    ),
}
