import json
import math
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from ddpm import bench, evaluate, sample, train
from ddpm.model import EMA, Diffusion, cosine_betas, discretized_gaussian_log_likelihood, linear_betas
from ddpm.unet import AttnBlock, LinearAttnBlock, PixelRMSNorm, ResBlock, UNet, UNetConfig
from utils import run as R

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(dataset="synthetic", ch=8, ch_mult=(1, 2), num_res_blocks=1, T=50, batch_size=32, device="cpu",
            warmup=10, sample_interval=1000, log_interval=10, lr=2e-3, cpu_bf16=False, grid_samples=4)


class Zero(torch.nn.Module):
    def forward(self, x, t):
        return torch.zeros_like(x)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_schedule_endpoints_and_monotone(schedule):
    d = Diffusion(Zero(), T=1000, schedule=schedule)
    ab = d.alpha_bar.double()
    assert (ab[1:] < ab[:-1]).all() and ab[0] > 0.99 and ab[-1] < 1e-3
    if schedule == "linear":
        assert torch.isclose(d.betas[0], torch.tensor(1e-4)) and torch.isclose(d.betas[-1], torch.tensor(0.02))
    assert torch.allclose(linear_betas(10), torch.linspace(1e-4, 0.02, 10, dtype=torch.float64))
    assert (cosine_betas(10) <= 0.999).all()


def test_q_sample_equals_the_closed_form_at_given_t_and_noise():
    """Eq. (4) at chosen t and eps, against alpha_bar computed here in float64 from the paper's schedule."""
    T = 1000
    d = Diffusion(Zero(), T=T)
    alpha_bar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, T, dtype=torch.float64), 0)
    torch.manual_seed(0)
    x0, eps = torch.rand(4, 1, 3, 3) * 2 - 1, torch.randn(4, 1, 3, 3)
    t = torch.tensor([0, 1, 500, 999])
    ab = alpha_bar[t].view(4, 1, 1, 1)
    ref = ab.sqrt() * x0.double() + (1 - ab).sqrt() * eps.double()
    assert torch.allclose(d.q_sample(x0, t, eps).double(), ref, atol=1e-6)


def test_q_sample_mean_and_variance_for_constant_image():
    d = Diffusion(Zero(), T=1000)
    x0 = torch.full((20000, 1, 1, 1), 0.7)
    t = torch.full((20000,), 300, dtype=torch.long)
    xt = d.q_sample(x0, t, torch.randn_like(x0))
    ab = d.alpha_bar[300]
    assert abs(xt.mean() - ab.sqrt() * 0.7) < 0.02 and abs(xt.var() - (1 - ab)) < 0.02


def test_training_and_sampling_use_the_same_timestep_range():
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, x, t):
            seen.append(t.clone())
            return torch.zeros_like(x)
    d = Diffusion(Spy(), T=20)
    torch.manual_seed(0)
    for _ in range(50):
        d.loss(torch.zeros(64, 1, 4, 4))
    train_t = torch.cat(seen)
    seen.clear()
    d.sample((2, 1, 4, 4), "cpu", "ddpm")
    sample_t = torch.cat(seen)
    assert train_t.min() == 0 and train_t.max() == 19
    assert set(sample_t.tolist()) == set(range(20))
    seen.clear()
    d.sample((2, 1, 4, 4), "cpu", "ddim", steps=5)
    assert torch.cat(seen).max() == 19 and torch.cat(seen).min() == 0


def test_loss_is_one_for_zero_predictor():
    torch.manual_seed(0)
    d = Diffusion(Zero(), T=1000)
    assert abs(d.loss(torch.rand(256, 1, 8, 8) * 2 - 1).item() - 1.0) < 0.02


def test_ddim_eta1_full_steps_reduces_to_ancestral_sigma():
    d = Diffusion(Zero(), T=100, sigma="beta_tilde")
    for t in [1, 10, 50, 99]:
        assert torch.isclose(d.ddim_sigma(t, t - 1, 1.0) ** 2, d.sigma2(t), rtol=1e-4)
    assert torch.equal(d.ddim_timesteps(100), torch.arange(100))


def test_ddim_timesteps_span_the_chain():
    d = Diffusion(Zero(), T=1000)
    for spacing in ["uniform", "quadratic"]:
        tau = d.ddim_timesteps(50, spacing)
        assert len(tau) == 50 and tau[0] == 0 and tau[-1] == 999 and (tau.diff() > 0).all()
    q, u = d.ddim_timesteps(50, "quadratic"), d.ddim_timesteps(50, "uniform")
    assert (q < 100).sum() > (u < 100).sum()  # quadratic spends more steps near t = 0


def test_ddim_eta1_step_equals_ancestral_step_in_distribution():
    """Same x_t, same noise: the DDIM eta=1 step and Algorithm 2 with beta_tilde give the same x_{t-1}."""
    torch.manual_seed(0)
    net = UNet(UNetConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1))
    for p in net.parameters():
        p.data.normal_(0, 0.05)
    d = Diffusion(net, T=100, sigma="beta_tilde", clip_denoised=False).eval()
    xt = torch.randn(2, 1, 8, 8)
    torch.manual_seed(1)
    a = d.p_sample(xt, 40)
    torch.manual_seed(1)
    b = d.ddim_step(xt, 40, 39, eta=1.0)
    assert torch.allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("size,chans,mult", [(28, 1, (1, 2, 2)), (32, 3, (1, 2, 2, 2))])
def test_unet_output_shape(size, chans, mult):
    net = UNet(UNetConfig(in_chans=chans, ch=8, ch_mult=mult, num_res_blocks=1))
    x = torch.randn(2, chans, size, size)
    assert net(x, torch.tensor([0, 999])).shape == x.shape


@pytest.mark.parametrize("scale_shift", [False, True])
def test_unet_attention_levels_and_time_conditioning(scale_shift):
    """attn_levels=(1,) puts attention after each 14x14 block (2 down, 3 up) besides the middle's 7x7; the time
    embedding (a sum or a GroupNorm scale and shift) changes the output."""
    net = UNet(UNetConfig(ch=8, ch_mult=(1, 2, 2), num_res_blocks=2, attn_levels=(1,), scale_shift=scale_shift))
    sizes = []
    for m in net.modules():
        if isinstance(m, AttnBlock):
            nn.init.normal_(m.proj.weight, std=0.1)  # not the identity it starts as
            m.register_forward_hook(lambda mod, inp, out: sizes.append(inp[0].shape[-1]))
    for m in net.modules():
        if isinstance(m, ResBlock):
            nn.init.normal_(m.conv2.weight, std=0.1)
    nn.init.normal_(net.out[-1].weight, std=0.1)
    x = torch.randn(2, 1, 28, 28)
    a, b = net(x, torch.tensor([0, 0])), net(x, torch.tensor([500, 500]))
    assert sorted(sizes[:6]) == [7, 14, 14, 14, 14, 14] and len(sizes) == 12
    assert a.shape == x.shape and (a - b).abs().mean() > 1e-3


def test_linear_attention_matches_the_quadratic_form():
    """Efficient attention (Shen et al. 2018, Eq. 2) in its (positions x features) layout, computed the slow way
    through the (HW x HW) matrix rho_q(Q) rho_k(K)^T, equals the block's context-first product;
    linear_attn_levels=(0, 1) puts the block after every 28x28 and 14x14 residual block."""
    torch.manual_seed(0)
    blk = LinearAttnBlock(8, heads=2, dim_head=4)
    nn.init.normal_(blk.proj.weight, std=0.1)
    x = torch.randn(3, 8, 5, 6)
    qkv = blk.qkv(blk.norm(x)).flatten(2).transpose(1, 2)  # (B, N, 3 * hidden)
    outs = []
    for hd in range(2):
        q, k, v = (qkv[..., (i * 2 + hd) * 4:(i * 2 + hd + 1) * 4] for i in range(3))  # each (B, N, d)
        rq, rk = q.softmax(dim=-1), k.softmax(dim=1)  # rho_q over each row's features, rho_k over positions
        outs.append((rq @ rk.transpose(1, 2)) @ v)  # (B, N, N) @ (B, N, d)
    ref = x + blk.proj(torch.cat(outs, -1).transpose(1, 2).reshape(3, 8, 5, 6))
    assert torch.allclose(blk(x), ref, atol=1e-5)
    net = UNet(UNetConfig(ch=8, ch_mult=(1, 2, 2), num_res_blocks=2, linear_attn_levels=(0, 1)))
    sizes = []
    for m in net.modules():
        if isinstance(m, LinearAttnBlock):
            m.register_forward_hook(lambda mod, inp, out: sizes.append(inp[0].shape[-1]))
    net(torch.randn(1, 1, 28, 28), torch.tensor([3]))
    assert sorted(sizes) == [14] * 5 + [28] * 5


def test_pixel_rms_norm():
    """norm="rms" scales each pixel's channel vector to unit RMS (denoising-diffusion-pytorch's RMSNorm: x / ||x|| *
    sqrt(C)), so rescaling one pixel leaves the others alone, unlike GroupNorm's statistics over the image."""
    x = torch.randn(2, 8, 5, 5) * 3
    y = PixelRMSNorm(8)(x)
    assert torch.allclose(y, torch.nn.functional.normalize(x, dim=1) * 8 ** 0.5, atol=1e-4)
    x2 = x.clone()
    x2[:, :, 0, 0] *= 100
    assert torch.allclose(PixelRMSNorm(8)(x2)[:, :, 1:], y[:, :, 1:], atol=1e-5)
    assert not torch.allclose(nn.GroupNorm(2, 8)(x2)[:, :, 1:], nn.GroupNorm(2, 8)(x)[:, :, 1:], atol=1e-2)
    net = UNet(UNetConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, norm="rms"))
    blocks = [m for m in net.modules() if isinstance(m, ResBlock)]
    assert blocks and all(isinstance(b.norm1, PixelRMSNorm) and isinstance(b.norm2, PixelRMSNorm) for b in blocks)
    assert net(torch.randn(2, 1, 28, 28), torch.tensor([0, 999])).shape == (2, 1, 28, 28)


def test_ema_update():
    m = torch.nn.Linear(2, 2)
    ema = EMA(m, decay=0.9)
    before = ema.model.weight.clone()
    with torch.no_grad():
        m.weight.add_(1.0)
    ema.update(m)
    assert torch.allclose(ema.model.weight, before + 0.1)
    ema.update(m, step=0)  # warm-up: decay min(0.9, 1/10) = 0.1, so 90% of the way to the live weights
    assert torch.allclose(ema.model.weight, before + 0.1 + 0.9 * 0.9)


def test_discrete_decoder_sums_to_one():
    levels = torch.linspace(-1, 1, 256)
    ll = discretized_gaussian_log_likelihood(levels, torch.full_like(levels, 0.1), torch.tensor(0.04))
    assert abs(ll.exp().sum().item() - 1.0) < 1e-4


def test_fid_self_zero_noise_large():
    torch.manual_seed(0)
    f = torch.randn(2000, 16, dtype=torch.float64)
    g = torch.randn(2000, 16, dtype=torch.float64) * 3 + 2
    assert abs(evaluate.fid(f, f)) < 1e-6 and evaluate.fid(f, g) > 50


def test_smoke_train_sample_evaluate(tmp_path):
    out = tmp_path / "run"
    s = train.main(train.Config(out_dir=str(out), steps=60, **TINY))
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert rows[-1]["loss"] < rows[0]["loss"] and s["steps"] == 60
    for f in ["ckpt.pt", "metrics.jsonl", "summary.json", "samples_step60.png"]:
        assert (out / f).exists()
    r = subprocess.run([sys.executable, "ddpm/sample.py", "--out-dir", str(out), "--num-samples", "4",
                        "--gif-frames", "5", "--device", "cpu"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    for f in ["samples_ddpm.png", "reverse_ddpm.gif", "forward_process.png"]:
        assert (out / f).exists()
    sample.main(sample.Config(out_dir=str(out), num_samples=4, sampler="ddim", steps=10, gif_frames=0, device="cpu"))
    assert (out / "samples_ddim10.png").exists()
    eta0 = (out / "samples_ddim10.png").read_bytes()  # an eta = 1 grid (the demo's) is its own file, not this one
    sample.main(sample.Config(out_dir=str(out), num_samples=4, sampler="ddim", steps=10, eta=1.0, gif_frames=2,
                              device="cpu"))
    assert (out / "samples_ddim10_eta1.png").exists() and (out / "reverse_ddim10_eta1.gif").exists()
    assert (out / "samples_ddim10.png").read_bytes() == eta0
    res = evaluate.main(evaluate.Config(out_dir=str(out), num_samples=0, nll_images=8, nll_t=None, device="cpu"))
    assert 0 < res["nll_bpd"] < 20
    s2 = train.main(train.Config(out_dir=str(out), steps=65, resume=True, **TINY))
    assert s2["steps"] == 65
    r = subprocess.run([sys.executable, "ddpm/sample.py", "--out-dir", str(out), "--sampler", "ddim", "--steps", "0"],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and "--steps" in r.stderr and "Traceback" not in r.stderr


def test_bad_input_exits_2(tmp_path):
    for cfg in [train.Config(dataset="nope"), train.Config(out_dir=str(tmp_path), resume=True, **TINY),
                train.Config(out_dir=str(tmp_path / "n"), norm="batch", **TINY)]:
        with pytest.raises(SystemExit) as e:
            train.main(cfg)
        assert e.value.code == 2


# ----------------------------------------------------------------------------- issue 21 items 14-18, issue 22, 24

class ExactEps(torch.nn.Module):
    """The exact noise predictor for the one-point data set {c}: eps = (x_t - sqrt(ab_t) c) / sqrt(1 - ab_t)."""

    def __init__(self, c, alpha_bar):
        super().__init__()
        self.c, self.alpha_bar = c, alpha_bar

    def forward(self, x, t):
        ab = self.alpha_bar[t].view(-1, 1, 1, 1)
        return (x - ab.sqrt() * self.c) / (1 - ab).sqrt()


class Scaled(torch.nn.Module):
    """eps_theta = -k x: a predictor whose x0-hat leaves [-1, 1], so the clipped path runs."""

    def __init__(self, k):
        super().__init__()
        self.k = k

    def forward(self, x, t):
        return -self.k * x


@pytest.mark.parametrize("spacing", ["uniform", "quadratic"])
def test_every_ddim_grid_ends_at_T_minus_1(spacing):
    """Item 14: ddim_timesteps(1) was [0], so one DDIM step ran the network at t = 0 on pure noise."""
    for T in (7, 50):
        d = Diffusion(Zero(), T=T)
        for S in range(1, T + 1):
            tau = d.ddim_timesteps(S, spacing)
            assert len(tau) == S and tau[-1] == T - 1 and (tau.diff() > 0).all() and tau[0] >= 0, (T, S, tau)
        with pytest.raises(ValueError):
            d.ddim_timesteps(T + 1, spacing)
        with pytest.raises(ValueError):
            d.ddim_timesteps(0, spacing)
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, x, t):
            seen.append(t.clone())
            return torch.zeros_like(x)
    Diffusion(Spy(), T=50).sample((2, 1, 4, 4), "cpu", "ddim", steps=1, spacing=spacing)
    assert len(seen) == 1 and (seen[0] == 49).all()


def _normal_cdf(x):
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


@pytest.mark.parametrize("sigma", ["beta_tilde", "beta"])
def test_nll_bound_closed_form_for_a_one_point_data_set(sigma):
    """Item 15. Data set {c} and the exact eps-predictor: p_theta's mean equals q's posterior mean, so
    L_{t-1} = KL(N(mu, beta_tilde_t) || N(mu, sigma_t^2)) = 0.5 (log(sigma^2 / beta_tilde) + beta_tilde / sigma^2 - 1)
    per pixel (0 for sigma = beta_tilde); L_T = KL(N(sqrt(ab_T) c, 1 - ab_T) || N(0, 1)); L_0 is the mass of c's bin
    under N(c, beta_tilde at the paper's t = 2), the decoder variance of Ho et al.'s code (diffusion_utils_2.py:
    the log-variance at t = 0 is log(posterior_variance[1]) for both fixedsmall and fixedlarge). All in float64."""
    T = 1000
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    ab = torch.cumprod(1 - betas, 0)
    ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    bt = betas * (1 - ab_prev) / (1 - ab)
    c = torch.tensor([-1.0, 1.0, 2 * 100 / 255 - 1, 2 * 37 / 255 - 1]).view(1, 1, 2, 2)
    d = Diffusion(Zero(), T=T, sigma=sigma)
    d.eps_model = ExactEps(c, d.alpha_bar)
    torch.manual_seed(0)
    got = d.nll_bound_bpd(c.repeat(3, 1, 1, 1)).double()
    L_T = sum(0.5 * ((1 - ab[-1]) + ab[-1] * v ** 2 - 1 - torch.log(1 - ab[-1])).item() for v in c.flatten().tolist())
    var_p = betas if sigma == "beta" else bt
    L_mid = 4 * (0.5 * (torch.log(var_p[1:] / bt[1:]) + bt[1:] / var_p[1:] - 1)).sum().item()
    s = bt[1].sqrt().item()
    edge = -math.log(_normal_cdf(1 / 255 / s))  # c = -1 or 1: the bin reaches to -inf / +inf
    interior = -math.log(_normal_cdf(1 / 255 / s) - _normal_cdf(-1 / 255 / s))
    ref = (L_T + L_mid + 2 * edge + 2 * interior) / (4 * math.log(2))
    assert torch.allclose(got, torch.full_like(got, ref), rtol=1e-4), (got, ref)


def test_nll_monte_carlo_over_t_is_unbiased_for_the_full_sum():
    """Exact eps-predictor with sigma = beta: each L_{t-1} is a known constant, so the Monte-Carlo estimate over t
    averages to the full sum within its own (computable) standard error."""
    T, K, num_t = 6, 600, 6
    c = torch.tensor([0.2, -0.6]).view(1, 1, 1, 2)
    d = Diffusion(Zero(), T=T, sigma="beta")
    d.eps_model = ExactEps(c, d.alpha_bar)
    full = d.nll_bound_bpd(c).item()
    terms = 0.5 * (torch.log(d.betas[1:] / d.beta_tilde[1:]) + d.beta_tilde[1:] / d.betas[1:] - 1).double() * 2
    se = (terms * (T - 1)).std(unbiased=False).item() / math.sqrt(K * num_t) / (2 * math.log(2))
    torch.manual_seed(0)
    mc = sum(d.nll_bound_bpd(c, num_t=num_t).item() for _ in range(K)) / K
    assert abs(mc - full) < 4 * se and 4 * se < 0.1 * terms.sum() / (2 * math.log(2)), (mc, full, se)


def test_ddim_clipped_x0_step_equals_the_ancestral_step():
    """The clipped-x0 DDIM path that produced every reported DDIM number: with eps re-derived from the clipped x0,
    the eta = 1 step between neighbouring timesteps is Algorithm 2's step with beta_tilde (the posterior mean at the
    clipped x0), the same x_{t-1} for the same noise; at eta = 0 the last step returns the clipped x0."""
    d = Diffusion(Scaled(3.0), T=100, sigma="beta_tilde", clip_denoised=True)
    torch.manual_seed(0)
    xt = torch.randn(2, 1, 8, 8)
    d.clip_denoised = False
    raw = d.predict_x0(xt, torch.full((2,), 40), d.eps_model(xt, None))
    d.clip_denoised = True
    assert (raw.abs() > 1).float().mean() > 0.3  # the clip is active on a good share of pixels
    for t in (40, 1):
        torch.manual_seed(1)
        a = d.p_sample(xt, t)
        torch.manual_seed(1)
        b = d.ddim_step(xt, t, t - 1, eta=1.0)
        assert torch.allclose(a, b, atol=1e-4)  # float32 buffers; the raw-eps variant is off by ~0.1
    x0 = d.ddim_step(xt, 40, -1, eta=0.0)
    assert torch.allclose(x0, raw.clamp(-1, 1), atol=1e-6)


def test_fid_equals_the_closed_form_for_known_moments():
    """Features with exactly chosen sample means and covariances: fid() equals ||mu1 - mu2||^2 +
    Tr(S1 + S2 - 2 (S1 S2)^(1/2)) computed with scipy's sqrtm (the formula of pytorch-fid)."""
    import scipy.linalg
    torch.manual_seed(0)
    n, dim = 500, 6

    def with_moments(mu, S):
        z = torch.randn(n, dim, dtype=torch.float64)
        z = z - z.mean(0)
        z = z @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(z.T))).T  # sample covariance exactly I
        return z @ torch.linalg.cholesky(S).T + mu

    A, B = torch.randn(dim, dim, dtype=torch.float64), torch.randn(dim, dim, dtype=torch.float64)
    S1, S2 = A @ A.T + 0.1 * torch.eye(dim), 4 * B @ B.T + torch.eye(dim)
    mu1, mu2 = torch.zeros(dim, dtype=torch.float64), torch.linspace(-2, 3, dim, dtype=torch.float64)
    f, g = with_moments(mu1, S1), with_moments(mu2, S2)
    covmean = scipy.linalg.sqrtm(S1.numpy() @ S2.numpy()).real
    ref = ((mu1 - mu2) ** 2).sum().item() + (S1.trace() + S2.trace()).item() - 2 * float(covmean.trace())
    assert abs(evaluate.fid(f, g) - ref) < 1e-6 * ref and abs(evaluate.fid(f, f)) < 1e-6


def test_feature_net_trains_fresh_under_no_grad_and_survives_a_corrupt_cache(tmp_path, monkeypatch):
    """Issue 24: evaluate.main runs under no_grad, and the first call trains the FID classifier inside it (was a
    RuntimeError on a machine without the cache). A corrupt cache file is rebuilt, not a torch.load traceback."""
    load = evaluate.D.load_images
    monkeypatch.setattr(evaluate.D, "load_images", lambda *a, **k: tuple(v[:256] for v in load(*a, **k)))  # fast
    with torch.no_grad():
        net = evaluate.feature_net("synthetic", torch.device("cpu"), epochs=1, cache_dir=tmp_path)
    assert (tmp_path / "fid_synthetic.pt").exists() and not net.training
    again = evaluate.feature_net("synthetic", torch.device("cpu"), epochs=1, cache_dir=tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values()))
    (tmp_path / "fid_synthetic.pt").write_bytes(b"not a checkpoint")
    with torch.no_grad():
        net = evaluate.feature_net("synthetic", torch.device("cpu"), epochs=1, cache_dir=tmp_path)
    assert torch.load(tmp_path / "fid_synthetic.pt", weights_only=True)["model"].keys() == net.state_dict().keys()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddpm_tiny") / "run"
    train.main(train.Config(out_dir=str(out), steps=20, **TINY))
    return out


def _copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_evaluate_keys_every_setting_and_scores_8bit_samples(tiny_run, tmp_path, monkeypatch):
    """Items 16 and 17: FID sees the generated images as the 8-bit pixels a user saves, and summary.json keeps one
    entry per sampler, steps, eta, spacing, sigma and seed (they overwrote each other), and per batch size where the
    batch size changes the chain's own noise (ancestral, DDIM eta > 0); DDIM eta = 0 scores the same at any batch."""
    out = _copy_run(tiny_run, tmp_path / "run")
    torch.manual_seed(0)
    net = evaluate.FeatureNet(1).eval()
    monkeypatch.setattr(evaluate, "feature_net", lambda *a, **k: net)
    seen, features = [], evaluate.features
    monkeypatch.setattr(evaluate, "features", lambda n, x, *a, **k: (seen.append(x.dtype), features(n, x, *a, **k))[1])
    runs = [dict(), dict(eta=1.0), dict(seed=1), dict(spacing="quadratic"), dict(steps=5),
            dict(sampler="ddpm", sigma="beta"), dict(sampler="ddpm", sigma="beta_tilde"),
            dict(sampler="ddpm", sigma="beta", batch_size=2), dict(eta=1.0, batch_size=2)]
    fids = [evaluate.main(evaluate.Config(out_dir=str(out), num_samples=4, device="cpu", **{"batch_size": 4, **kw}))
            ["fid"] for kw in runs + [dict(batch_size=2)]]
    assert seen and all(dt == torch.uint8 for dt in seen)
    entries = json.load(open(out / "summary.json"))["eval"]
    assert len(entries) == len(runs) and len({e["fid"] for e in entries.values()}) > 1
    assert fids[-1] == pytest.approx(fids[0], abs=1e-3)  # DDIM eta = 0 at batch 2: the first run's entry again
    assert sorted(p.name for p in out.glob("*.samples.pt")) == sorted(f"{k}.samples.pt" for k in entries)  # one each


def test_evaluate_fresh_machine_trains_the_fid_classifier_and_scores(tiny_run, tmp_path, monkeypatch):
    """Issue 24's crash, end to end: no cached classifier, num_samples > 0 (the smoke test passes 0)."""
    out = _copy_run(tiny_run, tmp_path / "run")
    load = evaluate.D.load_images
    monkeypatch.setattr(evaluate.D, "load_images", lambda *a, **k: tuple(v[:256] for v in load(*a, **k)))  # fast
    res = evaluate.main(evaluate.Config(out_dir=str(out), num_samples=8, batch_size=8, steps=5, device="cpu",
                                        fid_cache_dir=str(tmp_path / "cache"), fid_epochs=1))
    assert (tmp_path / "cache" / "fid_synthetic.pt").exists() and math.isfinite(res["fid"]) and res["fid_n"] == 8


def _fake_net(monkeypatch):
    torch.manual_seed(0)
    net = evaluate.FeatureNet(1).eval()
    monkeypatch.setattr(evaluate, "feature_net", lambda *a, **k: net)


def test_evaluate_starts_every_sampler_and_batch_size_from_the_same_noises(tiny_run, tmp_path, monkeypatch):
    """Issue 24's protocol, "every sampler starts from the same noises": one seed drew x_T batch by batch from the
    global stream, so after a sampler that draws chain noise (ancestral, eta > 0) the second batch started from
    other noises than DDIM eta = 0's. The stand-in sampler draws x_T as Diffusion.sample does, then chain noise."""
    out = _copy_run(tiny_run, tmp_path / "run")
    _fake_net(monkeypatch)
    starts = []

    def fake_sample(self, shape, device, sampler="ddpm", steps=None, eta=0.0, *a, x_T=None, **k):
        x = torch.randn(shape) if x_T is None else x_T
        starts[-1].append(x.clone())
        for _ in range(3 if sampler == "ddpm" or eta > 0 else 0):
            torch.randn(shape)  # the chain's own noise
        return x.clamp(-1, 1), []

    monkeypatch.setattr(Diffusion, "sample", fake_sample)
    for kw in [dict(sampler="ddpm"), dict(sampler="ddim"), dict(sampler="ddim", eta=1.0), dict(batch_size=3)]:
        starts.append([])
        evaluate.main(evaluate.Config(out_dir=str(out), num_samples=8, **{"batch_size": 4, **kw}, device="cpu"))
    first = torch.cat(starts[0])
    assert len(starts[0]) == 2 and all(torch.equal(torch.cat(s), first) for s in starts[1:])


def test_sample_starts_from_the_given_x_T_whatever_the_global_seed():
    """evaluate.generate pairs samplers through Diffusion.sample's x_T: a deterministic chain from a given x_T does
    not depend on the global RNG, its first snapshot is x_T, and it equals the chain that drew the same x_T itself."""
    torch.manual_seed(0)
    d = Diffusion(UNet(UNetConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1)), T=50).eval()
    torch.manual_seed(3)
    drawn, _ = d.sample((2, 1, 8, 8), "cpu", "ddim", steps=5)
    torch.manual_seed(3)
    x_T = torch.randn(2, 1, 8, 8)
    torch.manual_seed(4)
    given, traj = d.sample(x_T.shape, "cpu", "ddim", steps=5, trajectory_every=1, x_T=x_T)
    assert torch.equal(given, drawn) and torch.equal(traj[0], x_T)
    torch.manual_seed(4)
    assert not torch.equal(d.sample(x_T.shape, "cpu", "ddim", steps=5)[0], drawn)


def test_evaluate_continues_an_interrupted_sampling_after_its_last_batch(tiny_run, tmp_path, monkeypatch):
    """A Ctrl-C in batch 2 of 3 keeps batch 1 in <setting>.samples.pt; the rerun samples batches 2 and 3 only and
    scores what an uninterrupted run scores (the chain noise is seeded per batch); a third run samples nothing, unless
    the kept samples were drawn by another SAMPLES_VERSION. Another batch size is another setting (other chain
    noise): it starts over in its own file."""
    _fake_net(monkeypatch)
    kw = dict(num_samples=6, batch_size=2, sampler="ddim", steps=5, eta=1.0, device="cpu")
    ref = evaluate.main(evaluate.Config(out_dir=str(_copy_run(tiny_run, tmp_path / "ref")), **kw))
    out, calls, real = _copy_run(tiny_run, tmp_path / "run"), [], Diffusion.sample

    def counted(self, *a, **k):
        calls.append(1)
        if len(calls) == 2 and interrupt:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(Diffusion, "sample", counted)
    interrupt = True
    with pytest.raises(KeyboardInterrupt):
        evaluate.main(evaluate.Config(out_dir=str(out), **kw))
    kept = list(out.glob("*.samples.pt"))
    assert len(kept) == 1 and len(torch.load(kept[0], weights_only=True)["samples"]) == 1
    interrupt, calls[:] = False, []
    res = evaluate.main(evaluate.Config(out_dir=str(out), **kw))
    assert len(calls) == 2 and res["fid"] == ref["fid"] and kept[0].name == res["keys"][0] + ".samples.pt"
    calls[:] = []
    assert evaluate.main(evaluate.Config(out_dir=str(out), **kw))["fid"] == ref["fid"] and not calls
    state = torch.load(kept[0], weights_only=True)
    torch.save({**state, "version": evaluate.SAMPLES_VERSION - 1}, kept[0])  # drawn by another sampling code
    assert evaluate.main(evaluate.Config(out_dir=str(out), **kw))["fid"] == ref["fid"] and len(calls) == 3
    calls[:] = []
    res = evaluate.main(evaluate.Config(out_dir=str(out), **{**kw, "batch_size": 3}))
    key = res["keys"][0]
    assert len(calls) == 2 and "_b3_" in key and len(list(out.glob("*.samples.pt"))) == 2


def test_evaluate_scores_the_same_samples_against_training_images_for_choices(tiny_run, tmp_path, monkeypatch):
    """--fid-ref train (what presets and samplers are chosen on, so the test images only report): the kept samples
    of the setting are scored again without sampling, against a fixed draw of training images that does not depend
    on --seed, under a key of its own; the test-referenced entry stays."""
    _fake_net(monkeypatch)
    out, calls, real = _copy_run(tiny_run, tmp_path / "run"), [], Diffusion.sample
    monkeypatch.setattr(Diffusion, "sample", lambda self, *a, **k: (calls.append(1), real(self, *a, **k))[1])
    scored, features = [], evaluate.features
    monkeypatch.setattr(evaluate, "features", lambda n, x, *a, **k: (scored.append(x), features(n, x, *a, **k))[1])
    kw = dict(num_samples=8, batch_size=4, sampler="ddim", steps=5, device="cpu")
    test = evaluate.main(evaluate.Config(out_dir=str(out), **kw))
    calls[:] = []
    train = evaluate.main(evaluate.Config(out_dir=str(out), fid_ref="train", **kw))
    assert not calls and train["keys"] == [test["keys"][0] + "_reftrain"] and train["fid"] != test["fid"]
    evaluate.main(evaluate.Config(out_dir=str(out), fid_ref="train", **{**kw, "seed": 1}))  # other samples, same ref
    assert torch.equal(scored[3], scored[5]) and not torch.equal(scored[2], scored[4])
    assert torch.equal(scored[3], evaluate.training_draw("synthetic", 8))
    entries = json.load(open(out / "summary.json"))["eval"]
    assert entries[test["keys"][0]]["fid_ref"] == "test" and entries[train["keys"][0]]["fid_ref"] == "train"
    xtr, _ = evaluate.D.load_images("synthetic", "train")
    r = evaluate.training_draw("synthetic", 8)
    assert torch.equal(r, evaluate.training_draw("synthetic", 8)) and not torch.equal(r, xtr[:8])
    assert any(torch.equal(r[0], x) for x in xtr)


def test_to_8bit_is_what_a_saved_png_holds():
    from utils import plot as P
    x = torch.rand(3, 1, 5, 5) * 2.2 - 1.1
    ref = torch.from_numpy(P.to_uint8((x + 1) / 2)).permute(0, 3, 1, 2)
    assert evaluate.to_8bit(x).dtype == torch.uint8 and torch.equal(evaluate.to_8bit(x), ref)


def test_resume_of_a_finished_run_keeps_final_loss_and_eval(tiny_run, tmp_path):
    """Item 18: resuming a finished run wrote final_loss 0 and erased the eval section evaluate.py stored."""
    out = _copy_run(tiny_run, tmp_path / "run")
    s = json.load(open(out / "summary.json"))
    s["eval"] = {"some_key": {"fid": 12.5}}
    (out / "summary.json").write_text(json.dumps(s))
    s2 = train.main(train.Config(out_dir=str(out), steps=20, resume=True, **TINY))
    s3 = json.load(open(out / "summary.json"))
    assert s2["steps"] == 20 and abs(s3["final_loss"] - s["final_loss"]) < 1e-9 and s3["eval"] == s["eval"]


@pytest.mark.parametrize("change", [dict(schedule="cosine"), dict(T=60), dict(ch=16), dict(sigma="beta_tilde")])
def test_resume_with_other_architecture_or_schedule_exits_2(tiny_run, tmp_path, change, capsys):
    """Item 18: a resume with other schedule flags silently kept the old betas (or gave a load_state_dict traceback);
    now one `error:` line names the differing flag."""
    out = _copy_run(tiny_run, tmp_path / "run")
    with pytest.raises(SystemExit) as e:
        train.main(train.Config(out_dir=str(out), steps=25, resume=True, **{**TINY, **change}))
    err = capsys.readouterr().err.strip()
    (field,) = change
    assert e.value.code == 2 and err.startswith("error:") and len(err.splitlines()) == 1, err
    assert f"--{field.replace('_', '-')} " in err, err


@pytest.mark.parametrize("where", ["data", "step", "update"])
def test_sigterm_saves_and_resume_continues_exactly(where, tmp_path, monkeypatch, sigterm_after_update):
    """SIGTERM takes the Ctrl-C path and saves ckpt.pt; --resume then continues exactly where it stopped (RNG state,
    position in the epoch, optimizer, EMA, metrics): k steps + SIGTERM + resume to 6 equals 6 uninterrupted steps.
    A SIGTERM while step 4 prepares its batch saves the state step 4 started from (k = 3); one as its update begins
    waits for the step (k = 4); one at the end of step 3's Adam update, before its EMA update, its count and its log
    row, waits for them (k = 3)."""
    cfg = dict(TINY, sample_interval=4, log_interval=1)
    train.main(train.Config(out_dir=str(tmp_path / "a"), steps=6, **cfg))
    step_fn, to_unit = train.train_step, train.D.to_unit_range

    def sigterm_at_step_4(fn, when):
        calls = []

        def wrapped(*a, **k):
            calls.append(1)
            if len(calls) == 4 and where == when:
                assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None), "SIGTERM would kill the run"
                os.kill(os.getpid(), signal.SIGTERM)
            return fn(*a, **k)
        return wrapped
    monkeypatch.setattr(train, "train_step", sigterm_at_step_4(step_fn, "step"))
    monkeypatch.setattr(train.D, "to_unit_range", sigterm_at_step_4(to_unit, "data"))
    disarm = sigterm_after_update(2) if where == "update" else (lambda: None)
    old = signal.getsignal(signal.SIGTERM)
    try:
        s = train.main(train.Config(out_dir=str(tmp_path / "b"), steps=6, **cfg))
    finally:
        signal.signal(signal.SIGTERM, old)
    monkeypatch.setattr(train, "train_step", step_fn)
    monkeypatch.setattr(train.D, "to_unit_range", to_unit)
    disarm()
    k = 4 if where == "step" else 3
    assert s["steps"] == k and torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["step"] == k
    train.main(train.Config(out_dir=str(tmp_path / "b"), steps=6, resume=True, **cfg))
    a, b = (torch.load(tmp_path / r / "ckpt.pt", weights_only=True) for r in "ab")
    for k in ("model", "ema"):
        assert all(torch.equal(a[k][n], b[k][n]) for n in a[k]), k
    la, lb = ([json.loads(x)["loss"] for x in open(tmp_path / r / "metrics.jsonl") if '"loss"' in x] for r in "ab")
    assert la == lb


def test_zero_warmup_and_zero_sample_interval_run(tmp_path):
    """Issue 22: --warmup 0 and --sample-interval 0 were ZeroDivisionErrors."""
    s = train.main(train.Config(out_dir=str(tmp_path), steps=2, **dict(TINY, warmup=0, sample_interval=0)))
    assert s["steps"] == 2 and (tmp_path / "samples_step2.png").exists()


BAD = [
    (train, ["--warmup", "-1"]), (train, ["--log-interval", "0"]), (train, ["--sample-interval", "-1"]),
    (train, ["--ch", "136"]), (train, ["--ch", "7"]), (train, ["--ch", "2"]), (train, ["--T", "1"]),
    (train, ["--T", "100000000"]), (train, ["--ema-decay", "1.5"]), (train, ["--dropout", "1"]),
    (train, ["--attn-levels", "3"]), (train, ["--ch-mult", "1", "0"]), (train, ["--batch-size", "0"]),
    (train, ["--lr", "0"]), (train, ["--grad-clip", "-1"]), (train, ["--num-res-blocks", "0"]),
    (train, ["--norm", "batch"]), (train, ["--schedule", "quad"]), (train, ["--steps", "0"]),
    (evaluate, ["--steps", "0"]), (evaluate, ["--steps", "-1"]), (evaluate, ["--nll-t", "0"]),
    (evaluate, ["--batch-size", "0"]), (evaluate, ["--eta", "-0.5"]), (evaluate, ["--eta", "2"]),
    (evaluate, ["--sampler", "euler"]), (evaluate, ["--num-samples", "-1"]), (evaluate, ["--spacing", "log"]),
    (evaluate, ["--ckpt", "/nonexistent/ckpt.pt"]), (evaluate, ["--num-samples", "0", "--nll-images", "0"]),
    (sample, ["--steps", "0"]), (sample, ["--num-samples", "0"]), (sample, ["--eta", "3"]),
    (sample, ["--gif-frames", "-1"]), (sample, ["--sampler", "euler"]),
    (bench, ["--steps", "0"]), (bench, ["--ch", "136"]), (bench, ["--models", "mine"]), (bench, ["--chunk", "0"]),
    (bench, ["--fid-samples", "0"]), (bench, ["--batch-size", "0"]),
    # issue 24: DPM-Solver++ and the training options
    (sample, ["--sampler", "dpm++", "--eta", "0.5"]), (sample, ["--sampler", "dpm++", "--spacing", "quadratic"]),
    (evaluate, ["--sampler", "dpm++", "--eta", "1"]), (evaluate, ["--sampler", "dpm++", "--steps", "0"]),
    (sample, ["--sampler", "heun"]), (train, ["--parameterization", "x0"]), (train, ["--loss-weight", "snr"]),
    (train, ["--min-snr-gamma", "0"]), (train, ["--min-snr-gamma", "-5"]),
]


@pytest.mark.parametrize("mod,args", BAD, ids=[f"{m.__name__.split('.')[-1]} {' '.join(a)}" for m, a in BAD])
def test_bad_flags_are_one_line_errors_at_parse_time(mod, args, capsys):
    """Issue 22: each of these crashed later with a traceback, ran something else than recorded, or hung."""
    with pytest.raises(SystemExit) as e:
        R.parse(mod.Config, getattr(mod, "PRESETS", None), args=args + ["--device", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err and ("error:" in err or "invalid choice" in err.lower()), err


@pytest.mark.parametrize("mod,args", [(evaluate, ["--steps", "51"]), (evaluate, ["--steps", "60", "--spacing",
                                      "quadratic"]), (sample, ["--sampler", "ddim", "--steps", "51"])])
def test_steps_beyond_the_checkpoints_T_is_one_line(tiny_run, mod, args, capsys):
    """--steps 1200 --spacing quadratic was an IndexError: steps are checked against the checkpoint's T (50 here)."""
    with pytest.raises(SystemExit) as e:
        mod.main(R.parse(mod.Config, None, args=["--out-dir", str(tiny_run), "--device", "cpu", "--num-samples", "2"]
                         + args))
    assert e.value.code == 2 and "--steps" in capsys.readouterr().err


def test_batch_larger_than_the_data_set_is_refused(tmp_path, capsys):
    """Issue 22: --dataset synthetic --batch-size 2048 looped forever in train.py."""
    with pytest.raises(SystemExit) as e:
        train.main(train.Config(out_dir=str(tmp_path), steps=2, **dict(TINY, batch_size=2048)))
    assert e.value.code == 2 and "error:" in capsys.readouterr().err


# ----------------------------------------------------------------------------- issue 24: DPM-Solver++, v, min-SNR

from ddpm.solvers import dpm_solver_pp_step, logsnr_timesteps  # noqa: E402

MU, SD = torch.tensor([-0.3, 0.0, 0.3]), torch.tensor([0.15, 0.25, 0.2])  # toy data: x0 ~ N(MU, SD^2) per dim


class GaussianEps(torch.nn.Module):
    """The exact eps-predictor for x0 ~ N(mu, s^2): x_t ~ N(sqrt(ab) mu, ab s^2 + 1 - ab), so
    eps*(x_t, t) = -sqrt(1 - ab) score = sqrt(1 - ab) (x_t - sqrt(ab) mu) / (ab s^2 + 1 - ab)."""

    def __init__(self, alpha_bar, mu=MU, sd=SD):
        super().__init__()
        self.alpha_bar, self.mu, self.sd = alpha_bar, mu, sd

    def forward(self, x, t):
        ab = self.alpha_bar[t].view(-1, *[1] * (x.dim() - 1))
        return (1 - ab).sqrt() * (x - ab.sqrt() * self.mu) / (ab * self.sd ** 2 + 1 - ab)


class GaussianV(GaussianEps):
    """The exact v-predictor, v* = sqrt(ab) eps* - sqrt(1 - ab) E[x0 | x_t], from the Gaussian posterior mean
    E[x0 | x_t] = mu + s^2 sqrt(ab) (x_t - sqrt(ab) mu) / (ab s^2 + 1 - ab): no eps <-> x0 conversion of the code."""

    def forward(self, x, t):
        ab = self.alpha_bar[t].view(-1, *[1] * (x.dim() - 1))
        x0 = self.mu + self.sd ** 2 * ab.sqrt() * (x - ab.sqrt() * self.mu) / (ab * self.sd ** 2 + 1 - ab)
        return ab.sqrt() * super().forward(x, t) - (1 - ab).sqrt() * x0


def _gaussian_diffusion(parameterization="eps", clip=False, T=1000):
    d = Diffusion(Zero(), T=T, clip_denoised=clip, parameterization=parameterization)
    d.eps_model = (GaussianEps if parameterization == "eps" else GaussianV)(d.alpha_bar)
    return d


def test_logsnr_grid_is_uniform_in_lambda_and_spans_the_chain():
    """The DPM-Solver++ grid against lambda_t = log(sqrt(ab) / sqrt(1 - ab)) computed here in float64 from the
    paper's betas: every point sits within one discrete step of its target lambda_{T-1} + i (lambda_0 - lambda_{T-1}) /
    (S - 1); every S in 1..T gives S strictly increasing steps from 0 to T - 1 (S = T: all of them)."""
    T = 1000
    d = Diffusion(Zero(), T=T)
    ab = torch.cumprod(1 - torch.linspace(1e-4, 0.02, T, dtype=torch.float64), 0)
    lam = 0.5 * torch.log(ab / (1 - ab))
    for S in (10, 20, 50):
        tau = logsnr_timesteps(d.alpha_bar, S)
        target = torch.linspace(lam[0].item(), lam[-1].item(), S, dtype=torch.float64)
        assert tau[0] == 0 and tau[-1] == T - 1 and (tau.diff() > 0).all()
        for i in range(1, S - 1):
            lo, hi = lam[min(tau[i] + 1, T - 1)], lam[max(tau[i] - 1, 0)]  # lambda decreases in t
            assert lo - 1e-6 <= target[i] <= hi + 1e-6 or tau[i] == tau[i - 1] + 1, (S, i, tau[i])
    for T in (7, 50):
        d = Diffusion(Zero(), T=T)
        for S in range(1, T + 1):
            tau = logsnr_timesteps(d.alpha_bar, S)
            assert len(tau) == S and tau[-1] == T - 1 and (tau.diff() > 0).all() and tau[0] >= 0, (T, S, tau)
        assert torch.equal(logsnr_timesteps(d.alpha_bar, T), torch.arange(T))
        for S in (0, T + 1):
            with pytest.raises(ValueError):
                logsnr_timesteps(d.alpha_bar, S)


@pytest.mark.parametrize("clip", [False, True])
def test_dpm_solver_first_order_step_is_the_ddim_eta0_update(clip):
    """Lu et al. 2022: the first-order DPM-Solver++ step is DDIM (eta = 0). Same x_t, same timesteps, also
    the last step to the data (t = -1) and the clipped-x0 path; and a whole order-1 chain on the logSNR grid equals
    DDIM's steps run by hand on that grid."""
    torch.manual_seed(0)
    if clip:
        model = Scaled(3.0)  # x0-hat leaves [-1, 1]: the clip is active
    else:
        model = UNet(UNetConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1))
        for p in model.parameters():
            p.data.normal_(0, 0.05)
    d = Diffusion(model, T=100, clip_denoised=clip).eval()
    xt = torch.randn(2, 1, 8, 8)
    for s, t in [(99, 60), (40, 39), (10, 0), (5, -1), (0, -1)]:
        a, _ = dpm_solver_pp_step(d, xt, s, t, prev=None)
        assert torch.allclose(a, d.ddim_step(xt, s, t, eta=0.0), atol=1e-5), (s, t)
    torch.manual_seed(1)
    x1, _ = d.sample((2, 1, 8, 8), "cpu", "dpm++", steps=7, order=1)
    torch.manual_seed(1)
    x = torch.randn(2, 1, 8, 8)
    tau = logsnr_timesteps(d.alpha_bar, 7).tolist()
    for i in range(len(tau) - 1, -1, -1):
        x = d.ddim_step(x, tau[i], tau[i - 1] if i else -1, eta=0.0)
    assert torch.allclose(x1, x.clamp(-1, 1), atol=1e-5)


def test_dpm_solver_second_order_step_is_algorithm_2():
    """DPM-Solver++(2M), Lu et al. 2022 Algorithm 2, written out here in float64 from the paper's betas on unevenly
    spaced times (r = h_prev / h far from 1, where a wrong r-coefficient shows): D = (1 + 1/(2r)) x0_s - 1/(2r) x0_u,
    x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) D."""
    T = 1000
    ab = torch.cumprod(1 - torch.linspace(1e-4, 0.02, T, dtype=torch.float64), 0)
    d = _gaussian_diffusion(T=T)
    torch.manual_seed(0)
    xs, x0_u = torch.randn(5, 3), torch.rand(5, 3) * 2 - 1
    for u, s, t in [(900, 700, 100), (300, 250, 20), (999, 100, 60)]:
        lam = {k: 0.5 * math.log(ab[k] / (1 - ab[k])) for k in (u, s, t)}
        h, r = lam[t] - lam[s], (lam[s] - lam[u]) / (lam[t] - lam[s])
        x0_s = d.denoise(xs, torch.full((5,), s))[0].double()
        D = (1 + 1 / (2 * r)) * x0_s - 1 / (2 * r) * x0_u.double()
        ref = (1 - ab[t]).sqrt() / (1 - ab[s]).sqrt() * xs.double() - ab[t].sqrt() * (math.exp(-h) - 1) * D
        got, (x0_out, s_out) = dpm_solver_pp_step(d, xs, s, t, prev=(x0_u, u))
        assert abs(r - 1) > 0.3 and s_out == s and torch.allclose(x0_out.double(), x0_s)
        assert torch.allclose(got.double(), ref, atol=1e-5), (u, s, t)


def test_every_sampler_matches_the_moments_of_gaussian_data():
    """x0 ~ N(mu, s^2) per dimension with the exact eps-predictor: ancestral (T = 1000), DDIM eta 0 and 1 (200
    quadratic steps) and DPM-Solver++ (20 steps) all give samples with the data's mean (4 standard errors) and
    variance (within 10%), 4000 samples."""
    d = _gaussian_diffusion()
    n = 4000
    runs = {"ddpm": dict(sampler="ddpm"), "ddim eta 0": dict(sampler="ddim", steps=200, spacing="quadratic"),
            "ddim eta 1": dict(sampler="ddim", steps=200, spacing="quadratic", eta=1.0),
            "dpm++ 20": dict(sampler="dpm++", steps=20), "dpm++ 10": dict(sampler="dpm++", steps=10)}
    for name, kw in runs.items():
        torch.manual_seed(0)
        x, _ = d.sample((n, 3), "cpu", **kw)
        assert ((x.mean(0) - MU).abs() < 4 * SD / n ** 0.5).all(), (name, x.mean(0))
        assert ((x.var(0) / SD ** 2 - 1).abs() < 0.1).all(), (name, x.var(0) / SD ** 2)


def test_dpm_solver_20_steps_is_closer_to_the_exact_ode_solution_than_ddim_20():
    """The probability-flow ODE of Gaussian data keeps the standardized value z = (x_t - sqrt(ab_t) mu) / sd_t, so
    from x_{T-1} its solution at the data is mu + s z exactly. DDIM with S = 1000 lands on it (a check of the
    reference: rms 0.0018 vs 0.057 for DDIM-20); DPM-Solver++(2M) with 20 steps is at least 5x closer (measured
    13-19x) to both than DDIM with 20 uniform steps, and the second order beats the first on the same grid."""
    d = _gaussian_diffusion()
    torch.manual_seed(0)
    xT = torch.randn(2000, 3)
    ab = d.alpha_bar[-1]
    exact = MU + SD * (xT - ab.sqrt() * MU) / (ab * SD ** 2 + 1 - ab).sqrt()

    def run(sampler, steps, order=2):
        torch.manual_seed(0)
        return d.sample((2000, 3), "cpu", sampler, steps, order=order)[0]

    def rms(a, b):
        return (a - b).pow(2).mean().sqrt().item()
    ddim1000, ddim20, dpm20, dpm20_first = run("ddim", 1000), run("ddim", 20), run("dpm++", 20), run("dpm++", 20, 1)
    assert rms(ddim1000, exact) < 0.1 * rms(ddim20, exact)
    for ref in (exact, ddim1000):
        assert rms(dpm20, ref) < 0.2 * rms(ddim20, ref) and rms(dpm20, ref) < 0.5 * rms(dpm20_first, ref)


def test_v_and_eps_conversions_round_trip():
    """Salimans & Ho 2022: v = sqrt(ab) eps - sqrt(1 - ab) x0 (computed here in float64 from the paper's
    betas). predict_x0_eps turns v, or eps, and x_t back into (x0, eps); the v-model's loss target is that v."""
    T = 1000
    ab64 = torch.cumprod(1 - torch.linspace(1e-4, 0.02, T, dtype=torch.float64), 0)
    torch.manual_seed(0)
    x0, eps = torch.rand(4, 1, 3, 3, dtype=torch.float64) * 2 - 1, torch.randn(4, 1, 3, 3, dtype=torch.float64)
    t = torch.tensor([0, 1, 500, 999])
    ab = ab64[t].view(4, 1, 1, 1)
    xt, v = ab.sqrt() * x0 + (1 - ab).sqrt() * eps, ab.sqrt() * eps - (1 - ab).sqrt() * x0
    for param, out in (("v", v), ("eps", eps)):
        d = Diffusion(Zero(), T=T, clip_denoised=False, parameterization=param)
        x0_hat, eps_hat = d.predict_x0_eps(out.float(), xt.float(), t)
        assert torch.allclose(eps_hat.double(), eps, atol=1e-5), param
        assert torch.allclose(x0_hat.double(), x0, atol=1e-5 if param == "v" else 2e-2), param  # eps: / sqrt(ab_999)

    class Returns(torch.nn.Module):
        def forward(self, x, t_):
            return v.float()
    d = Diffusion(Returns(), T=T, parameterization="v")
    assert d.loss(x0.float(), t, eps.float()).item() < 1e-10
    d.eps_model = Zero()
    assert abs(d.loss(x0.float(), t, eps.float()).item() - v.pow(2).mean().item()) < 1e-6


@pytest.mark.parametrize("param", ["eps", "v"])
def test_min_snr_weights_equal_the_closed_form(param):
    """Hang et al. 2023: SNR_t = ab / (1 - ab) (float64 from the paper's betas); weight min(SNR, gamma) / SNR on the
    eps loss, min(SNR, gamma) / (SNR + 1) on the v loss; the loss is the weighted mean of per-image squared errors."""
    T, gamma = 1000, 5.0
    ab = torch.cumprod(1 - torch.linspace(1e-4, 0.02, T, dtype=torch.float64), 0)
    snr = ab / (1 - ab)
    ref = snr.clamp(max=gamma) / (snr if param == "eps" else snr + 1)
    d = Diffusion(Zero(), T=T, parameterization=param, loss_weight="min-snr", min_snr_gamma=gamma)
    t = torch.arange(T)
    assert torch.allclose(d.snr_weight(t).double(), ref, rtol=1e-3)  # float32 buffers: 1 - ab_0 = 1e-4
    assert (ref[snr < gamma] == 1).all() if param == "eps" else torch.allclose(ref[snr > gamma], gamma / (snr + 1)[
        snr > gamma])
    torch.manual_seed(0)
    x0, eps, t = torch.rand(6, 1, 4, 4) * 2 - 1, torch.randn(6, 1, 4, 4), torch.tensor([0, 3, 30, 100, 500, 999])
    target = eps if param == "eps" else ab[t].sqrt().view(-1, 1, 1, 1).float() * eps - (1 - ab[t]).sqrt().view(
        -1, 1, 1, 1).float() * x0
    want = (ref[t] * target.double().pow(2).mean((1, 2, 3))).mean()
    assert abs(d.loss(x0, t, eps).item() - want.item()) < 1e-5 * want.item()


@pytest.mark.parametrize("sampler,kw", [("ddpm", {}), ("ddim", dict(steps=20)), ("ddim", dict(steps=20, eta=1.0)),
                                        ("dpm++", dict(steps=10))])
def test_every_sampler_and_the_bound_accept_v_prediction(sampler, kw):
    """The exact v-predictor of the Gaussian toy (GaussianV: its own closed form, no conversion of the code) gives
    the same samples as the exact eps-predictor from the same noise, clipped or not, and the same NLL bound."""
    for clip in (False, True):
        out = []
        for param in ("eps", "v"):
            d = _gaussian_diffusion(param, clip=clip, T=200)
            torch.manual_seed(0)
            out.append(d.sample((64, 3), "cpu", sampler, **kw)[0])
        assert torch.allclose(out[0], out[1], atol=1e-4), (sampler, clip, (out[0] - out[1]).abs().max())
    x0 = (MU + SD * torch.randn(8, 3)).clamp(-1, 1).view(8, 1, 1, 3)
    bounds = []
    for param in ("eps", "v"):
        d = _gaussian_diffusion(param, T=200)
        d.eps_model.mu, d.eps_model.sd = MU.view(1, 1, 3), SD.view(1, 1, 3)
        torch.manual_seed(0)
        bounds.append(d.nll_bound_bpd(x0, num_t=20))
    assert torch.allclose(bounds[0], bounds[1], rtol=1e-4)


@pytest.fixture(scope="module")
def tiny_v_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddpm_v") / "run"
    train.main(train.Config(out_dir=str(out), steps=25, **dict(TINY, log_interval=5, parameterization="v")))
    return out


def _loss_falls(out):
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    first, last = rows[0]["loss"], rows[-1]["loss"]
    assert all(math.isfinite(r["loss"]) for r in rows) and last < 0.8 * first, (first, last)


@pytest.mark.parametrize("options", [dict(parameterization="v"), dict(loss_weight="min-snr"),
                                     dict(parameterization="v", loss_weight="min-snr", min_snr_gamma=1.0)])
def test_tiny_model_trains_with_each_option(options, tiny_v_run, tmp_path):
    """Loss falls over 25 steps; the checkpoint stores the parameterization in its `diffusion` model config."""
    if options == dict(parameterization="v"):
        out = tiny_v_run
    else:
        out = tmp_path / "run"
        train.main(train.Config(out_dir=str(out), steps=25, **dict(TINY, log_interval=5, **options)))
    _loss_falls(out)
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["diffusion"]["parameterization"] == options.get("parameterization", "eps")
    assert ckpt["config"]["loss_weight"] == options.get("loss_weight", "none")


def test_sample_and_evaluate_use_the_checkpoints_parameterization(tiny_v_run, tmp_path, monkeypatch):
    """A v-checkpoint is sampled and bounded as v: load_diffusion reads it, so sample.py's images equal a v-model's
    chain run here, and differ from the same weights read as eps; every sampler runs; a stored value that is neither
    is one error line."""
    out = _copy_run(tiny_v_run, tmp_path / "run")
    d, _ = sample.load_diffusion(out / "ckpt.pt", torch.device("cpu"))
    assert d.parameterization == "v"
    grids = {}
    monkeypatch.setattr(sample.P, "save_grid", lambda x, path, **k: grids.__setitem__(path.name, x.clone()))
    for sampler in ("ddpm", "ddim", "dpm++"):
        r = sample.main(sample.Config(out_dir=str(out), num_samples=4, sampler=sampler, steps=5, gif_frames=0,
                                      device="cpu"))
        assert r["parameterization"] == "v"
    for param, same in (("v", True), ("eps", False)):
        d.parameterization = param
        torch.manual_seed(0)
        x, _ = d.sample((4, 1, 28, 28), "cpu", "dpm++", 5)
        assert torch.allclose((x + 1) / 2, grids["samples_dpmpp5.png"], atol=1e-5) == same, param
    res = evaluate.main(evaluate.Config(out_dir=str(out), num_samples=0, nll_images=4, nll_t=5, device="cpu"))
    assert math.isfinite(res["nll_bpd"])
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    ckpt["diffusion"]["parameterization"] = "x0"
    torch.save(ckpt, out / "ckpt.pt")
    with pytest.raises(SystemExit) as e:
        sample.main(sample.Config(out_dir=str(out), num_samples=4, gif_frames=0, device="cpu"))
    assert e.value.code == 2




@pytest.mark.parametrize("mod", [sample, evaluate])
def test_dpm_steps_beyond_the_checkpoints_T_is_one_line(tiny_run, mod, capsys):
    with pytest.raises(SystemExit) as e:
        mod.main(R.parse(mod.Config, None, args=["--out-dir", str(tiny_run), "--device", "cpu", "--num-samples", "2",
                                                 "--sampler", "dpm++", "--steps", "51"]))
    assert e.value.code == 2 and "--steps" in capsys.readouterr().err


def test_a_fresh_run_does_not_inherit_an_old_runs_eval_results(tmp_path):
    """summary.json's `eval` section is kept on --resume (evaluate.py wrote it for this run), but a new run into the
    same folder must not carry the old model's FIDs under keys that look current."""
    out = tmp_path / "run"
    out.mkdir()
    R.write_json(out / "summary.json", {"eval": {"fid_ddim50_uniform_eta0_seed0_n10_step2": 1.0}})
    train.main(train.Config(out_dir=str(out), steps=2, **TINY))
    assert "eval" not in R.read_json(out / "summary.json")


def test_resume_with_another_number_of_processes_is_one_line(tiny_run, tmp_path, capsys):
    """The batch position a resume continues from depends on the world size: another one is refused."""
    run = _copy_run(tiny_run, tmp_path / "run")
    ckpt = torch.load(run / "ckpt.pt", weights_only=True)
    R.save_checkpoint({**ckpt, "world": 2}, run / "ckpt.pt")
    with pytest.raises(SystemExit) as e:
        train.main(train.Config(out_dir=str(run), steps=30, resume=True, **TINY))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "process" in err and len(err.splitlines()) == 1, err
