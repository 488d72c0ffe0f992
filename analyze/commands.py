"""The analyze stage's `saepipe` subcommands."""

from saepipe.config import Command

COMMANDS = {
    "analyze": Command(
        "stream a store through a trained SAE: top contexts, statistics, ranking, dashboard",
        "saepipe.analyze.config:AnalyzeConfig",
        "saepipe.analyze.cli:run",
    ),
    "evaluate": Command(
        "splice an SAE into its model and report loss recovered, KL, FVU, L0 on held-out text",
        "saepipe.analyze.config:EvaluateConfig",
        "saepipe.analyze.cli:run_evaluate",
    ),
    "steer": Command(
        "generate from a prompt with and without steering, clamping or ablating SAE latents, side by side",
        "saepipe.analyze.config:SteerConfig",
        "saepipe.analyze.steer:run",
    ),
    "recovery": Command(
        "score an SAE trained on synthetic data against the true features, by feature frequency",
        "saepipe.analyze.config:RecoveryConfig",
        "saepipe.analyze.recovery:run",
    ),
    "families": Command(
        "group a wide SAE's latents into split families and write merged SAE dirs (one latent per family)",
        "saepipe.analyze.families_cmd:FamiliesConfig",
        "saepipe.analyze.families_cmd:run",
    ),
    "splitting": Command(
        "build split trees across a width ladder of SAEs and the sparsity-reconstruction frontier",
        "saepipe.analyze.config:SplittingConfig",
        "saepipe.analyze.splitting:run",
    ),
}
