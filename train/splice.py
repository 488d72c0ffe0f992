"""Run a model with SAEs spliced in at their hooks: reconstruct, keep the error term, ablate, clamp, steer.

    from saepipe.splice import Splice, load_model_for, spliced, generate
    from saepipe.train import load_sae

    sae = load_sae("runs/topk-w4096-k32")
    model = load_model_for(sae)                      # the SAE's model, checked against its fingerprint
    with spliced(model.bridge, Splice(sae, keep_error=True, clamp={12: 8.0})):
        logits = model.bridge(tokens)                # any forward, batch or generation, CPU or GPU
    texts = generate(model.bridge, "The king", [Splice(sae, steer={12: 4.0})], tokens=20, seed=0)

At an SAE's hook, for activations x [batch, pos, d_in] (float32 whatever the model's dtype):

    z  = encode(x);  z' = z with `ablate` latents set to 0 and `clamp` latents set to their values
    keep_error=False   x -> decode(z')                              replace with the reconstruction
    keep_error=True    x -> x + decode(z') - decode(z)              only the edited latents change
                          = x + (z' - z) @ W_dec                    (computed so: exactly x when z' = z)
    steer              ... + sum_l steer[l] * W_dec[l]             added last (no encoding needed)

Several SAEs (at one hook or several) splice in order. Hooks are added in a context manager and removed
in `finally` (the bridge's own `hooks`), so an exception never leaves a model spliced. This is the one
splicing path: `saepipe evaluate`, `saepipe steer` and training's `--eval-every` (train/faithfulness.py)
all go through it, which is why it sits in the train stage (analyze imports train, never the reverse).

BOS: with `skip_bos` (default), a BOS token at the start of a row (after any left padding) keeps its
activation: training drops that position (its norm is an outlier) and `saepipe evaluate` leaves it alone.
Token ids are read at the bridge's `embed.hook_in` on each forward, so this holds for batches, left-padded
prompts and KV-cached generation (whose later steps hold no BOS). `skip_tokens` keeps the activations of
positions holding those ids anywhere in a row: an SAE trained with `saepipe train --drop-special` never saw
BOS/EOS separators, so `saepipe evaluate` leaves them alone (issue 19).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from saepipe.errors import SaepipeError
from saepipe.harvest.devices import resolve_device
from saepipe.harvest.hooks import resolve_hooks
from saepipe.harvest.models import LoadedModel, load_model
from saepipe.train.sae_dir import SAERecord
from saepipe.train.saes import SAE

TOKENS_HOOK = "embed.hook_in"
"""The bridge hook whose input is the forward's token ids [batch, pos]."""


@dataclass(frozen=True)
class Observed:
    """What a splice saw at the positions it changed (for metrics): all float32 on the model's device."""

    x: torch.Tensor  # [n, d_in] the model's activations
    z: torch.Tensor  # [n, d_sae] their code, before any edit
    recon: torch.Tensor  # [n, d_in] decode(z)


@dataclass
class Splice:
    """One SAE spliced at its hook (`hook`, default the SAE's `hook_name`); see the module docstring."""

    sae: SAE
    keep_error: bool = False
    """Add back the SAE's error x - decode(z), so that only edited latents change the model."""
    ablate: Sequence[int] = ()
    """Latents set to 0."""
    clamp: Mapping[int, float] = field(default_factory=dict)
    """Latents set to a value."""
    steer: Mapping[int, float] = field(default_factory=dict)
    """Latent -> coefficient: that multiple of its decoder row is added to the activations."""
    hook: str | None = None
    observe: Callable[[Observed], None] | None = None
    """Called with each forward's activations and code (it sees the spliced positions only)."""

    def __post_init__(self) -> None:
        self.hook = self.hook or getattr(self.sae, "cfg", {}).get("hook_name")
        if not self.hook:
            raise SaepipeError("no hook: this SAE's cfg.json names no hook_name; give Splice(..., hook=...)")
        d_sae = self.sae.d_sae
        for latent in [*self.ablate, *self.clamp, *self.steer]:
            if not 0 <= int(latent) < d_sae:
                raise SaepipeError(
                    f"latent {latent} is out of range: the SAE has {d_sae} latents (0..{d_sae - 1})"
                )

    @property
    def edited(self) -> list[int]:
        return sorted({int(i) for i in self.ablate} | {int(i) for i in self.clamp})

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """[n, d_in] float32 activations -> what the model continues with (differentiable in x)."""
        sae, edited = self.sae, self.edited
        if x.shape[-1] != sae.d_in:
            raise SaepipeError(
                f"hook {self.hook} gives activations of width {x.shape[-1]} but the SAE reads d_in={sae.d_in}: "
                "it is an SAE of another model or hook"
            )
        if self.keep_error and not edited and self.observe is None:
            out = x  # nothing to change: no encoding at all
        else:
            z = sae.encode(x)
            recon = sae.decode(z) if (self.observe is not None or not (self.keep_error or edited)) else None
            if self.observe is not None:
                self.observe(Observed(x, z, recon))
            if not edited:
                out = x if self.keep_error else recon
            else:
                z_new = z.clone()
                for latent in self.ablate:
                    z_new[:, int(latent)] = 0.0
                for latent, value in self.clamp.items():
                    z_new[:, int(latent)] = float(value)
                if self.keep_error:
                    idx = torch.tensor(edited, device=x.device, dtype=torch.long)
                    out = x + (z_new[:, idx] - z[:, idx]) @ sae.W_dec[idx]
                else:
                    out = sae.decode(z_new)
        if self.steer:
            out = out + self.steering_vector().to(out.device)
        return out

    def steering_vector(self) -> torch.Tensor:
        """[d_in]: sum over `steer` of coefficient x decoder row."""
        idx = torch.tensor([int(i) for i in self.steer], device=self.sae.W_dec.device, dtype=torch.long)
        coef = torch.tensor(list(self.steer.values()), device=idx.device, dtype=torch.float32)
        return (coef[:, None] * self.sae.W_dec.detach()[idx].float()).sum(0)


def _bos_mask(ids: torch.Tensor, bos: int | None, pad: int | None) -> torch.Tensor | None:
    """[batch, pos] True at a row's leading BOS tokens (those preceded only by padding or BOS)."""
    if bos is None or ids.dim() != 2:
        return None
    is_bos = ids == bos
    leading = is_bos | (ids == pad) if pad is not None else is_bos
    return is_bos & leading.long().cumprod(dim=1).bool()


def _bos_ids(bridge: Any) -> tuple[int | None, int | None]:
    tok = getattr(bridge, "tokenizer", None)
    if tok is None:
        return None, None
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id  # as harvest packs it
    return bos, tok.pad_token_id


def _model_device(bridge: Any) -> torch.device:
    return next(bridge.parameters()).device


@contextlib.contextmanager
def patched(
    bridge: Any,
    fns: Sequence[tuple[str, Callable[[torch.Tensor], torch.Tensor]]],
    skip_bos: bool = True,
    skip_tokens: Sequence[int] = (),
) -> Iterator[Any]:
    """Within the block, each (hook name, fn) maps the activations [n, d] of every position (but leading
    BOS tokens when `skip_bos`, and positions holding one of `skip_tokens` anywhere) through `fn`, in
    float32; removed in `finally`. Yields the bridge."""
    points = resolve_hooks(bridge, list(dict.fromkeys(name for name, _ in fns)))
    state: dict[str, torch.Tensor | None] = {"skip": None}
    bos, pad = _bos_ids(bridge)
    special = torch.tensor(sorted({int(t) for t in skip_tokens}), dtype=torch.long)
    hooks: list[tuple[str, Callable]] = []
    if skip_bos or len(special):
        if TOKENS_HOOK not in bridge.hook_dict:
            raise SaepipeError(
                f"this model has no {TOKENS_HOOK} hook to find BOS tokens at; splice with skip_bos=False"
            )

        def tokens(ids: torch.Tensor, hook: Any) -> torch.Tensor:
            skip = None
            if not ids.is_floating_point():
                skip = _bos_mask(ids, bos, pad) if skip_bos else None
                if len(special):  # tokens the SAE never trained on (saepipe train --drop-special)
                    held = torch.isin(ids, special.to(ids.device))
                    skip = held if skip is None else skip | held
            state["skip"] = skip
            return ids

        hooks.append((TOKENS_HOOK, tokens))

    def make(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
        def hook(x: torch.Tensor, hook: Any) -> torch.Tensor:
            skip = state["skip"]
            if skip is not None and skip.shape != x.shape[:2]:
                skip = None  # not a [batch, pos, d] activation of this forward's tokens
            xf = x.float()
            if skip is None or not bool(skip.any()):
                return fn(xf.reshape(-1, x.shape[-1])).reshape(x.shape).to(x.dtype)
            out = xf.clone()
            keep = ~skip
            out[keep] = fn(xf[keep])
            return out.to(x.dtype)

        return hook

    hooks += [(points[name], make(fn)) for name, fn in fns]
    with bridge.hooks(fwd_hooks=hooks):  # TransformerBridge removes its hooks in a finally
        yield bridge


@contextlib.contextmanager
def spliced(
    bridge: Any, *splices: Splice, skip_bos: bool = True, skip_tokens: Sequence[int] = ()
) -> Iterator[Any]:
    """Within the block, every forward of `bridge` runs with these SAEs spliced in (moved to its device),
    except at leading BOS tokens (`skip_bos`) and at positions holding `skip_tokens`."""
    device = _model_device(bridge)
    for s in splices:
        s.sae.to(device)
    with patched(bridge, [(s.hook, s) for s in splices], skip_bos=skip_bos, skip_tokens=skip_tokens):
        yield bridge


@contextlib.contextmanager
def zero_ablated(
    bridge: Any, hook: str, skip_bos: bool = True, skip_tokens: Sequence[int] = ()
) -> Iterator[Any]:
    """Within the block, the activations at `hook` are zero (leading BOS tokens kept when `skip_bos`, and
    positions holding `skip_tokens`)."""
    with patched(bridge, [(hook, torch.zeros_like)], skip_bos=skip_bos, skip_tokens=skip_tokens):
        yield bridge


@torch.inference_mode()
def run(
    bridge: Any, tokens: torch.Tensor, splices: Sequence[Splice] = (), skip_bos: bool = True
) -> torch.Tensor:
    """Logits [batch, pos, d_vocab] of `tokens` [batch, pos] with `splices` in place."""
    with spliced(bridge, *splices, skip_bos=skip_bos):
        return bridge(tokens.to(_model_device(bridge)), return_type="logits")


@torch.inference_mode()
def generate(
    bridge: Any,
    prompt: str | list[str] | torch.Tensor,
    splices: Sequence[Splice] = (),
    tokens: int = 20,
    seed: int = 0,
    temperature: float = 1.0,
    skip_bos: bool = True,
) -> list[str]:
    """Continuations of `prompt` (a text, texts, or token ids [batch, pos]) with `splices` in place, one per
    prompt, each cut at its first EOS.

    Sampling is seeded, so two calls with the same seed differ only by their splices; temperature 0 is
    greedy. Generation uses the bridge's KV cache (texts of different lengths are left-padded by the
    bridge); every step is spliced."""
    if isinstance(prompt, torch.Tensor):
        prompt = prompt.to(_model_device(bridge))
    torch.manual_seed(seed)  # seeds every CUDA device too
    with spliced(bridge, *splices, skip_bos=skip_bos), warnings.catch_warnings():
        # transformers deprecates the argument name the bridge's KV-cached loop passes; not the user's doing
        warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)
        out, ids = bridge.generate(
            prompt,
            max_new_tokens=tokens,
            do_sample=temperature > 0,
            temperature=max(temperature, 1e-8),
            verbose=False,
            return_type="tokens",
            return_input_tokens=True,
        )
    eos = bridge.tokenizer.eos_token_id
    texts = []
    for row in out[:, ids.shape[1] :].tolist():
        if eos in row:
            row = row[: row.index(eos)]
        texts.append(bridge.tokenizer.decode(row))
    return texts


def load_model_for(sae: SAE, model: str | None = None, device: str = "auto") -> LoadedModel:
    """The model an SAE was trained on (`model`, default the cfg's model_name), refused when its weights
    are not those the SAE's activations came from or its width is not the SAE's input width."""
    record = SAERecord.of(sae)
    name = model or record.model_name
    if not name:
        raise SaepipeError("the SAE's cfg.json names no model_name; give the model (--model)")
    loaded = load_model(name, str(resolve_device(device)))
    if loaded.d_model != sae.d_in:
        raise SaepipeError(
            f"model {name} has d_model={loaded.d_model} but the SAE reads d_in={sae.d_in}: it is an SAE of "
            "another model; give the model it was trained on"
        )
    fingerprints = record.model_fingerprints
    if fingerprints and loaded.fingerprint not in fingerprints:
        raise SaepipeError(
            f"model {name} does not have the weights the SAE was trained on (fingerprints differ): it is an SAE "
            "of another model; give the model it was trained on"
        )
    return loaded


__all__ = [
    "Observed",
    "Splice",
    "generate",
    "load_model_for",
    "patched",
    "run",
    "spliced",
    "zero_ablated",
]
