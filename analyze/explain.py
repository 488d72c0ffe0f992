"""The deterministic explainer: a latent's explanation is the smallest set of short n-grams (a token with up
to two tokens of left context) that covers most of its activation mass, precisely, on its build examples.

    "Cleopatra" after " attendant on" (81% of the activation); " Egypt" (12%)

An n-gram is the token a latent fires on plus 0, 1 or 2 tokens before it, so an explanation can say
"this token" or "this token after that one": what separates a latent firing on every "Cleopatra" from one
firing on "Cleopatra" only after "attendant on". Keys are int64 (`ngram_key`): a context slot holds
`OUTSIDE` before the start of a context (so "at the start of a context" is expressible too).

The greedy cover (Bills et al. 2023 and delphi explain from top and sampled contexts with a language
model; this is the offline, deterministic counterpart): start empty; at each step add the candidate
n-gram (any n-gram ending at an active build position) that most increases

    F = 2 P R / (P + R),  P = active matches / all matches (precision),  R = matched activation / all activation

and stop when nothing increases F or `MAX_PATTERNS` are chosen; only n-grams that cover at least
`MIN_SHARE` of the activation mass are candidates. The set is kept an antichain under "is a
suffix of" (adding `X` removes a chosen `Y X`; `Y X` is never added beside `X`): two n-grams match the
same position only if one is a suffix of the other, so an antichain's matches are disjoint and its counts
add up. Ties go to the shorter n-gram (the more general explanation), then the larger mass, then the key.

Each chosen n-gram predicts, where it matches, its mean activation over all its build matches (active or
not): a calibrated guess of the latent's value, which the scorers (saepipe.analyze.scoring) compare with
held-out activations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

MAX_CONTEXT = 2
"""Tokens of left context an n-gram may carry."""
MAX_PATTERNS = 8
"""Most n-grams in one explanation."""
MIN_SHARE = 0.01
"""An n-gram must cover at least this fraction of the latent's build activation mass to be chosen (keeps
explanations short and the candidate lists small)."""
OUTSIDE = -1
"""Token id of a slot before the start of a context (and of window slots outside it)."""
_SLOT = 1 << 20  # token slot values: 0 unspecified, 1 OUTSIDE, t + 2 a token (vocabularies below ~1M)


def ngram_key(m: np.ndarray, t0: np.ndarray, t1: np.ndarray, t2: np.ndarray) -> np.ndarray:
    """int64 key of the n-gram `t2 t1 t0` with `m` tokens of left context (t1, t2 ignored beyond m)."""
    m = np.asarray(m, dtype=np.int64)
    a = np.asarray(t0, dtype=np.int64) + 2
    b = np.where(m >= 1, np.asarray(t1, dtype=np.int64) + 2, 0)
    c = np.where(m >= 2, np.asarray(t2, dtype=np.int64) + 2, 0)
    return m + 3 * (a + _SLOT * (b + _SLOT * c))


def decode_key(key: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(m, t0, t1, t2) of keys; unspecified context slots come back as -2."""
    key = np.asarray(key, dtype=np.int64)
    m, rest = key % 3, key // 3
    a, rest = rest % _SLOT, rest // _SLOT
    b, c = rest % _SLOT, rest // _SLOT
    return m, a - 2, b - 2, c - 2


def window_keys(tokens_NW: np.ndarray) -> np.ndarray:
    """[N, W, 3] keys of the n-grams ending at each slot with 0, 1, 2 tokens of context; slots before the
    window's start read as OUTSIDE (callers treat those slots as unknown context and skip them)."""
    t = np.asarray(tokens_NW, dtype=np.int64)
    pad = np.full((t.shape[0], MAX_CONTEXT), OUTSIDE, dtype=np.int64)
    tp = np.concatenate([pad, t], 1)
    t1, t2 = tp[:, 1:-1], tp[:, :-2]
    return np.stack([ngram_key(m, t, t1, t2) for m in range(MAX_CONTEXT + 1)], -1)


@dataclass
class Explanation:
    """A set of n-grams (an antichain: disjoint matches) with what each predicts and covers."""

    keys: np.ndarray  # [n] int64, sorted
    predicted: np.ndarray  # [n] float64: mean activation over the n-gram's build matches
    share: np.ndarray  # [n] float64: fraction of the build activation mass it covers
    precision: np.ndarray  # [n] float64: active build matches / all build matches

    @staticmethod
    def empty() -> Explanation:
        z = np.zeros(0)
        return Explanation(np.zeros(0, dtype=np.int64), z, z, z)

    def predict(self, keys: np.ndarray) -> np.ndarray:
        """Predicted activation at positions with n-gram keys [..., 3] (0 where nothing matches)."""
        if len(self.keys) == 0:
            return np.zeros(keys.shape[:-1])
        i = np.searchsorted(self.keys, keys).clip(max=len(self.keys) - 1)
        hit = self.keys[i] == keys
        return np.where(hit, self.predicted[i], 0.0).max(-1)

    def text(self, vocab: Callable[[int], str]) -> str:
        """The explanation as one line, largest share first: `"X" after "Y" (81%); "Z" (12%)`."""
        if len(self.keys) == 0:
            return "(no explanation: no active build example)"
        parts = []
        for j in np.argsort(-self.share, kind="stable"):
            m, t0, t1, t2 = (int(v) for v in decode_key(self.keys[j]))
            left = [t for t in (t2, t1)[2 - m :]]
            s = _quote(vocab(t0))
            if m:
                if left[0] == OUTSIDE:
                    ctx = "".join(vocab(t) for t in left[1:])
                    s += " at the start of a context" + (f" after {_quote(ctx)}" if ctx else "")
                else:
                    s += f" after {_quote(''.join(vocab(t) for t in left))}"
            parts.append(f"{s} ({100 * self.share[j]:.0f}%)")
        return "; ".join(parts)


def _quote(s: str) -> str:
    return '"' + s.replace("\n", "\\n") + '"'


def explain(
    active_keys: np.ndarray,
    active_acts: np.ndarray,
    match_count: Callable[[np.ndarray], np.ndarray],
    max_patterns: int = MAX_PATTERNS,
) -> Explanation:
    """The greedy cover above. active_keys [A, 3]: the n-gram keys of every active build position
    (context 0, 1, 2); active_acts [A] their activations; match_count(keys) -> how many build positions
    (active or not) each key matches. Simple and per latent: saepipe.analyze.explain_fast is the batched
    path for all latents at once, tested equal to this."""
    if len(active_acts) == 0:
        return Explanation.empty()
    cand, inverse = np.unique(active_keys, return_inverse=True)
    inverse = inverse.reshape(active_keys.shape)
    n_act = np.bincount(inverse.ravel(), minlength=len(cand)).astype(np.float64)
    mass = np.bincount(inverse.ravel(), weights=np.repeat(active_acts, 3), minlength=len(cand))
    total = float(active_acts.sum())
    big = mass >= MIN_SHARE * total
    cand, n_act, mass = cand[big], n_act[big], mass[big]
    n_match = match_count(cand).astype(np.float64)
    if (n_match < n_act).any():
        raise ValueError("match_count must count every active position too")
    chosen = choose(cand, n_act, mass, n_match, total, max_patterns)
    order = np.sort(chosen)  # cand is sorted, so keys stay sorted
    return Explanation(
        keys=cand[order],
        predicted=mass[order] / n_match[order],
        share=mass[order] / total,
        precision=n_act[order] / n_match[order],
    )


def suffix_of(g: np.ndarray, h: np.ndarray) -> np.ndarray:
    """[len(g), len(h)] bool: n-gram g[i] is a suffix of h[j] (matches wherever h[j] matches)."""
    mg, ag, bg, cg = (x[:, None] for x in decode_key(g))
    mh, ah, bh, ch = (x[None, :] for x in decode_key(h))
    return (mg <= mh) & (ag == ah) & ((mg < 1) | (bg == bh)) & ((mg < 2) | (cg == ch))


def f_score(n_act: np.ndarray, mass: np.ndarray, n_match: np.ndarray, total: float) -> np.ndarray:
    p = np.divide(n_act, n_match, out=np.zeros_like(n_act), where=n_match > 0)
    r = mass / total
    return np.divide(2 * p * r, p + r, out=np.zeros_like(p), where=(p + r) > 0)


def choose(
    cand: np.ndarray,
    n_act: np.ndarray,
    mass: np.ndarray,
    n_match: np.ndarray,
    total: float,
    max_patterns: int,
) -> np.ndarray:
    """Indices into `cand` of the greedy antichain (see the module docstring)."""
    m = decode_key(cand)[0]
    chosen: list[int] = []
    cur = np.zeros(3)  # active matches, mass, matches of the chosen set
    best_f = 0.0
    while len(chosen) < max_patterns:
        ch = np.array(chosen, dtype=np.int64)
        if len(ch):
            sub = suffix_of(cand, cand[ch])  # [C, |chosen|]: candidate is a suffix of a chosen one
            implied = suffix_of(cand[ch], cand).any(0)  # a chosen n-gram already matches wherever it does
            drop = sub.astype(np.float64)
            new = cur[None, :] - np.stack([drop @ n_act[ch], drop @ mass[ch], drop @ n_match[ch]], 1)
        else:
            implied = np.zeros(len(cand), dtype=bool)
            new = np.zeros((len(cand), 3))
        new += np.stack([n_act, mass, n_match], 1)
        f = f_score(new[:, 0], new[:, 1], new[:, 2], total)
        f[implied] = -1.0
        # best F, then fewer context tokens, then more mass, then the smaller key (cand is sorted)
        j = int(np.lexsort((np.arange(len(cand)), -mass, m, -f))[0])
        if not f[j] > best_f + 1e-12:
            break
        if len(ch):
            chosen = [c for c, s in zip(chosen, sub[j]) if not s]
        chosen.append(j)
        cur, best_f = new[j], float(f[j])
    return np.array(chosen, dtype=np.int64)
