"""FID and the variational bound for a trained DDPM.

FID protocol: features are the 128-d penultimate layer of a small CNN classifier trained here on the dataset's
training set (no downloaded Inception weights), cached in data/fid_<dataset>.pt; FID compares N generated images,
quantized to the 8-bit pixels a saved PNG holds, with the first N test images (`--fid-ref test`, the reported
numbers) or N training images drawn by a fixed seed (`--fid-ref train`, the DDPM paper's reference set: what
choices of a preset or sampler are made on, so that the test images only report). The protocol is N = 1000
(DDIM-50 takes about 7 minutes on 2 CPU cores in fp32, DPM++-20 about 3); FID reads higher at smaller N, so compare
numbers at the same N only. Results go to summary.json's `eval` section, one entry per setting. The samples are kept
in `<setting>.samples.pt` beside it: an interrupted sampling continues from its last finished batch when the same
command is run again, and the other reference scores the same samples without sampling again (`generate`).

    python ddpm/evaluate.py --out-dir out/ddpm --sampler ddim --steps 50 --eta 1   # the demo's sampler
    python ddpm/evaluate.py --out-dir out/ddpm --sampler ddim --steps 50
    python ddpm/evaluate.py --out-dir out/ddpm --sampler dpm++ --steps 20
    python ddpm/evaluate.py --out-dir out/ddpm --sampler dpm++ --steps 20 --fid-ref train   # for choosing
    python ddpm/evaluate.py --out-dir out/ddpm --num-samples 0 --nll-images 500 --nll-t 100   # bits/dim bound only
"""
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from ddpm.sample import check_sampler, check_steps, load_diffusion, sampler_tag
from utils import data as D
from utils import run as R
from utils import weights as W


class FeatureNet(nn.Module):
    """A small CNN classifier; its penultimate layer gives the features FID is computed on."""

    def __init__(self, in_chans, num_classes=10):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_chans, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1),
                                  nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(),
                                  nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(512, 128), nn.ReLU())
        self.head = nn.Linear(128, num_classes)

    def forward(self, x):
        return self.head(self.body(x))


def feature_net(dataset, device, data_dir=None, epochs=2, cache_dir=None):
    """Train once (about a minute on a CPU) and cache in cache_dir (default: the repo's data/); later calls load the
    cached weights. An unreadable or mismatched cache file is trained over, with a note. Gradients are on here
    whatever the caller's mode (evaluate.main samples under no_grad), and the training draws from a forked RNG, so
    the caller's random stream is the same with or without a cache."""
    path = Path(cache_dir if cache_dir is not None else D.REPO / "data") / f"fid_{dataset}.pt"
    c, _, classes = D.dataset_info(dataset)
    if path.exists():
        net = FeatureNet(c, len(classes)).to(device)
        try:
            net.load_state_dict(torch.load(path, map_location=device, weights_only=True)["model"])
            return net.eval()
        except Exception as e:  # truncated file, random bytes, another dataset's shapes
            print(f"FID classifier cache {path} is unusable ({type(e).__name__}): training it again")
    x, y = D.load_images(dataset, "train", data_dir)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.enable_grad():
        torch.manual_seed(0)
        net = FeatureNet(c, len(classes)).to(device)
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        for epoch in range(epochs):
            for idx in R.progress(D.shuffled_batches(len(x), 128, epoch), desc=f"FID classifier epoch {epoch + 1}",
                                  mininterval=2):
                loss = F.cross_entropy(net(D.to_unit_range(x[idx].to(device))), y[idx].to(device))
                opt.zero_grad()
                loss.backward()
                opt.step()
    xt, yt = D.load_images(dataset, "test", data_dir)
    net.eval()
    with torch.no_grad():
        acc = sum((net(D.to_unit_range(xt[i:i + 1000].to(device))).argmax(-1).cpu() == yt[i:i + 1000]).sum().item()
                  for i in range(0, len(xt), 1000)) / len(xt)
    print(f"FID feature classifier: test accuracy {acc:.4f}; cached at {path}")
    R.save_checkpoint({"kind": "ddpm-fid", "dataset": dataset, "model": net.state_dict(), "test_acc": acc}, path)
    return net


def to_8bit(x):
    """Samples in [-1, 1] -> uint8 (N, C, H, W): the pixels a saved PNG holds (utils.plot.to_uint8's rounding)."""
    return ((x.float() + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8)


SAMPLES_VERSION = 1  # raise it when the sampling or its seeding changes: kept samples of another version are redrawn


def generate(diffusion, cfg, n, shape, device, bf16, file, source):
    """n samples as 8-bit images, in batches of cfg.batch_size, and the seconds spent sampling them.

    Paired noise: x_T of image k is the k-th draw of a generator seeded by cfg.seed alone, so every sampler, step
    count and batch size starts image k from the same noise; the chain's own noise (ancestral, DDIM eta > 0) is
    seeded per batch. Each finished batch is saved to `file`; a rerun of the same setting continues after the
    last saved batch (or, with all batches there, samples nothing) if the file was written from the same `source`
    (checkpoint file, device, bf16) with the same batch size and SAMPLES_VERSION."""
    x_T = torch.randn((n, *shape), generator=torch.Generator().manual_seed(cfg.seed * 100_000))
    state = dict(samples=[], sample_s=0.0, n=n, batch_size=cfg.batch_size, source=source, version=SAMPLES_VERSION)
    if file.exists():
        try:
            saved = torch.load(file, weights_only=True)
        except Exception:
            saved = None
        if isinstance(saved, dict) and isinstance(saved.get("samples"), list) and \
                all(saved.get(k) == state[k] for k in ("n", "batch_size", "source", "version")):
            state = saved
            print(f"continuing from {file}: {sum(map(len, state['samples']))} of {n} samples already done")
        else:  # unreadable, or another batch size (other chain noise), checkpoint, device, precision or version
            print(f"{file} does not match this run (or is unreadable): sampling from the start")
    starts = list(range(0, n, cfg.batch_size))
    for b in R.progress(range(len(state["samples"]), len(starts)), desc=f"sampling ({cfg.sampler})"):
        i, t0 = starts[b], time.perf_counter()
        torch.manual_seed(cfg.seed * 100_000 + 1 + b)  # fewer than 100,000 batches: no two (seed, b) share a seed
        with torch.no_grad(), R.autocast(device, bf16):
            x0 = x_T[i:i + cfg.batch_size]
            x, _ = diffusion.sample(x0.shape, device, cfg.sampler, cfg.steps, cfg.eta, spacing=cfg.spacing, x_T=x0)
        state["samples"].append(to_8bit(x.cpu()))  # what a user saves, and what the test images are
        state["sample_s"] += time.perf_counter() - t0
        R.save_checkpoint(state, file)
    return torch.cat(state["samples"]), state["sample_s"]


@torch.no_grad()
def features(net, x, device, batch_size=1000):
    """x in [-1, 1] float or uint8 -> (N, 128) features."""
    out = []
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size].to(device)
        out.append(net.body(D.to_unit_range(xb) if xb.dtype == torch.uint8 else xb).double().cpu())
    return torch.cat(out)


def fid(f1, f2):
    """Frechet distance of Gaussians fitted to two feature sets (Heusel et al. 2017):
    ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)); Tr((S1 S2)^(1/2)) = sum of sqrt of eigenvalues of S1 S2."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = torch.cov(f1.T), torch.cov(f2.T)
    eig = torch.linalg.eigvals(s1 @ s2).real.clamp(min=0)
    return ((mu1 - mu2) ** 2).sum().item() + (s1.trace() + s2.trace() - 2 * eig.sqrt().sum()).item()


@dataclass
class Config:
    out_dir: str = "out/ddpm"
    """training output folder: ckpt.pt is read from it, summary.json's `eval` section written to it"""
    ckpt: str | None = None
    """another checkpoint than out_dir/ckpt.pt"""
    num_samples: int = 1000
    """generated images for FID (0: skip FID); compared with as many reference images (the protocol: 1000)"""
    fid_ref: Literal["test", "train"] = "test"
    """FID reference: the first N test images (reported numbers) | N training images, fixed draw (for choices)"""
    sampler: Literal["ddpm", "ddim", "dpm++"] = "ddim"
    """ddpm (ancestral, T steps) | ddim | dpm++ (DPM-Solver++(2M)); the parameterization is the checkpoint's"""
    steps: int = 50
    """DDIM / DPM-Solver++ steps S, 1 .. T; ignored by ddpm (T steps)"""
    eta: float = 0.0
    """DDIM stochasticity, 0 .. 1 (dpm++: 0 only)"""
    sigma: Literal["beta", "beta_tilde"] | None = None
    """reverse-process variance sigma_t^2 for ancestral sampling and the NLL bound (None: the checkpoint's)"""
    spacing: Literal["uniform", "quadratic"] = "uniform"
    """DDIM timesteps: uniform | quadratic (dpm++: its own logSNR grid)"""
    batch_size: int = 500
    nll_images: int = 0
    """test images for the bits/dim bound (0: skip)"""
    nll_t: int | None = 100
    """timesteps sampled per batch for the bound's middle terms (None: all T, the exact sum)"""
    fid_cache_dir: str | None = None
    """where the FID classifier is cached (None: the repo's data/)"""
    fid_epochs: int = 2
    """epochs of the FID classifier, when it is trained (no cache yet)"""
    data_dir: str | None = None
    cpu_bf16: bool | None = None
    """sample with bf16 autocast on the CPU (the network only; the chain stays fp32); None: on with AMX or
    AVX512-BF16"""
    seed: int = 0
    """seeds the starting noise of the samples, the chain's noise (ancestral, eta > 0) and the bound's draws"""
    device: str = "auto"

    def check(self):
        R.RunConfig.check(self)  # the shared checks of out_dir, seed and device (this is no training run)
        R.file_exists(self.ckpt, "--ckpt")
        R.existing_folder(self.data_dir, "--data-dir")
        if self.fid_cache_dir is not None:
            R.folder(self.fid_cache_dir, "--fid-cache-dir")
        R.between(self, "num_samples", 0, 100_000)
        R.between(self, "nll_images", 0, 100_000)
        R.check(self.num_samples > 0 or self.nll_images > 0, "nothing to do: --num-samples and --nll-images are 0")
        check_sampler(self)
        R.one_of(self, "sigma", (None, "beta", "beta_tilde"))
        R.one_of(self, "fid_ref", ("test", "train"))
        R.between(self, "batch_size", 1, 10_000)
        R.check(self.nll_t is None or 1 <= self.nll_t <= 10_000, f"--nll-t must be in [1, 10000] (or None: all T), "
                                                                   f"got {self.nll_t}")
        R.between(self, "fid_epochs", 1, 100)


def result_key(kind, cfg, diffusion, n, step):
    """summary.json's key for one evaluation: every setting that changes its number (sigma does not change DDIM;
    eta and spacing do not change the ancestral sampler; the batch size changes the chain's own noise, so it is in
    the key of the stochastic samplers), so runs with other settings do not overwrite it. For FID it names the
    samples' setting; main appends the reference (`_reftrain`)."""
    if kind == "nll":
        ts = "allT" if cfg.nll_t is None else f"t{cfg.nll_t}"
        return f"nll_{ts}_{diffusion.sigma}_seed{cfg.seed}_n{n}_step{step}"
    how = (f"ddpm{diffusion.T}_{diffusion.sigma}" if cfg.sampler == "ddpm"
           else f"ddim{cfg.steps}_{cfg.spacing}_eta{cfg.eta:g}" if cfg.sampler == "ddim"
           else sampler_tag(cfg.sampler, cfg.steps))
    stochastic = cfg.sampler == "ddpm" or (cfg.sampler == "ddim" and cfg.eta > 0)
    return f"fid_{how}_seed{cfg.seed}{f'_b{cfg.batch_size}' if stochastic else ''}_n{n}_step{step}"


def training_draw(dataset, n, data_dir=None):
    """--fid-ref train's reference set: n training images in a fixed random draw (seed 0, whatever --seed is: every
    run and sampler compares with the same ones)."""
    x = D.load_images(dataset, "train", data_dir)[0]
    return x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:n]]


def main(cfg: Config) -> dict:
    R.validate(cfg)
    device = R.pick_device(cfg.device)
    out = Path(cfg.out_dir)
    path = W.pick(cfg.ckpt, out, "ddpm")
    diffusion, ckpt = load_diffusion(path, device)
    check_steps(cfg.steps, diffusion, cfg.sampler)
    diffusion.sigma = cfg.sigma or diffusion.sigma
    c, size, _ = D.dataset_info(ckpt["dataset"])
    xte, _ = D.load_images(ckpt["dataset"], "test", cfg.data_dir)
    bf16 = R.resolve_cpu_bf16(cfg.cpu_bf16)
    res, entries = {"step": ckpt["step"], "dataset": ckpt["dataset"]}, {}
    if cfg.num_samples:
        n = min(cfg.num_samples, len(xte))
        net = feature_net(ckpt["dataset"], device, cfg.data_dir, cfg.fid_epochs, cfg.fid_cache_dir)  # trains with grad
        sampled = result_key("fid", cfg, diffusion, n, ckpt["step"])  # the samples' setting; the reference is not in it
        key = sampled + ("_reftrain" if cfg.fid_ref == "train" else "")
        kept, st = out / f"{sampled}.samples.pt", Path(path).stat()
        samples, sample_s = generate(diffusion, cfg, n, (c, size, size), device, bf16, kept,
                                      f"{Path(path).resolve()} ({st.st_size} bytes, mtime {st.st_mtime_ns}) on "
                                      f"{device.type}, bf16 {bf16}")
        ref = xte[:n] if cfg.fid_ref == "test" else training_draw(ckpt["dataset"], n, cfg.data_dir)
        r = dict(fid=fid(features(net, samples, device), features(net, ref, device)), fid_n=n, fid_ref=cfg.fid_ref,
                 sampler=cfg.sampler, sampler_steps=diffusion.T if cfg.sampler == "ddpm" else cfg.steps,
                 parameterization=diffusion.parameterization,
                 spacing=cfg.spacing, eta=cfg.eta, sigma=diffusion.sigma, seed=cfg.seed, batch_size=cfg.batch_size,
                 step=ckpt["step"],
                 sample_s=round(sample_s, 1), sample_bf16=bf16 or device.type == "cuda",
                 sample_images_per_s=round(n / sample_s, 2))
        entries[key] = r
        res.update(r)
        print(f"FID {r['fid']:.2f} ({n} samples vs {n} {cfg.fid_ref} images, "
              f"{sampler_tag(cfg.sampler, cfg.steps, cfg.eta)}, {sample_s:.0f} s of sampling)")
    if cfg.nll_images:
        n = min(cfg.nll_images, len(xte))
        torch.manual_seed(cfg.seed)
        t0, bpd = time.perf_counter(), []
        for i in R.progress(range(0, n, cfg.batch_size), desc="NLL bound"):
            x0 = D.to_unit_range(xte[i:min(i + cfg.batch_size, n)].to(device))
            bpd.append(diffusion.nll_bound_bpd(x0, cfg.nll_t).cpu())
        r = dict(nll_bpd=torch.cat(bpd).mean().item(), nll_images=n, nll_t=cfg.nll_t or diffusion.T,
                 sigma=diffusion.sigma, seed=cfg.seed, step=ckpt["step"], nll_s=round(time.perf_counter() - t0, 1))
        entries[result_key("nll", cfg, diffusion, n, ckpt["step"])] = r
        res.update(r)
        print(f"NLL bound {r['nll_bpd']:.3f} bits/dim on {n} test images "
              f"({'all T' if cfg.nll_t is None else f'{cfg.nll_t} sampled'} timesteps)")
    summary_path = out / "summary.json"
    try:
        summary = R.read_json(summary_path) if summary_path.exists() else {}
    except (OSError, ValueError):
        summary = {}
    summary = summary if isinstance(summary, dict) else {}
    eval_ = summary.get("eval") if isinstance(summary.get("eval"), dict) else {}
    summary["eval"] = {**eval_, **entries}
    R.write_json(summary_path, summary)
    res["keys"] = list(entries)
    return res


if __name__ == "__main__":
    main(R.parse(Config))
