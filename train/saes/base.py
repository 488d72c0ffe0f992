"""The one small base every SAE architecture shares: parameters, inference, and the training step.

Parameters use the SAE dir's names and shapes (train/sae_dir.py): W_enc [d_in, d_sae], b_enc [d_sae],
W_dec [d_sae, d_in], b_dec [d_in]. Encoding always starts from pre = (x - b_dec) @ W_enc + b_enc.

An architecture (one file each, registered in `saepipe.train.saes.ARCHITECTURES`) fills in four hooks:
`encode` (inference), `support` (which (token, latent) pairs may be non-zero in training, chosen without
autograd), `activation` (the differentiable values at those pairs) and `extra_losses` (sparsity and
auxiliary terms). The base turns these into a loss using only the active pairs (saes/sparse.py), so a
new architecture gets the fast path and its dense reference for free.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from saepipe.train import distributed
from saepipe.train.saes.sparse import gather_pre, sparse_decode


@dataclass
class SparseCode:
    """Active pairs of a batch: `rows` (token, sorted), `latents` and differentiable `values`, all [nnz]."""

    rows: torch.Tensor
    latents: torch.Tensor
    values: torch.Tensor
    n_tokens: int

    def select(self, keep: torch.Tensor) -> SparseCode:
        return SparseCode(self.rows[keep], self.latents[keep], self.values[keep], self.n_tokens)


@dataclass
class TrainOutput:
    """What one training forward gives the trainer."""

    loss: torch.Tensor
    """Scalar to backpropagate (sum of `terms`)."""
    terms: dict[str, torch.Tensor]
    """Detached loss terms as added into `loss` (weights applied), for logging."""
    recon: torch.Tensor
    """[n, d_in] detached reconstruction of the full dictionary."""
    fire_counts: torch.Tensor
    """[d_sae] int64: on how many tokens of this batch each latent was non-zero."""
    state_stats: dict[str, torch.Tensor] = field(default_factory=dict)
    """Batch statistics the architecture folds into its state (averaged over ranks first)."""


def mse(x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """Squared error summed over d_in, averaged over tokens."""
    return (x - recon).pow(2).sum(-1).mean()


ARCHITECTURES: dict[str, type[SAE]] = {}
"""Architecture name -> class; filled as the modules in this package are imported."""


class SAE(nn.Module):
    """A sparse autoencoder; subclasses set the class attributes and the four hooks."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "architecture" in cls.__dict__:
            ARCHITECTURES[cls.architecture] = cls

    architecture: ClassVar[str]
    uses_k: ClassVar[bool] = False
    """Whether the architecture takes `k` (active latents per token)."""
    has_threshold: ClassVar[bool] = False
    """Whether the SAE dir carries a `threshold` [d_sae] tensor."""
    unit_norm_decoder: ClassVar[bool] = True
    """Keep decoder rows at unit norm (projected gradient + renormalisation after each step)."""
    init_decoder_norm: ClassVar[float] = 1.0
    default_hparams: ClassVar[dict[str, Any]] = {}
    """Architecture settings (coefficients, ...) with their defaults; saved in cfg.json."""
    scaled_hparams: ClassVar[tuple[str, ...]] = ()
    """Settings the trainer is given in units of the input's RMS per dimension (converted when built)."""
    dead_window: int = 1_000_000
    """Tokens without firing after which a latent counts as dead (set by the trainer; AuxK uses it)."""
    decoder_ortho: float = 0.0
    """Weight of the decoder-orthogonality penalty (set by the trainer; 0: off)."""

    def __init__(self, d_in: int, d_sae: int, k: int | None = None, hparams: dict[str, Any] | None = None):
        super().__init__()
        if self.uses_k and not (k and 0 < k <= d_sae):
            raise ValueError(f"{self.architecture} needs 0 < k <= d_sae, got k={k}, d_sae={d_sae}")
        unknown = set(hparams or {}) - set(self.default_hparams)
        if unknown:
            raise ValueError(f"{self.architecture} has no settings {sorted(unknown)}")
        self.d_in, self.d_sae, self.k = d_in, d_sae, (k if self.uses_k else None)
        self.train_k: int | None = None  # the trainer's annealed k for this step; inference always uses k
        self.token_warmup = False  # the trainer's flag: TopK's selection this step (--token-selection-warmup)
        self.hparams = {**self.default_hparams, **(hparams or {})}
        W_dec = torch.randn(d_sae, d_in)
        W_dec *= self.init_decoder_norm / W_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)
        # Encoder initialised as the decoder transpose (Gao et al. 2024; Anthropic, April 2024 update).
        self.W_enc = nn.Parameter(W_dec.t().clone())
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        # Tokens since each latent last fired: the dead-latent window (checkpointed, not in the SAE dir).
        self.register_buffer("tokens_since_fired", torch.zeros(d_sae, dtype=torch.int64))
        # Which block of decoder rows the orthogonality penalty takes next (checkpointed, not in the SAE dir).
        self.register_buffer("ortho_block", torch.zeros((), dtype=torch.int64))

    # ---- inference (the SAE dir contract) ----
    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:  # [..., d_in] -> [..., d_sae]
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:  # [..., d_in] -> [..., d_sae]
        raise NotImplementedError

    def encode_sparse(self, x: torch.Tensor) -> SparseCode:  # [n, d_in] -> nnz active pairs
        """The active pairs of `encode(x)` (value > 0) in row-major order, values bit-equal to encode's.

        Analysis needs only these (tens of k active out of thousands); architectures whose selection yields
        them directly override this so no dense [n, d_sae] code is written and scanned. This reference
        goes through the dense code; tests/test_train_saes.py checks every override against it.
        """
        z = self.encode(x)
        rows, latents = torch.nonzero(z > 0, as_tuple=True)
        return SparseCode(rows, latents, z[rows, latents], x.shape[0])

    def decode(self, z: torch.Tensor) -> torch.Tensor:  # [..., d_sae] -> [..., d_in]
        return z @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    # ---- architecture hooks for training ----
    def support(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, latents) [nnz] of the pairs that may be non-zero, rows sorted; `pre` has no grad."""
        raise NotImplementedError

    def activation(self, pre_values: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """Differentiable code values [nnz] at the support from the pre-activations there."""
        return torch.relu(pre_values)

    def extra_losses(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        """Weighted sparsity / auxiliary loss terms (default: none)."""
        return {}

    def reconstruction_losses(self, x: torch.Tensor, code: SparseCode) -> tuple[torch.Tensor, dict]:
        """(reconstruction [n, d_in], loss terms); Matryoshka overrides this with nested prefixes."""
        recon = self.decode_code(code)
        return recon, {"mse": mse(x, recon)}

    def update_state(self, stats: dict[str, torch.Tensor]) -> None:
        """Fold rank-averaged `TrainOutput.state_stats` into buffers (BatchTopK's threshold)."""

    def set_tensor(self, name: str, value: torch.Tensor) -> None:
        """Load one SAE-dir tensor (`load_sae`); an architecture that parameterises it otherwise overrides."""
        getattr(self, name).copy_(value)

    @property
    def coefficient_multiplier(self) -> float:
        """Factor the architecture applies to its sparsity coefficient now (JumpReLU's L0 controller)."""
        return 1.0

    @property
    def active_k(self) -> int | None:
        """k for training selection: the annealed value while the trainer sets one, else k."""
        return self.train_k or self.k

    # ---- shared training machinery ----
    def decode_code(self, code: SparseCode, with_bias: bool = True) -> torch.Tensor:
        out = sparse_decode(code.rows, code.latents, code.values, self.W_dec, code.n_tokens)
        return out + self.b_dec if with_bias else out

    def code_at(self, x_c: torch.Tensor, pre: torch.Tensor, rows, latents) -> tuple[SparseCode, torch.Tensor]:
        """The differentiable code at the given pairs, and the pre-activations there."""
        pre_values = gather_pre(x_c, self.W_enc, self.b_enc, rows, latents, pre).float()
        values = self.activation(pre_values, latents)
        return SparseCode(rows, latents, values, x_c.shape[0]), pre_values

    def train_forward(self, x: torch.Tensor, sparsity_scale: float = 1.0) -> TrainOutput:
        """One batch [n, d_in]: the loss and its statistics; `sparsity_scale` in [0, 1] is the warm-up."""
        x_c = x - self.b_dec
        with torch.no_grad():  # the one dense matmul
            pre = torch.addmm(self.b_enc, x_c, self.W_enc).float()
        rows, latents = self.support(pre)
        code, pre_values = self.code_at(x_c, pre, rows, latents)
        recon, terms = self.reconstruction_losses(x, code)
        ctx = StepContext(x, x_c, pre, code, pre_values, recon, sparsity_scale)
        terms.update(self.extra_losses(ctx))
        if self.decoder_ortho > 0:
            terms["ortho"] = self.decoder_ortho * ortho_penalty(self, x)
        loss = torch.stack(list(terms.values())).sum()
        fired = code.latents[code.values.detach() > 0]
        return TrainOutput(
            loss=loss,
            terms={name: t.detach() for name, t in terms.items()},
            recon=recon.detach(),
            fire_counts=torch.bincount(fired, minlength=self.d_sae),
            state_stats=self.batch_stats(ctx),
        )

    def batch_stats(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        return {}

    def dead_mask(self, window: int) -> torch.Tensor:
        """[d_sae] bool: latents that have not fired for `window` tokens."""
        return self.tokens_since_fired >= window

    @torch.no_grad()
    def record_firing(self, fire_counts: torch.Tensor, n_tokens: int) -> None:
        """Advance the dead-latent window by a (global) batch of `n_tokens` with these counts."""
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired[fire_counts > 0] = 0

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove the gradient component parallel to each unit-norm decoder row (Gao et al. 2024)."""
        if self.unit_norm_decoder and self.W_dec.grad is not None:
            W, g = self.W_dec, self.W_dec.grad
            g -= (g * W).sum(-1, keepdim=True) * W

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        if self.unit_norm_decoder:
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)


ORTHO_BLOCK = 256
"""Decoder rows the orthogonality penalty compares with all others per step (a rotating block)."""


def global_variances(*ts: torch.Tensor) -> list[torch.Tensor]:
    """Each [n, d] tensor's mean squared distance from its mean, over the global batch of all ranks (one
    all-reduce of the sums), so AuxK's weight is the same on every rank and equal to one process's."""
    n = ts[0].new_tensor([float(ts[0].shape[0])])
    sums = distributed.all_reduce_sum(
        torch.cat([n, *(torch.cat([t.sum(0), t.pow(2).sum()[None]]) for t in ts)])
    )
    out, at, total = [], 1, sums[0]
    for t in ts:
        d = t.shape[1]
        mean = sums[at : at + d] / total
        out.append(sums[at + d] / total - mean.pow(2).sum())
        at += d + 1
    return out


def ortho_penalty(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    """Mean squared cosine between a block of decoder rows and every other row, times the batch's input
    variance (so its weight is relative to the reconstruction loss, like AuxK's).

    Why: a child feature that always comes with its parent is reconstructed equally well by a latent along
    child + a * parent for a range of a (its parent latent makes up the difference), so reconstruction and
    sparsity cannot pick a = 0; directions in superposition are nearly orthogonal, and this prior picks the
    pure child. Blocks rotate over the rows, so every pair is penalised every d_sae / 256 steps."""
    W = sae.W_dec
    n_blocks = -(-sae.d_sae // ORTHO_BLOCK)
    start = int(sae.ortho_block) % n_blocks * ORTHO_BLOCK
    rows = torch.arange(start, min(start + ORTHO_BLOCK, sae.d_sae), device=W.device)
    unit = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos = unit[rows] @ unit.T  # [block, d_sae]
    cos = cos.masked_fill(rows[:, None] == torch.arange(sae.d_sae, device=W.device)[None, :], 0.0)
    with torch.no_grad():
        sae.ortho_block += 1
    (variance,) = global_variances(x.detach())
    return variance * cos.pow(2).sum() / (len(rows) * max(sae.d_sae - 1, 1))


@dataclass
class StepContext:
    """Everything an architecture's loss hooks may need about the current batch."""

    x: torch.Tensor  # [n, d_in]
    x_c: torch.Tensor  # [n, d_in], x - b_dec (with grad)
    pre: torch.Tensor  # [n, d_sae] without grad
    code: SparseCode
    pre_values: torch.Tensor  # [nnz] with grad
    recon: torch.Tensor  # [n, d_in] with grad
    sparsity_scale: float


class ThresholdSAE(SAE):
    """An SAE whose inference code is pre * (pre > threshold), with a per-latent `threshold` [d_sae] saved in
    its dir: JumpReLU learns it, BatchTopK estimates it while training (registers no architecture itself)."""

    has_threshold: ClassVar[bool] = True
    threshold: torch.Tensor  # [d_sae]: a buffer or a property of the subclass

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre_acts(x)
        return pre * (pre > self.threshold)

    def encode_sparse(self, x: torch.Tensor) -> SparseCode:
        """Pairs above the threshold (and above 0, as encode's non-zero values are), from pre directly."""
        pre = self.pre_acts(x)
        rows, latents = torch.nonzero((pre > self.threshold) & (pre > 0), as_tuple=True)
        return SparseCode(rows, latents, pre[rows, latents], x.shape[0])
