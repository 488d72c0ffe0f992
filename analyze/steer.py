"""`saepipe steer`: continue a prompt with and without an intervention on SAE latents, side by side.

    saepipe steer --sae runs/topk-w2048-k32 --latent 812=2 --latent 97 --scale 8 --prompt "The king" --tokens 30

Both continuations are sampled with the same seed from the same model, so they differ only by the
intervention (saepipe.splice with the SAE's error term kept): `--mode steer` adds VALUE x scale x each
latent's decoder row at every position but the BOS; `clamp` sets the latents to VALUE x scale; `ablate` to 0.
The model is the SAE's own (refused when its weights differ from those the SAE was trained on).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from saepipe.analyze.config import SteerConfig
from saepipe.errors import SaepipeError
from saepipe.files import write_text_atomic
from saepipe.harvest.devices import resolve_device
from saepipe.train import load_sae
from saepipe.train.splice import Splice, generate, load_model_for


@dataclass(frozen=True)
class SteerResult:
    prompt: str
    mode: str
    latents: dict[int, float]
    """Latent -> VALUE x scale as applied."""
    seed: int
    temperature: float
    without: str
    with_intervention: str

    def text(self) -> str:
        what = ", ".join(f"{i}={v:g}" for i, v in self.latents.items())
        return "\n".join(
            [
                f"prompt: {self.prompt!r}",
                f"{self.mode} latents {what} (seed {self.seed}, temperature {self.temperature:g})",
                "--- without ---",
                self.prompt + self.without,
                f"--- with {self.mode} ---",
                self.prompt + self.with_intervention,
            ]
        )


def intervention(cfg: SteerConfig, sae) -> Splice:
    latents = cfg.latents()
    if cfg.mode == "ablate":
        return Splice(sae, keep_error=True, ablate=list(latents))
    if cfg.mode == "clamp":
        return Splice(sae, keep_error=True, clamp=latents)
    return Splice(sae, keep_error=True, steer=latents)


def steer(cfg: SteerConfig) -> SteerResult:
    if not Path(cfg.sae).is_dir():
        raise SaepipeError(f"--sae {cfg.sae}: no such directory; give an SAE dir written by `saepipe train`")
    device = resolve_device(cfg.device)
    sae = load_sae(cfg.sae, device)
    splice = intervention(cfg, sae)  # refuses out-of-range latents before the model loads
    model = load_model_for(sae, cfg.model, str(device))
    bridge = model.bridge
    ids = bridge.to_tokens(cfg.prompt)
    if ids.shape[1] + cfg.tokens > model.n_ctx:
        raise SaepipeError(
            f"--prompt is {ids.shape[1]} tokens; with --tokens {cfg.tokens} that exceeds the model's context of "
            f"{model.n_ctx} tokens; shorten the prompt or lower --tokens"
        )
    kwargs = {"tokens": cfg.tokens, "seed": cfg.seed, "temperature": cfg.temperature}
    (without,) = generate(bridge, ids, [], **kwargs)
    (with_,) = generate(bridge, ids, [splice], **kwargs)
    return SteerResult(cfg.prompt, cfg.mode, cfg.latents(), cfg.seed, cfg.temperature, without, with_)


def run(cfg: SteerConfig) -> int:
    result = steer(cfg)
    print(result.text())
    if cfg.out:
        path = Path(cfg.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(
            path, json.dumps({**asdict(result), "sae": cfg.sae, "scale": cfg.scale}, indent=2) + "\n"
        )
    return 0
