"""The fast path: touch only the active (token, latent) pairs after the encoder's forward matmul.

A dense TopK step costs five matmuls of the encoder's size (encoder forward, encoder weight gradient,
decoder forward, and the decoder's two gradients), yet only the encoder forward needs every latent: the
rest involve k latents per token (issue 3 measured ~1,960 tokens/s dense against ~12,700 for the encoder
forward alone). A sparse code is kept in "flat CSR" form: `rows` [nnz] (token index, sorted), `latents`
[nnz] and `values` [nnz]. Two ops use it:

- `gather_pre`: the pre-activations at the active pairs, computed from a dense pre-activation matrix
  made without autograd; its backward builds W_enc's gradient as a sparse-by-dense product.
- `sparse_decode`: `embedding_bag` over decoder rows weighted by the values (its backward touches only
  the active rows and never materialises [nnz, d_in]).

Each has a dense reference (`dense_pre_values`, `dense_decode`); `SAEPIPE_DENSE=1` switches every SAE to
the references, and tests/test_train_sparse.py checks outputs and gradients agree.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F


def dense_mode() -> bool:
    """True when `SAEPIPE_DENSE=1`: use the plain dense references instead of the sparse ops."""
    return os.environ.get("SAEPIPE_DENSE", "0") not in ("", "0", "false", "False")


def _offsets(rows: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Start of each token's run in `rows` (which must be sorted): the `offsets` of embedding_bag."""
    counts = torch.bincount(rows, minlength=n_tokens)
    return torch.cumsum(counts, 0) - counts


def _coo(
    rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]
) -> torch.Tensor:
    return torch.sparse_coo_tensor(torch.stack([rows, cols]), values, shape, check_invariants=False)


class _GatherPre(torch.autograd.Function):
    """values[i] = ((x_c @ W_enc) + b_enc)[rows[i], latents[i]], given that matrix precomputed."""

    @staticmethod
    def forward(ctx, x_c, W_enc, b_enc, rows, latents, pre):  # type: ignore[override]
        ctx.save_for_backward(x_c, W_enc, rows, latents)
        return pre[rows, latents]

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        x_c, W_enc, rows, latents = ctx.saved_tensors
        n, d_sae = x_c.shape[0], W_enc.shape[1]
        g = g.to(x_c.dtype)
        grad_x = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:  # [n, d_in] = S[n, d_sae] @ W_enc^T
            grad_x = torch.sparse.mm(_coo(rows, latents, g, (n, d_sae)), W_enc.t())
        if ctx.needs_input_grad[1]:  # W_enc^T [d_sae, d_in] = S^T[d_sae, n] @ x_c
            grad_W = torch.sparse.mm(_coo(latents, rows, g, (d_sae, n)), x_c).t()
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(d_sae, dtype=g.dtype, device=g.device).index_add_(0, latents, g)
        return grad_x, grad_W, grad_b, None, None, None


def gather_pre(
    x_c: torch.Tensor,  # [n, d_in], input minus b_dec
    W_enc: torch.Tensor,  # [d_in, d_sae]
    b_enc: torch.Tensor,  # [d_sae]
    rows: torch.Tensor,  # [nnz]
    latents: torch.Tensor,  # [nnz]
    pre: torch.Tensor,  # [n, d_sae], x_c @ W_enc + b_enc computed without autograd
) -> torch.Tensor:  # [nnz]
    """Pre-activations at the active pairs, differentiable w.r.t. x_c, W_enc and b_enc."""
    if dense_mode():
        return dense_pre_values(x_c, W_enc, b_enc, rows, latents)
    return _GatherPre.apply(x_c, W_enc, b_enc, rows, latents, pre)


def dense_pre_values(x_c, W_enc, b_enc, rows, latents) -> torch.Tensor:
    """Reference for `gather_pre`: the whole matmul under autograd, then a gather."""
    return (x_c @ W_enc + b_enc)[rows, latents]


def sparse_decode(
    rows: torch.Tensor,  # [nnz], sorted
    latents: torch.Tensor,  # [nnz]
    values: torch.Tensor,  # [nnz]
    W_dec: torch.Tensor,  # [d_sae, d_in]
    n_tokens: int,
) -> torch.Tensor:  # [n_tokens, d_in], without b_dec
    """sum_i values[i] * W_dec[latents[i]] into row rows[i]; differentiable w.r.t. values and W_dec."""
    if dense_mode():
        return dense_decode(rows, latents, values, W_dec, n_tokens)
    if latents.numel() == 0:
        return W_dec.new_zeros(n_tokens, W_dec.shape[1]) + 0 * values.sum()
    return F.embedding_bag(
        latents,
        W_dec,
        _offsets(rows, n_tokens),
        mode="sum",
        per_sample_weights=values.to(W_dec.dtype),
    )


def dense_decode(rows, latents, values, W_dec, n_tokens) -> torch.Tensor:
    """Reference for `sparse_decode`: scatter into a dense code, then one matmul."""
    z = W_dec.new_zeros(n_tokens, W_dec.shape[0]).index_put((rows, latents), values.to(W_dec.dtype))
    return z @ W_dec
