import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from ddpm import evaluate, sample, train
from ddpm.model import EMA, Diffusion, cosine_betas, discretized_gaussian_log_likelihood, linear_betas
from ddpm.unet import AttnBlock, LinearAttnBlock, PixelRMSNorm, ResBlock, UNet, UNetConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(dataset="synthetic", ch=8, ch_mult=(1, 2), num_res_blocks=1, T=50, batch_size=32, device="cpu",
            warmup=10, sample_interval=1000, log_interval=10, lr=2e-3)


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
