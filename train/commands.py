"""The train stage's `saepipe` subcommands."""

from saepipe.config import Command

COMMANDS = {
    "train": Command(
        "train one or several SAEs from one pass over activation stores",
        "saepipe.train.config:TrainConfig",
        "saepipe.train.cli:run",
    ),
}
