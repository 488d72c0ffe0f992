"""Hook names: accept TransformerLens names as users write them, resolve aliases, list close matches.

`blocks.3.hook_resid_post` is an alias on a TransformerBridge (it fires as `blocks.3.hook_out`); the store
keeps the name the user wrote, and the forward stops right after the last hooked block.
"""

from __future__ import annotations

import contextlib
import difflib
import re
from collections.abc import Callable, Iterator
from typing import Any

import torch

from saepipe.errors import SaepipeError

_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


def _alias_map(bridge: Any) -> dict[str, str]:
    """Every user-facing alias name -> the hook point name it fires as."""
    aliases: dict[str, str] = {}
    for alias, target in (getattr(bridge, "hook_aliases", None) or {}).items():
        targets = [target] if isinstance(target, str) else list(target)
        hit = next((t for t in targets if t in bridge.hook_dict), None)
        if hit is not None:
            aliases[alias] = hit
    for i, block in enumerate(getattr(bridge, "blocks", [])):
        for alias, target in (getattr(block, "hook_aliases", None) or {}).items():
            full = f"blocks.{i}.{target}"
            if full in bridge.hook_dict:
                aliases[f"blocks.{i}.{alias}"] = full
    return aliases


def resolve_hooks(bridge: Any, names: list[str]) -> dict[str, str]:
    """Map each user hook name to the bridge hook point that fires for it, or refuse with close names."""
    aliases = _alias_map(bridge)
    resolved = {}
    for name in names:
        if name in aliases:
            resolved[name] = aliases[name]
        elif name in bridge.hook_dict:
            resolved[name] = name
        else:
            close = difflib.get_close_matches(
                name, list(dict.fromkeys([*aliases, *bridge.hook_dict])), n=4, cutoff=0.6
            )
            hint = f"close names: {', '.join(close)}" if close else "e.g. blocks.0.hook_resid_post"
            raise SaepipeError(f"unknown hook {name!r} for this model; {hint}")
    return resolved


def stop_layer(names: list[str], n_layers: int) -> int | None:
    """The `stop_at_layer` that still runs every hooked block, or None when a hook sits after the blocks."""
    layers = []
    for name in names:
        m = _BLOCK.match(name)
        if m is None:
            if name.startswith(("ln_final", "unembed")):
                return None
            layers.append(0)  # embedding hooks: one block is the least the bridge runs
        else:
            layers.append(int(m.group(1)))
    last = max(layers) + 1
    return None if last >= n_layers else last


@contextlib.contextmanager
def recording(bridge: Any, resolved: dict[str, str]) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, each forward fills the yielded dict {user hook name: activation [B, T, D]}."""
    acts: dict[str, torch.Tensor] = {}

    def make(user_name: str) -> Callable:
        def hook(x: torch.Tensor, hook: Any) -> torch.Tensor:
            acts[user_name] = x.detach()
            return x

        return hook

    with bridge.hooks(fwd_hooks=[(point, make(user)) for user, point in resolved.items()]):
        yield acts
