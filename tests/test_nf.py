import json
import math
import os
import subprocess
import sys

import pytest
import torch

from torch.distributions import Normal, SigmoidTransform, TransformedDistribution

from nf import sample, train
from nf.model import (ActNorm, AffineCoupling, BatchNormFlow, FlowConfig, Logit, RealNVP, Squeeze,
                      VariationalDequantizer)
from utils import run as R

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(dataset="synthetic", hidden=8, num_blocks=1, final_couplings=2, batch_size=32, device="cpu",
            eval_interval=40, eval_batches=1, log_interval=10, cpu_bf16=False, val_size=64)


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
                        "64", "--test-images", "32", "--device", "cpu"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    for f in ["samples_ranked.png", "test_most_least_likely.png", "interpolation.png", "eval.json"]:
        assert (out / f).exists()
    ev = json.loads((out / "eval.json").read_text())
    assert ev["test_images"] == 32 and math.isfinite(ev["test_bpd"])  # the first 32 only: seconds, not minutes
    r = subprocess.run([sys.executable, "nf/sample.py", "--out-dir", str(out), "--temperature", "0"], cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "temperature" in r.stderr and "Traceback" not in r.stderr


def test_bad_input_exits_2(tmp_path):
    for cfg in [train.Config(dataset="nope"), tiny(tmp_path, resume=True)]:
        with pytest.raises(SystemExit) as e:
            train.main(cfg)
        assert e.value.code == 2


def test_variational_log_q_is_the_change_of_variables_density():
    """log q(u|x) against torch.distributions: u = sigmoid(h), h ~ N(mu(x), sigma(x)^2), so q is a logit-normal
    density. A sign error in any Jacobian term would lower the bits/dim bound and fail here."""
    torch.manual_seed(0)
    deq = VariationalDequantizer(1, 8)
    for p in deq.parameters():  # the output layer starts at zero (mu = 0, sigma = 1): make both non-trivial
        torch.nn.init.normal_(p, std=0.3)
    deq.eval()
    x01 = torch.randint(0, 256, (3, 1, 4, 4)).float() / 255
    u, log_q = deq(x01)
    mu, s = deq.net(x01 * 2 - 1).chunk(2, dim=1)
    sigma = torch.tanh(s).exp()
    assert (sigma - 1).abs().mean() > 0.1 and mu.abs().mean() > 0.1
    q = TransformedDistribution(Normal(mu.double(), sigma.double()), [SigmoidTransform()])
    assert torch.allclose(log_q.double(), q.log_prob(u.double()).flatten(1).sum(1), atol=1e-3)


@pytest.mark.parametrize("dequant", ["uniform", "variational"])
def test_sample_quantizes_with_the_models_bins(dequant):
    """The model puts pixel k at (k + u) / 256, u in [0, 1): sample.py's 8-bit images must give k back."""
    torch.manual_seed(0)
    model = RealNVP(FlowConfig(image_size=16, hidden=8, num_blocks=1, dequant=dequant))
    x8 = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    x, _ = model.dequantize(x8)
    assert torch.equal(sample.to_uint8(x), x8)
    assert sample.to_uint8(torch.tensor([0.0, 1.0])).tolist() == [0, 255]  # sample() clamps to [0, 1]


@pytest.mark.parametrize("mod,args", [(train, ["--log-interval", "0"]), (train, ["--eval-interval", "0"]),
                                      (train, ["--eval-batches", "0"]), (train, ["--val-size", "-1"]),
                                      (sample, ["--num-test", "0"]), (sample, ["--interp-steps", "0"]),
                                      (sample, ["--test-images", "0"])])
def test_bad_flags_are_refused_at_parse_time(mod, args, capsys):
    with pytest.raises(SystemExit) as e:
        R.parse(mod.Config, getattr(mod, "PRESETS", None), args=args)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error:") and len(err.splitlines()) == 1


def test_explicit_value_equal_to_the_default_survives_a_preset():
    assert train.Config() == train.PRESETS["default"]
    assert R.parse(train.Config, train.PRESETS, args=["--preset", "quick", "--hidden", "64"]).hidden == 64
    assert R.preset(train.PRESETS, "quick", dequant="variational").dequant == "variational"


def test_batch_larger_than_the_training_set_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:  # was an endless loop
        train.main(tiny(tmp_path, batch_size=2048, val_size=0))
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error:")


def test_test_set_is_used_once_at_the_end(tmp_path, monkeypatch):
    """Periodic estimates run on the validation split; the test images are scored once, after training."""
    from utils import data as D
    load = D.load_images
    xte = load("synthetic", "test")[0]
    monkeypatch.setattr(D, "load_images", lambda name, split, data_dir=None: (
        (xte, None) if split == "test" else load(name, split, data_dir)))
    calls, real = [], RealNVP.bits_per_dim
    monkeypatch.setattr(RealNVP, "bits_per_dim", lambda self, x: calls.append(
        x.untyped_storage().data_ptr() == xte.untyped_storage().data_ptr()) or real(self, x))
    train.main(tiny(tmp_path, steps=6, eval_interval=3))
    assert sum(calls) == 1


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("nf") / "run"
    train.main(tiny(out, steps=6, eval_interval=3))
    return out


def test_resume_of_a_finished_run_keeps_its_summary(finished):
    before = (finished / "summary.json").read_text()
    s = train.main(tiny(finished, steps=6, eval_interval=3, resume=True))
    assert (finished / "summary.json").read_text() == before and s == json.loads(before)


def test_resume_with_other_architecture_names_the_field(finished, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(tiny(finished, steps=6, eval_interval=3, resume=True, hidden=16))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error:") and "--hidden" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("where", ["before", "buffers", "inside", "update"])
def test_interrupted_and_resumed_run_equals_the_uninterrupted_one(where, tmp_path, stop_at, sigterm_after_update,
                                                                  monkeypatch):
    """Ctrl-C at step 6 (inside the second epoch of 4 batches), then --resume to step 10: the same weights and
    optimizer state as 10 steps in one go (same batches, same dequantization noise, same schedule). The stop comes
    before the step, while it copies the buffers it starts from, inside it after its dequantization noise was drawn
    (where a Ctrl-C usually lands), or as a SIGTERM at the end of the optimizer's update, which must not be applied
    twice."""
    kw = dict(steps=10, eval_interval=10, val_size=960, batch_size=16)  # 64 training images: 4 batches an epoch
    train.main(tiny(tmp_path / "a", **kw))
    if where == "before":
        resume = stop_at(train, 6)
    elif where == "update":
        resume = sigterm_after_update(6)
    elif where == "buffers":
        real_buffers, calls = train.RealNVP.named_buffers, []

        def buffers(self, *args, **kw):
            calls.append(1)
            if len(calls) == 7:  # as step 6 copies the buffers it starts from
                raise KeyboardInterrupt
            return real_buffers(self, *args, **kw)
        monkeypatch.setattr(train.RealNVP, "named_buffers", buffers)
        resume = lambda: monkeypatch.setattr(train.RealNVP, "named_buffers", real_buffers)  # noqa: E731
    else:
        real, calls = torch.nn.utils.clip_grad_norm_, []

        def clip(*args, **kw):
            calls.append(1)
            if len(calls) == 7:  # step 6, after its forward and backward
                raise KeyboardInterrupt
            return real(*args, **kw)
        monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
        resume = lambda: monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", real)  # noqa: E731
    train.main(tiny(tmp_path / "b", **kw))
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["step"] == (7 if where == "update" else 6)
    resume()
    train.main(tiny(tmp_path / "b", resume=True, **kw))
    a, b = (torch.load(tmp_path / r / "ckpt.pt", weights_only=True) for r in "ab")
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert torch.equal(a["optimizer"]["state"][0]["exp_avg_sq"], b["optimizer"]["state"][0]["exp_avg_sq"])


def test_periodic_estimates_do_not_change_training(tmp_path):
    """The validation estimate and the sample grid draw noise of their own: a run evaluated every 2 steps ends with
    the weights of one evaluated only at its end, so --eval-interval (which a resume may change) is monitoring only."""
    kw = dict(steps=6, val_size=960, batch_size=16)
    train.main(tiny(tmp_path / "a", eval_interval=2, **kw))
    train.main(tiny(tmp_path / "b", eval_interval=6, **kw))
    a, b = (torch.load(tmp_path / r / "ckpt.pt", weights_only=True)["model"] for r in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ckpt_is_written_every_ckpt_interval_steps(tmp_path, monkeypatch):
    """ckpt.pt every --ckpt-interval steps besides each evaluation, so a killed run loses at most that many."""
    saved, real = [], R.save_checkpoint

    def spy(obj, path):
        saved.append(obj["step"])
        return real(obj, path)
    monkeypatch.setattr(R, "save_checkpoint", spy)
    train.main(tiny(tmp_path, steps=6, eval_interval=6, ckpt_interval=2, val_size=960, batch_size=16))
    assert saved == [2, 4, 6, 6]  # the periodic ones, then the one with the summary
