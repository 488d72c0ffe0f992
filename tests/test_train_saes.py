"""Each SAE architecture learns known sparse features, keeps its sparsity promise and decoder norms.

Synthetic data: 48 unit-norm ground-truth directions in 32 dimensions, ~2 active per token with
magnitudes in [0.5, 2]. A few hundred Adam steps (the trainer's own `sae_step`) must reach a low
fraction of variance unexplained on held-out tokens.
"""

from __future__ import annotations

import pytest
import torch

from saepipe.train.saes import ARCHITECTURES, build_sae
from saepipe.train.step import make_optimizer, sae_step

D_IN, N_FEAT, WIDTH = 32, 48, 96


class Features:
    """A fixed sparse generative model; `batch` draws fresh tokens."""

    def __init__(
        self, seed: int = 0, d: int = D_IN, n_feat: int = N_FEAT, per_token: float = 2.0, subspace=None
    ):
        g = torch.Generator().manual_seed(seed)
        dirs = torch.randn(n_feat, subspace or d, generator=g)
        if subspace:
            dirs = torch.cat([dirs, torch.zeros(n_feat, d - subspace)], 1)
        self.dirs = dirs / dirs.norm(dim=1, keepdim=True)
        self.p = per_token / n_feat
        self.g = g

    def batch(self, n: int) -> torch.Tensor:
        active = torch.rand(n, len(self.dirs), generator=self.g) < self.p
        mags = 0.5 + 1.5 * torch.rand(n, len(self.dirs), generator=self.g)
        return (active * mags) @ self.dirs


def fvu(x: torch.Tensor, recon: torch.Tensor) -> float:
    return float((x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def train(sae, data: Features, steps: int = 300, batch: int = 256, lr: float = 1e-2):
    torch.manual_seed(0)
    opt = make_optimizer(sae, lr)
    x0 = data.batch(2048)
    with torch.no_grad():
        sae.b_dec.copy_(x0.mean(0))
    for step in range(steps):
        sae_step(sae, opt, data.batch(batch), lr, sparsity_scale=min(1.0, step / (steps * 0.2)))
    return sae


SETTINGS = {
    "relu": {"hparams": {"l1_coefficient": 0.5}},
    "topk": {"k": 4},
    "batchtopk": {"k": 4},
    "matryoshka": {"k": 4},
    "jumprelu": {"hparams": {"l0_coefficient": 0.1, "bandwidth": 0.05, "threshold_init": 0.1}},
}


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    data = Features()
    saes = {}
    for arch, kw in SETTINGS.items():
        torch.manual_seed(1)
        saes[arch] = train(build_sae(arch, D_IN, WIDTH, **kw), data)
    test_x = data.batch(4096)
    return saes, test_x


def test_registry_holds_every_architecture():
    assert set(ARCHITECTURES) == {"relu", "topk", "batchtopk", "jumprelu", "matryoshka"}


@pytest.mark.parametrize("arch", list(SETTINGS))
def test_learns_sparse_features(trained, arch):
    saes, x = trained
    sae = saes[arch]
    with torch.no_grad():
        z = sae.encode(x)
        err = fvu(x, sae.decode(z))
    l0 = float((z != 0).sum(-1).float().mean())
    # the untrained SAE is far off: the claim is not vacuous
    fresh = build_sae(arch, D_IN, WIDTH, **SETTINGS[arch])
    with torch.no_grad():
        assert fvu(x, fresh(x)) > 0.5
    assert err < 0.12, f"{arch}: FVU {err:.3f}"
    if arch == "topk":
        assert (z != 0).sum(-1).max() <= 4
    if arch in ("batchtopk", "matryoshka"):  # the inference threshold keeps the training batch's L0
        assert 2.0 <= l0 <= 6.0, f"{arch}: L0 {l0:.2f} with k=4"
    if arch in ("relu", "jumprelu"):
        assert l0 < 8, f"{arch}: L0 {l0:.2f} (~2 true features per token)"


def test_matryoshka_token_selection_keeps_each_tokens_top_k(trained):
    """Token selection trains and encodes as TopK: every token keeps exactly its k largest pre-activations
    (checked against the formula from the weights), and the SAE still learns the features."""
    _, x = trained
    torch.manual_seed(1)
    sae = train(build_sae("matryoshka", D_IN, WIDTH, k=4, hparams={"selection": "token"}), Features())
    assert "threshold" not in sae.state_dict()
    with torch.no_grad():
        z = sae.encode(x)
        pre = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    values, idx = pre.topk(4, dim=-1)
    want = torch.zeros_like(pre).scatter(-1, idx, values)
    torch.testing.assert_close(z, want)
    assert int((z != 0).sum(-1).max()) == 4
    with torch.no_grad():
        assert fvu(x, sae.decode(z)) < 0.12
    with pytest.raises(ValueError, match="selection"):
        build_sae("matryoshka", D_IN, WIDTH, k=4, hparams={"selection": "row"})


@pytest.mark.parametrize("arch", list(SETTINGS))
def test_decoder_norms(trained, arch):
    sae = trained[0][arch]
    norms = sae.W_dec.detach().norm(dim=1)
    if arch == "relu":  # Anthropic's recipe leaves the decoder free; the L1 is weighted by its norms
        assert not torch.allclose(norms, torch.ones_like(norms), atol=1e-3)
    else:
        torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch,key", [("relu", "l1_coefficient"), ("jumprelu", "l0_coefficient")])
def test_sparsity_coefficient_controls_l0(arch, key):
    data = Features(seed=3)
    l0s = []
    for scale in (0.2, 5.0):
        torch.manual_seed(1)
        hp = dict(SETTINGS[arch]["hparams"])
        hp[key] *= scale
        sae = train(build_sae(arch, D_IN, WIDTH, hparams=hp), data, steps=200)
        with torch.no_grad():
            l0s.append(float((sae.encode(data.batch(2048)) != 0).sum(-1).float().mean()))
    assert l0s[1] < 0.7 * l0s[0], f"{arch}: L0 {l0s} did not fall with a larger {key}"


def test_auxk_revives_latents_that_would_die():
    """Half the latents start pointing into a subspace the data never visits, so TopK never selects
    them; only AuxK's gradient can pull them back into use."""
    data = Features(seed=5, subspace=16)
    alive = {}
    for coefficient in (0.0, 1 / 32):
        torch.manual_seed(2)
        sae = build_sae("topk", D_IN, WIDTH, k=4, hparams={"auxk_coefficient": coefficient})
        sae.dead_window = 256
        with torch.no_grad():
            W = sae.W_dec.detach().clone()
            W[: WIDTH // 2, :16] = 0  # entirely outside the data's subspace
            W /= W.norm(dim=1, keepdim=True)
            sae.W_dec.copy_(W)
            sae.W_enc.copy_(W.t())
        train(sae, data, steps=600)
        with torch.no_grad():
            fired = (sae.encode(data.batch(4096)) != 0).any(0)
        alive[coefficient] = int(fired[: WIDTH // 2].sum())
    # without AuxK nearly all stay dead (a few drift back as b_dec leaves the subspace): not vacuous
    assert alive[0.0] <= 6, alive
    assert alive[1 / 32] >= 3 * alive[0.0] + 8, alive


def test_decoder_ortho_penalty_equals_brute_force_and_rotates_over_rows():
    from saepipe.train.saes.base import ORTHO_BLOCK, ortho_penalty

    torch.manual_seed(0)
    sae = build_sae("topk", 8, 2 * ORTHO_BLOCK + 10, k=2)  # three blocks, the last one short
    x = torch.randn(64, 8)
    unit = (sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)).detach().double()
    cos2 = (unit @ unit.T).pow(2).fill_diagonal_(0)
    variance = float((x - x.mean(0)).pow(2).sum(-1).mean())
    for block, (lo, hi) in enumerate([(0, 256), (256, 512), (512, 522), (0, 256)]):
        assert int(sae.ortho_block) == block
        got = float(ortho_penalty(sae, x).detach())
        want = variance * float(cos2[lo:hi].sum()) / ((hi - lo) * (sae.d_sae - 1))
        assert got == pytest.approx(want, rel=1e-5)


def test_decoder_ortho_separates_a_child_from_its_parent():
    """Two decoder rows along parent and parent + child: the penalty's gradient turns the second towards the
    pure child (its cosine to the parent falls), the tie reconstruction alone cannot break."""
    from saepipe.train.saes.base import ortho_penalty

    sae = build_sae("topk", 4, 2, k=1)
    with torch.no_grad():
        sae.W_dec.copy_(torch.tensor([[1.0, 0, 0, 0], [0.6, 0.8, 0, 0]]))
    opt = torch.optim.SGD([sae.W_dec], lr=0.05)
    x = torch.randn(32, 4)
    for _ in range(20):
        opt.zero_grad()
        ortho_penalty(sae, x).backward()
        opt.step()
        sae.after_optimizer_step()
    w = sae.W_dec.detach()
    assert float(w[0] @ w[1]) < 0.3 and float(w[1, 1]) > 0.9


def test_global_variances_match_the_two_pass_formula():
    from saepipe.train.saes.base import global_variances

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(200, 7, generator=g) * 3 + 5, torch.randn(200, 3, generator=g)
    got = global_variances(a, b)
    for t, v in zip((a, b), got, strict=True):
        torch.testing.assert_close(v, (t - t.mean(0)).pow(2).sum(-1).mean(), rtol=1e-5, atol=1e-6)


def reference_controller(l0s: list[float], target: float, rate: float) -> list[float]:
    """The L0 controller of train/saes/jumprelu.py written out in plain floats: the multiplier after each batch."""
    import math

    ema = trend = log_m = 0.0
    out = []
    for i, l0 in enumerate(l0s):
        new = l0 if i == 0 else 0.99 * ema + 0.01 * l0
        trend = 0.0 if i == 0 else 0.95 * trend + 0.05 * (new - ema)
        ema = new
        error = ema / target - 1
        gain = 0.01 if error * trend < 0 and abs(ema - target) < 100 * abs(trend) else 1.0
        step = rate * gain * math.tanh(10 * abs(error))
        log_m = max(-math.log(100), min(math.log(100), log_m + math.copysign(step, error) * (error != 0)))
        out.append(math.exp(log_m))
    return out


def test_l0_controller_matches_its_reference_and_stays_in_range():
    """Too dense: the multiplier grows (damped while the L0 heads for the target fast enough), never beyond
    100; too sparse: it falls, never below 1/100."""
    sae = build_sae("jumprelu", D_IN, WIDTH, hparams={"target_l0": 10.0, "autotune_rate": 0.05})
    l0s = [40.0] * 50 + [30.0 - 0.2 * i for i in range(100)] + [2.0] * 400 + [10.0] * 5
    got = []
    for l0 in l0s:
        sae.update_state({"l0": torch.tensor(l0, dtype=torch.float64)})
        got.append(sae.coefficient_multiplier)
    want = reference_controller(l0s, 10.0, 0.05)
    assert got == pytest.approx(want, rel=1e-9)
    assert got[49] > got[0] > 1.0  # too dense: a larger penalty
    assert max(got) <= 100.0 + 1e-9 and min(got) >= 0.01 - 1e-12
    assert min(got) == pytest.approx(0.01)  # 400 batches far below the target reach the bound


def test_target_l0_is_reached_where_a_fixed_weight_misses_it():
    """The same JumpReLU settings with a fixed L0 weight settle far from 1.2 active latents; steered, they
    reach it."""
    data = Features(seed=5)
    l0s = {}
    for target in (None, 1.2):
        torch.manual_seed(1)
        hp = {**SETTINGS["jumprelu"]["hparams"], "target_l0": target, "autotune_rate": 0.005}
        sae = train(build_sae("jumprelu", D_IN, WIDTH, hparams=hp), data, steps=1200)
        with torch.no_grad():
            l0s[target] = float((sae.encode(data.batch(4096)) != 0).sum(-1).float().mean())
    assert abs(l0s[None] - 1.2) > 0.5, l0s
    assert l0s[1.2] == pytest.approx(1.2, rel=0.15), l0s


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka"])
def test_token_warmup_selects_each_tokens_k_then_the_batchs(arch):
    """With the trainer's warm-up flag a batch-selection SAE keeps exactly each token's k largest
    pre-activations (TopK's rule); without it, the batch's n * k largest (the reference ranking)."""
    from saepipe.train.saes.batchtopk import batch_topk_reference

    torch.manual_seed(0)
    sae = build_sae(arch, D_IN, WIDTH, k=4)
    pre = torch.randn(64, WIDTH) * torch.linspace(0.2, 3.0, 64)[:, None]  # some tokens far louder
    sae.token_warmup = True
    rows, latents = sae.support(pre)
    want = pre.topk(4, dim=-1).indices.sort(dim=-1).values
    got = torch.zeros(64, WIDTH, dtype=torch.bool)
    got[rows, latents] = True
    assert torch.equal(got.sum(1), torch.full((64,), 4))
    assert torch.equal(got.nonzero()[:, 1].reshape(64, 4), want)
    sae.token_warmup = False
    rows, latents = sae.support(pre)
    ref_rows, ref_latents = batch_topk_reference(torch.relu(pre), 4)
    assert torch.equal(rows, ref_rows) and torch.equal(latents, ref_latents)
    assert torch.bincount(rows, minlength=64).min() == 0  # the quiet tokens lose their latents


def test_jumprelu_warmup_selects_per_token_and_parks_thresholds_at_the_cut():
    """In the warm-up JumpReLU keeps each token's round(target_l0) largest pre-activations as plain ReLU values
    (no L0 penalty), and its thresholds sit at the EMA of the batch cut that gives L0 k: started there, the
    threshold code keeps k latents per token on average."""
    torch.manual_seed(0)
    sae = build_sae("jumprelu", D_IN, WIDTH, hparams={"target_l0": 3.0})
    sae.token_warmup = True
    data = Features(seed=7)
    cuts = []
    for _ in range(3):
        out = sae.train_forward(data.batch(512))
        assert float(out.terms["l0"]) == 0.0
        assert int(out.fire_counts.sum()) <= 512 * 3  # at most k per token (a ReLU may zero a few)
        stats = out.state_stats
        cuts.append(float(stats["cut"]))
        sae.update_state(stats)
    want = cuts[0]
    for c in cuts[1:]:
        want = 0.99 * want + 0.01 * c
    torch.testing.assert_close(sae.threshold, torch.full((WIDTH,), want), rtol=1e-5, atol=0)
    x = data.batch(4096)
    with torch.no_grad():
        rows, _ = sae.support(sae.pre_acts(x))
    assert torch.equal(torch.bincount(rows, minlength=4096), torch.full((4096,), 3))
    sae.token_warmup = False
    with torch.no_grad():
        l0 = float((sae.encode(x) > 0).sum(-1).float().mean())
    assert 2.0 < l0 < 4.5, l0  # the parked thresholds give about k latents per token


def test_jumprelu_warmup_needs_a_target_l0():
    from saepipe.train.config import TrainConfig

    with pytest.raises(ValueError, match="give --jumprelu-target-l0"):
        TrainConfig(stores=["s"], hook="h", out="o", arch=["jumprelu"], token_selection_warmup=0.5)
    TrainConfig(
        stores=["s"], hook="h", out="o", arch=["topk"], token_selection_warmup=0.5
    )  # no jumprelu: fine
