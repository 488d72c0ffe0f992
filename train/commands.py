"""The train stage's `saepipe` subcommands."""

from saepipe.config import Command

COMMANDS = {
    "train": Command(
        "train one or several SAEs from one pass over activation stores",
        "saepipe.train.config:TrainConfig",
        "saepipe.train.cli:run",
    ),
    "refit": Command(
        "re-solve a trained TopK SAE's decoder with matching-pursuit codes and write it as a new SAE dir",
        "saepipe.train.refit:RefitConfig",
        "saepipe.train.refit:run",
    ),
}
