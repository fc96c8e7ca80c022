import json
import math
import os
import subprocess
import sys

import pytest
import torch

from nf import train
from nf.model import (ActNorm, AffineCoupling, BatchNormFlow, FlowConfig, Logit, RealNVP, Squeeze)
from utils import run as R

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(dataset="synthetic", hidden=8, num_blocks=1, final_couplings=2, batch_size=32, device="cpu",
            eval_interval=40, eval_batches=1, log_interval=10, cpu_bf16=False)


def tiny(out, **kw):
    return R.preset(train.PRESETS, "quick", out_dir=str(out), **{**TINY, **kw})


def layers():
    torch.manual_seed(0)
    out = {"checkerboard": AffineCoupling(2, "checkerboard", 0, 8, 1),
           "checkerboard-odd": AffineCoupling(2, "checkerboard", 1, 8, 1),
           "channel": AffineCoupling(4, "channel", 0, 8, 1), "channel-swap": AffineCoupling(4, "channel", 1, 8, 1),
           "actnorm": ActNorm(2), "batchnorm": BatchNormFlow(2), "squeeze": Squeeze(), "logit": Logit(0.05)}
    for layer in out.values():  # non-trivial parameters so the checks mean something
        for p in layer.parameters():
            torch.nn.init.normal_(p, std=0.3)
        for name, b in layer.named_buffers():
            if name == "running_var":
                b.uniform_(0.5, 2.0)
            elif name == "running_mean":
                b.normal_()
            elif name == "initialized":
                b.fill_(True)
    return out


def input_for(name, shape=(2, 4, 4)):
    c = 4 if name.startswith("channel") else 2
    x = torch.rand(3, c, *shape[1:], dtype=torch.float64)
    return x if name == "logit" else x * 4 - 2


@pytest.mark.parametrize("name", list(layers()))
def test_layer_inverse_and_log_det_against_autograd(name):
    layer = layers()[name].double().eval()
    x = input_for(name)
    y, log_det = layer(x)
    assert torch.allclose(layer.inverse(y), x, atol=1e-5)
    for i in range(x.shape[0]):  # log|det J| of the per-sample map, from autograd
        J = torch.autograd.functional.jacobian(lambda v: layer(v.view(1, *x.shape[1:]))[0].flatten(), x[i].flatten())
        assert torch.allclose(log_det[i], torch.linalg.slogdet(J)[1], atol=1e-6)


@pytest.mark.parametrize("cfg", [FlowConfig(image_size=8, hidden=8, num_blocks=1, final_couplings=2),
                                 FlowConfig(image_size=8, hidden=8, num_blocks=1, norm="batchnorm"),
                                 FlowConfig(image_size=8, hidden=8, num_blocks=1, single_scale=4, norm="none")])
def test_whole_model_inverse_and_log_det(cfg):
    torch.manual_seed(0)
    model = RealNVP(cfg).double()
    model(torch.rand(16, 1, 8, 8, dtype=torch.float64) * 0.9 + 0.05)  # data-dependent ActNorm init
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    model.eval()
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64) * 0.9 + 0.05
    zs, log_det = model(x)
    assert sum(z[0].numel() for z in zs) == 64
    assert torch.allclose(model.inverse(zs), x, atol=1e-5)
    J = torch.autograd.functional.jacobian(lambda v: torch.cat([z.flatten() for z in model(v.view(1, 1, 8, 8))[0]]),
                                           x[0].flatten())
    assert torch.allclose(log_det[0], torch.linalg.slogdet(J)[1], atol=1e-5)


def test_bits_per_dim_known_answer():
    """An identity flow (zero-initialised couplings, no norm layers) with alpha -> 0 is the logistic-free case we can
    compute by hand: for x = (k + u) / 256, bpd = -(log N(logit(p)) + log|d logit/dx|)/ (D ln 2) + 8."""
    torch.manual_seed(0)
    model = RealNVP(FlowConfig(image_size=4, hidden=4, num_blocks=1, norm="none", final_couplings=1, num_scales=1))
    x8 = torch.full((1, 1, 4, 4), 128, dtype=torch.uint8)
    torch.manual_seed(1)
    bpd = model.bits_per_dim(x8)
    torch.manual_seed(1)
    x = (128 + torch.rand(1, 1, 4, 4)) / 256
    p = 0.05 + 0.9 * x
    y = torch.log(p / (1 - p))
    log_p = (-0.5 * y ** 2 - 0.5 * math.log(2 * math.pi) + math.log(0.9) - torch.log(p) - torch.log(1 - p)).sum()
    assert torch.allclose(bpd, -(log_p - 16 * math.log(256)) / (16 * math.log(2)), atol=1e-5)


def test_variational_dequantization_bound():
    torch.manual_seed(0)
    model = RealNVP(FlowConfig(image_size=8, hidden=8, num_blocks=1, dequant="variational"))
    x8 = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    x, log_q = model.dequantize(x8)
    assert ((x * 256 - x8.float() >= 0) & (x * 256 - x8.float() < 1)).all()
    assert log_q.shape == (4,) and torch.isfinite(model.bits_per_dim(x8)).all()


def test_tiny_model_overfits_few_images():
    torch.manual_seed(0)
    model = RealNVP(FlowConfig(image_size=8, hidden=16, num_blocks=1, final_couplings=2))
    x8 = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = model.bits_per_dim(x8).mean().item()
    for _ in range(300):
        loss = model.bits_per_dim(x8).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first - 2.0


def test_smoke_train_then_sample(tmp_path):
    out = tmp_path / "run"
    s = train.main(tiny(out, steps=80))
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    tr = [r["train_bpd"] for r in rows if "train_bpd" in r]
    assert tr[-1] < tr[0] and math.isfinite(s["test_bpd"])
    for f in ["ckpt.pt", "metrics.jsonl", "summary.json", "samples_step80.png"]:
        assert (out / f).exists()
    r = subprocess.run([sys.executable, "nf/sample.py", "--out-dir", str(out), "--num-samples", "16", "--num-test",
                        "64", "--device", "cpu"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    for f in ["samples_ranked.png", "test_most_least_likely.png", "interpolation.png", "eval.json"]:
        assert (out / f).exists()
    r = subprocess.run([sys.executable, "nf/sample.py", "--out-dir", str(out), "--temperature", "0"], cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "temperature" in r.stderr and "Traceback" not in r.stderr


def test_bad_input_exits_2(tmp_path):
    for cfg in [train.Config(dataset="nope"), tiny(tmp_path, resume=True)]:
        with pytest.raises(SystemExit) as e:
            train.main(cfg)
        assert e.value.code == 2
