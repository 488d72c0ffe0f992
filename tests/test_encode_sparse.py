"""Every architecture's `encode_sparse` gives exactly the non-zero entries of its dense `encode`: the same
(row, latent) pairs in row-major order and bit-equal values (the analysis fast path relies on it)."""

from __future__ import annotations

import pytest
import torch

from saepipe.train.saes import ARCHITECTURES, SAE, build_sae

D_IN, WIDTH = 24, 160


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_encode_sparse_equals_dense_encode(arch):
    torch.manual_seed(0)
    sae = build_sae(arch, D_IN, WIDTH, k=12 if ARCHITECTURES[arch].uses_k else None)
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(WIDTH) * 0.5 - 1.5)  # many tokens with fewer than k positive pre-acts
        if ARCHITECTURES[arch].has_threshold:
            sae.threshold.copy_(torch.rand(WIDTH) * 0.4)
    x = torch.randn(300, D_IN)
    x[7] = 0.0  # a token with few or no active latents
    with torch.inference_mode():
        code = sae.encode_sparse(x)
        ref = SAE.encode_sparse(sae, x)  # the reference: dense encode, then nonzero
        z = sae.encode(x)
    assert code.n_tokens == len(x)
    assert torch.equal(code.rows, ref.rows) and torch.equal(code.latents, ref.latents)
    assert torch.equal(code.values.view(torch.int32), ref.values.view(torch.int32))  # bit for bit
    dense = torch.zeros_like(z).index_put((code.rows, code.latents), code.values)
    assert torch.equal(dense, z.clamp_min(0))
    per_token = torch.bincount(code.rows, minlength=len(x))
    assert 0 < len(code.rows) < len(x) * WIDTH // 2, "codes are not sparse: the check is vacuous"
    if ARCHITECTURES[arch].uses_k and arch == "topk":
        assert per_token.max() == 12 and (per_token < 12).any(), "no token with fewer than k active"
