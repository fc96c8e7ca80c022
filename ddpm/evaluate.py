"""FID and the variational bound for a trained DDPM.

FID protocol: features are the 128-d penultimate layer of a small CNN classifier trained here on the dataset's
training set (no downloaded Inception weights), cached in data/fid_<dataset>.pt; FID compares N generated images
with N test images (N = 10k is the protocol; smaller N reads higher, so compare numbers at the same N).

    python ddpm/evaluate.py --out-dir out/ddpm --num-samples 10000 --sampler ddim --steps 50
    python ddpm/evaluate.py --out-dir out/ddpm --nll-images 500 --nll-t 100     # bits/dim bound only
"""
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from ddpm.sample import load_diffusion
from utils import data as D
from utils import run as R


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


def feature_net(dataset, device, data_dir=None, epochs=2, cache_dir=D.REPO / "data"):
    """Train once (about a minute on a CPU) and cache; later calls load the cached weights."""
    path = Path(cache_dir) / f"fid_{dataset}.pt"
    c, _, classes = D.dataset_info(dataset)
    net = FeatureNet(c, len(classes)).to(device)
    if path.exists():
        net.load_state_dict(torch.load(path, map_location=device, weights_only=True)["model"])
        return net.eval()
    x, y = D.load_images(dataset, "train", data_dir)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for epoch in range(epochs):
        for idx in tqdm(D.shuffled_batches(len(x), 128, epoch), desc=f"FID classifier epoch {epoch + 1}", mininterval=2):
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
    R.save_checkpoint({"model": net.state_dict(), "test_acc": acc}, path)
    return net


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
    ckpt: str | None = None
    num_samples: int = 10_000
    """generated images for FID (0: skip FID); compared with as many test images"""
    sampler: str = "ddim"
    steps: int | None = 50
    eta: float = 0.0
    sigma: str | None = None
    """reverse-process variance sigma_t^2 for ancestral sampling and the NLL bound: beta | beta_tilde
    (None: the checkpoint's)"""
    spacing: str = "uniform"
    """DDIM timesteps: uniform | quadratic"""
    batch_size: int = 500
    nll_images: int = 0
    """test images for the bits/dim bound (0: skip)"""
    nll_t: int | None = 100
    """timesteps sampled per image for the bound (None: all T, exact sum)"""
    data_dir: str | None = None
    cpu_bf16: bool | None = None
    """sample with bf16 autocast on the CPU (the network only; the chain stays fp32); None: on with AMX or
    AVX512-BF16"""
    seed: int = 0
    device: str = "auto"


@torch.no_grad()
def main(cfg: Config) -> dict:
    R.check(cfg.num_samples >= 0 and cfg.nll_images >= 0, "--num-samples and --nll-images must be >= 0")
    R.check(cfg.sampler in ("ddpm", "ddim"), "--sampler must be ddpm or ddim")
    R.check(cfg.spacing in ("uniform", "quadratic"), "--spacing must be uniform or quadratic")
    R.check(cfg.sigma in (None, "beta", "beta_tilde"), "--sigma must be beta or beta_tilde")
    device = R.pick_device(cfg.device)
    out = Path(cfg.out_dir)
    diffusion, ckpt = load_diffusion(Path(cfg.ckpt) if cfg.ckpt else out / "ckpt.pt", device)
    diffusion.sigma = cfg.sigma or diffusion.sigma
    c, size, _ = D.dataset_info(ckpt["dataset"])
    xte, _ = D.load_images(ckpt["dataset"], "test", cfg.data_dir)
    torch.manual_seed(cfg.seed)
    res = {"step": ckpt["step"], "dataset": ckpt["dataset"]}
    if cfg.num_samples:
        n = min(cfg.num_samples, len(xte))
        net = feature_net(ckpt["dataset"], device, cfg.data_dir)
        t0, samples = time.perf_counter(), []
        for i in tqdm(range(0, n, cfg.batch_size), desc=f"sampling ({cfg.sampler})"):
            with R.autocast(device, R.resolve_cpu_bf16(cfg.cpu_bf16)):
                x, _ = diffusion.sample((min(cfg.batch_size, n - i), c, size, size), device, cfg.sampler, cfg.steps,
                                        cfg.eta, spacing=cfg.spacing)
            samples.append(x.cpu())
        sample_s = time.perf_counter() - t0
        res.update(fid=fid(features(net, torch.cat(samples), device), features(net, xte[:n], device)),
                   fid_n=n, sampler=cfg.sampler, sampler_steps=diffusion.T if cfg.sampler == "ddpm" else cfg.steps,
                   spacing=cfg.spacing, eta=cfg.eta, sigma=diffusion.sigma,
                   sample_s=round(sample_s, 1), sample_bf16=R.resolve_cpu_bf16(cfg.cpu_bf16) or device.type == "cuda",
                   sample_images_per_s=round(n / sample_s, 2))
        print(f"FID {res['fid']:.2f} ({n} samples, {cfg.sampler}{'' if cfg.sampler == 'ddpm' else cfg.steps}, "
              f"{sample_s:.0f} s)")
    if cfg.nll_images:
        t0, bpd = time.perf_counter(), []
        for i in tqdm(range(0, cfg.nll_images, cfg.batch_size), desc="NLL bound"):
            x0 = D.to_unit_range(xte[i:min(i + cfg.batch_size, cfg.nll_images)].to(device))
            bpd.append(diffusion.nll_bound_bpd(x0, cfg.nll_t).cpu())
        res.update(nll_bpd=torch.cat(bpd).mean().item(), nll_images=cfg.nll_images, nll_t=cfg.nll_t or diffusion.T,
                   nll_s=round(time.perf_counter() - t0, 1))
        print(f"NLL bound {res['nll_bpd']:.3f} bits/dim on {cfg.nll_images} test images "
              f"({'all T' if cfg.nll_t is None else f'{cfg.nll_t} sampled'} timesteps)")
    summary_path = out / "summary.json"
    summary = R.read_json(summary_path) if summary_path.exists() else {}
    summary.setdefault("eval", {})[f"{res.get('sampler', 'nll')}{res.get('sampler_steps', '')}"] = res
    R.write_json(summary_path, summary)
    return res


if __name__ == "__main__":
    main(R.parse(Config))
