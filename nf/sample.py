"""Samples from a trained Real NVP ranked by likelihood, the most and least likely test images, and a latent
interpolation between two test images.

    python nf/sample.py --out-dir out/nf --temperature 0.7

Without a training run in --out-dir it uses the shipped model (nf/pretrained/default.safetensors).
"""
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from nf.model import FlowConfig, RealNVP
from nf.train import eval_bpd
from utils import data as D
from utils import plot as P
from utils import run as R
from utils import weights as W

# utils/weights.py: what a shipped file holds (the run's last model) and how it is scored
EXPORT = {"files": {"default": ("ckpt.pt",)}, "weights": "model", "keys": ("dataset", "step", "config")}
SCORE_SUBSET = "the first 100 test images, dequantization noise from torch.manual_seed(0)"


@dataclass
class Config:
    out_dir: str = "out/nf"
    """the training run's folder: ckpt.pt (else the shipped model) is read from it, the figures and eval.json are
    written to it"""
    ckpt: str | None = None
    """another checkpoint file (or shipped .safetensors) instead of out_dir/ckpt.pt"""
    num_samples: int = 64
    temperature: float = 0.7
    """standard deviation of the prior when sampling (the paper's figures use < 1 too)"""
    num_test: int = 2000
    """test images scored for the most / least likely figures"""
    interp_steps: int = 10
    """images on the latent line between two test images, both ends included"""
    u_draws: int = 8
    """draws of the dequantization noise u per image to measure the spread of the one-draw bits/dim (0 or 1: skip)"""
    u_images: int = 100
    """test images for that measurement"""
    test_images: int | None = None
    """test images for the reported test bits/dim, the first ones (None: all, as in the README)"""
    data_dir: str | None = None
    seed: int = 0
    device: str = "auto"

    def check(self):
        R.folder(self.out_dir, "--out-dir")
        R.file_exists(self.ckpt, "--ckpt")
        R.existing_folder(self.data_dir, "--data-dir")
        R.nonnegative(self, "seed")
        R.check_device(self.device)
        R.between(self, "num_samples", 1, 4096)
        R.between(self, "temperature", 0, 10, lo_open=True)
        R.between(self, "num_test", 2, 1_000_000)
        R.between(self, "interp_steps", 2, 100)
        R.between(self, "u_draws", 0, 1000)
        R.between(self, "u_images", 1, 10_000)
        R.check(self.test_images is None or 1 <= self.test_images <= 1_000_000,
                f"--test-images must be in [1, 1000000] (or None: all), got {self.test_images}")


def build(ckpt):
    return RealNVP(FlowConfig(**ckpt["model_config"]))


def load_model(path, device):
    return R.load_model(path, "nf", build, device, keys=("dataset", "step"))


def score(model, ckpt):
    """The card's metric (utils/weights.py): bits/dim of the first 100 test images under seeded noise u."""
    x, _ = D.load_images(ckpt["dataset"], "test")
    torch.manual_seed(0)
    return {"test_bpd_100": eval_bpd(model, x[:100], next(model.parameters()).device)}


def to_uint8(x01):
    """x in [0, 1] -> the 8-bit value whose bin holds it: the model puts pixel k at (k + u) / 256, u in [0, 1)."""
    return (x01 * 256).floor().clamp(0, 255).to(torch.uint8)


@torch.no_grad()
def u_spread(model, x8, draws):
    """bits/dim of each image under `draws` draws of the dequantization noise u: the spread of the one-draw
    estimate that eval_bpd reports, and the tighter importance-weighted bound from all draws,
    -log2 mean_k P_k(x) / D with P_k = p((x + u_k) / 256) / q(u_k | x) / 256^D (Flow++ Section 3.1)."""
    bpd = torch.stack([model.bits_per_dim(x8) for _ in range(draws)])  # (draws, N)
    D = x8[0].numel()
    log_p = -bpd * D * math.log(2)
    iw = -(torch.logsumexp(log_p, 0) - math.log(draws)) / (D * math.log(2))
    return {"u_draws": draws, "u_images": len(x8), "bpd_mean": bpd.mean().item(),
            "bpd_std_per_image": bpd.std(0).mean().item(), "bpd_std_of_batch_mean": bpd.mean(1).std().item(),
            "bpd_importance_weighted": iw.mean().item()}


@torch.no_grad()
def main(cfg: Config) -> dict:
    R.validate(cfg)
    device = R.pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out_dir)
    model, ckpt = load_model(W.pick(cfg.ckpt, out, "nf"), device)
    # samples, scored by the model itself and sorted from most to least likely
    x, _ = model.sample(cfg.num_samples, cfg.temperature)
    x8 = to_uint8(x)
    bpd = model.bits_per_dim(x8).cpu()
    order = bpd.argsort()
    P.labeled_grid(x8[order].cpu(), [f"{b:.2f} bpd" for b in bpd[order]], out / "samples_ranked.png")
    # most and least likely test images
    xte, _ = D.load_images(ckpt["dataset"], "test", cfg.data_dir)
    xt = xte[:cfg.num_test]
    scores = torch.cat([model.bits_per_dim(xt[i:i + 500].to(device)).cpu() for i in range(0, len(xt), 500)])
    o = scores.argsort()
    k = min(16, len(xt) // 2)  # most and least likely, without overlap
    idx = torch.cat([o[:k], o[-k:]])
    P.labeled_grid(xt[idx], [f"{'most' if i < k else 'least'} {scores[j]:.2f}" for i, j in enumerate(idx)],
                   out / "test_most_least_likely.png")
    # latent interpolation between two test images: z = f(x), walk the line, map back with f^-1
    z0, _ = model(model.dequantize(xte[0:1].to(device))[0])
    z1, _ = model(model.dequantize(xte[1:2].to(device))[0])
    ws = torch.linspace(0, 1, cfg.interp_steps, device=device)
    frames = torch.cat([model.inverse([(1 - w) * a + w * b for a, b in zip(z0, z1)]) for w in ws])
    P.save_grid(frames.clamp(0, 1), out / "interpolation.png", nrow=cfg.interp_steps, scale=3)
    spread = u_spread(model, xt[:cfg.u_images].to(device), cfg.u_draws) if cfg.u_draws > 1 else None
    xbpd = xte[:cfg.test_images]
    full = eval_bpd(model, xbpd, device)
    result = {"test_bpd": full, "test_images": len(xbpd), "sample_bpd_mean": bpd.mean().item(),
              "temperature": cfg.temperature, "step": ckpt["step"], "u_spread": spread}
    R.write_json(out / "eval.json", result)
    if spread:
        print(f"one-draw bits/dim over {cfg.u_draws} draws of u on {len(xt[:cfg.u_images])} test images: std "
              f"{spread['bpd_std_per_image']:.4f} per image, {spread['bpd_std_of_batch_mean']:.4f} for their mean; "
              f"mean {spread['bpd_mean']:.4f}, importance-weighted bound {spread['bpd_importance_weighted']:.4f}")
    print(f"test bits/dim {full:.4f} ({len(xbpd)} images) | samples at T={cfg.temperature}: {bpd.mean():.3f} bpd on "
          f"average | wrote samples_ranked.png, test_most_least_likely.png, interpolation.png in {out}")
    return result


if __name__ == "__main__":
    main(R.parse(Config))
