"""train/pursuit.py: matching-pursuit codes, the least-squares decoder refit, and the TopK encoder fit."""

import numpy as np
import torch

from saepipe.train.pursuit import fit_encoder, omp, refit_decoder


def unit(a: torch.Tensor) -> torch.Tensor:
    return a / a.norm(dim=1, keepdim=True)


def reference_omp(x: np.ndarray, W: np.ndarray, k: int) -> tuple[list[int], np.ndarray]:
    """Textbook OMP for one token in float64: the best positive correlation with the residual, then all
    chosen values by np.linalg.lstsq."""
    chosen: list[int] = []
    residual = x.copy()
    values = np.zeros(0)
    for _ in range(k):
        scores = W @ residual
        scores[chosen] = -np.inf
        chosen.append(int(scores.argmax()))
        A = W[chosen].T
        values = np.linalg.lstsq(A, x, rcond=None)[0]
        residual = x - A @ values
    return chosen, np.maximum(values, 0)


def test_omp_matches_a_textbook_pursuit_token_by_token() -> None:
    g = torch.Generator().manual_seed(0)
    W = unit(torch.randn(40, 12, generator=g, dtype=torch.float64))
    x = torch.randn(25, 12, generator=g, dtype=torch.float64)
    atoms, values = omp(x, W, 4, ridge=0.0)
    for t in range(len(x)):
        want_atoms, want_values = reference_omp(x[t].numpy(), W.numpy(), 4)
        assert atoms[t].tolist() == want_atoms
        np.testing.assert_allclose(values[t].numpy(), want_values, atol=1e-9)


def planted(n_tokens: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens that are 3-sparse non-negative mixtures of 48 random unit atoms in 24 dims, and the atoms."""
    g = torch.Generator().manual_seed(seed)
    D = unit(torch.randn(48, 24, generator=g, dtype=torch.float64))
    atoms = torch.rand(n_tokens, 48, generator=g).argsort(1)[:, :3]
    values = 1 + torch.rand(n_tokens, 3, generator=g, dtype=torch.float64)
    z = torch.zeros(n_tokens, 48, dtype=torch.float64).scatter_(1, atoms, values)
    return z @ D, D


def best_cos(W: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    return (unit(D) @ unit(W).T).abs().max(1).values


def test_refit_turns_mixed_directions_back_into_the_planted_features() -> None:
    """Each start direction is a planted atom plus 0.7 of another (what absorption leaves in a decoder):
    alternating pursuit codes and least squares gives the atoms back, and the pursuit error falls."""
    x, D = planted(4096)
    W0 = unit(D + 0.7 * D[torch.arange(48).roll(1)])
    variance = float((x - x.mean(0)).pow(2).sum(-1).mean())
    W, steps = refit_decoder(lambda: x.split(1024), W0, 3, 8, variance)
    assert float(best_cos(W0, D).max()) < 0.9
    assert float(best_cos(W, D).min()) > 0.99
    assert steps[-1].fvu < 0.1 * steps[0].fvu and steps[-1].unused == 0
    torch.testing.assert_close(W.norm(dim=1), torch.ones(48, dtype=torch.float64))


def test_the_encoder_fit_learns_to_select_the_right_latents_for_a_fixed_decoder() -> None:
    x, D = planted(4096, seed=1)
    x, D = x.float(), D.float()
    start = torch.randn(24, 48, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    sample = lambda: x[torch.randint(0, len(x), (256,))]  # noqa: E731

    def error(enc: torch.Tensor, bias: torch.Tensor) -> float:
        values, atoms = torch.relu(x @ enc + bias).topk(3, dim=-1)
        return float((x - torch.einsum("nk,nkd->nd", values, D[atoms])).pow(2).sum(-1).mean())

    enc, bias = fit_encoder(sample, D, (start, torch.zeros(48)), 3, steps=1500, lr=1e-2)
    variance = float((x - x.mean(0)).pow(2).sum(-1).mean())
    before, after = error(start, torch.zeros(48)), error(enc, bias)
    assert before > variance  # a random encoder picks the wrong latents
    assert after < 0.4 * variance and after < 0.2 * before
