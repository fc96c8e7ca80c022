"""Sample from a trained DDPM: a PNG grid, a GIF of the reverse process, and the forward-process figure.

    python ddpm/sample.py --out-dir out/ddpm                          # 1000-step ancestral sampling (Algorithm 2)
    python ddpm/sample.py --out-dir out/ddpm --sampler ddim --steps 50            # samples_ddim50.png, eta = 0
    python ddpm/sample.py --out-dir out/ddpm --sampler ddim --steps 50 --eta 1   # samples_ddim50_eta1.png (make demo)
    python ddpm/sample.py --out-dir out/ddpm --sampler dpm++ --steps 20   # DPM-Solver++(2M), logSNR time steps

The network's parameterization (eps or v) is read from the checkpoint. Without a training run in --out-dir the
shipped model is sampled (ddpm/pretrained/default.safetensors: the EMA weights).
"""
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from ddpm import train
from utils import data as D
from utils import plot as P
from utils import run as R
from utils import weights as W

# utils/weights.py: what a shipped file holds (the run's EMA weights, which the samples use) and how it is scored
EXPORT = {"files": {"default": ("ckpt.pt",)}, "weights": "ema", "keys": ("diffusion", "dataset", "step", "config")}
SCORE_SUBSET = "L_simple (Eq. 14) of the first 128 test images, t and eps from torch.Generator seed 0"


@dataclass
class Config:
    out_dir: str = "out/ddpm"
    """training output folder: ckpt.pt (else the shipped model) is read from it, the PNG and GIF written to it"""
    ckpt: str | None = None
    """another checkpoint (or shipped .safetensors) than out_dir/ckpt.pt"""
    num_samples: int = 64
    sampler: Literal["ddpm", "ddim", "dpm++"] = "ddpm"
    """ddpm (ancestral, T steps) | ddim | dpm++ (DPM-Solver++(2M), Lu et al. 2022)"""
    steps: int = 50
    """DDIM / DPM-Solver++ steps S (network calls), 1 .. T; ignored by ddpm"""
    eta: float = 0.0
    """DDIM stochasticity: 0 deterministic, 1 ancestral-like (dpm++ is deterministic: 0 only)"""
    spacing: Literal["uniform", "quadratic"] = "uniform"
    """DDIM timesteps: uniform | quadratic (denser near t = 0); dpm++ always uses its logSNR-uniform grid"""
    gif_frames: int = 40
    """snapshots of the chain in reverse_<sampler>.gif (0: no GIF)"""
    use_ema: bool = True
    data_dir: str | None = None
    seed: int = 0
    device: str = "auto"

    def check(self):
        R.RunConfig.check(self)  # the shared checks of out_dir, seed and device (this is no training run)
        R.file_exists(self.ckpt, "--ckpt")
        R.existing_folder(self.data_dir, "--data-dir")
        R.between(self, "num_samples", 1, 10_000)
        check_sampler(self)
        R.between(self, "gif_frames", 0, 1000)


def check_sampler(cfg):
    """The sampler flags sample.py and evaluate.py share (steps against T once the checkpoint is loaded)."""
    R.positive(cfg, "steps")
    R.one_of(cfg, "sampler", ("ddpm", "ddim", "dpm++"))  # Literal: tyro checks the CLI, this the Python callers
    R.one_of(cfg, "spacing", ("uniform", "quadratic"))
    R.between(cfg, "eta", 0, 1)
    R.check(cfg.sampler != "dpm++" or cfg.eta == 0, f"--eta {cfg.eta}: dpm++ is a deterministic ODE solver (eta 0)")
    R.check(cfg.sampler != "dpm++" or cfg.spacing == "uniform",
            f"--spacing {cfg.spacing} is a DDIM grid; dpm++ uses its own logSNR-uniform time steps")


def sampler_tag(sampler, steps, eta=0.0):
    """ddpm, ddim50, ddim50_eta1, dpmpp20: in file names and eval keys (eta only names a stochastic DDIM)."""
    if sampler == "ddpm":
        return sampler
    if sampler == "dpm++":
        return f"dpmpp{steps}"
    return f"ddim{steps}_eta{eta:g}" if eta else f"ddim{steps}"


def build(ckpt):
    return train.build(ckpt["model_config"], **ckpt["diffusion"])


def load_diffusion(path, device, use_ema=True):
    return R.load_model(path, "ddpm", build, device, keys=("diffusion", "dataset", "step"),
                        weights="ema" if use_ema else "model")


@torch.no_grad()
def score(diffusion, ckpt):
    """The card's metric (utils/weights.py): L_simple of 128 test images at seeded t and eps."""
    x, _ = D.load_images(ckpt["dataset"], "test")
    device = next(diffusion.parameters()).device
    x0 = D.to_unit_range(x[:128]).to(device)
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, diffusion.T, (len(x0),), generator=g).to(device)
    eps = torch.randn(x0.shape, generator=g).to(device)
    return {"loss_128": diffusion.loss(x0, t, eps).item()}


def check_steps(steps, diffusion, sampler):
    """DDIM and DPM-Solver++ steps are checked against the checkpoint's T, known once it is loaded."""
    R.check(sampler == "ddpm" or 1 <= steps <= diffusion.T,
            f"--steps {steps}: a {sampler} grid has 1 .. T = {diffusion.T} steps (the checkpoint's T)")


def forward_process_figure(diffusion, x0, path):
    """Rows: a few images; columns: x_t at 0, 25, 50, 75 and 100% of T (Eq. 4)."""
    cols = []
    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
        t = torch.full((len(x0),), min(diffusion.T - 1, int(frac * diffusion.T)), dtype=torch.long, device=x0.device)
        cols.append(x0 if frac == 0 else diffusion.q_sample(x0, t, torch.randn_like(x0)))
    grid = torch.stack(cols, dim=1).flatten(0, 1)  # (n * 5, C, H, W), row-major
    P.save_grid(((grid + 1) / 2).clamp(0, 1), path, nrow=5, scale=3)


@torch.no_grad()
def main(cfg: Config) -> dict:
    R.validate(cfg)
    device = R.pick_device(cfg.device)
    out = Path(cfg.out_dir)
    diffusion, ckpt = load_diffusion(W.pick(cfg.ckpt, out, "ddpm"), device, cfg.use_ema)
    check_steps(cfg.steps, diffusion, cfg.sampler)
    c, size, _ = D.dataset_info(ckpt["dataset"])
    torch.manual_seed(cfg.seed)
    n_steps = diffusion.T if cfg.sampler == "ddpm" else cfg.steps
    every = max(1, n_steps // cfg.gif_frames) if cfg.gif_frames else 0
    t0 = time.perf_counter()
    x, traj = diffusion.sample((cfg.num_samples, c, size, size), device, cfg.sampler, cfg.steps, cfg.eta, every,
                               progress=lambda it: R.progress(it, desc=f"{cfg.sampler} sampling", mininterval=1),
                               spacing=cfg.spacing)
    dt = time.perf_counter() - t0
    tag = sampler_tag(cfg.sampler, n_steps, cfg.eta)
    nrow = int(cfg.num_samples ** 0.5)
    P.save_grid((x + 1) / 2, out / f"samples_{tag}.png", nrow=nrow)
    if every:
        frames = [P.make_grid(((f + 1) / 2).clamp(0, 1), nrow) for f in traj]
        frames = [f.repeat(2, 0).repeat(2, 1) for f in frames]
        P.save_gif([f[..., 0] if f.shape[-1] == 1 else f for f in frames], out / f"reverse_{tag}.gif", fps=10, hold=15)
    try:  # the forward-process figure needs a few real images
        x_real, _ = D.load_images(ckpt["dataset"], "test", cfg.data_dir, download=False)
        forward_process_figure(diffusion, D.to_unit_range(x_real[:6].to(device)), out / "forward_process.png")
    except SystemExit:
        print("(no test images found: skipped forward_process.png)")
    result = {"sampler": cfg.sampler, "steps": n_steps, "parameterization": diffusion.parameterization, "eta": cfg.eta,
              "spacing": cfg.spacing, "seed": cfg.seed,
              "num_samples": cfg.num_samples, "seconds": dt, "images_per_s": cfg.num_samples / dt}
    print(f"{cfg.num_samples} samples with {tag} in {dt:.1f} s ({result['images_per_s']:.2f} img/s) -> "
          f"{out / f'samples_{tag}.png'}" + (f", {out / f'reverse_{tag}.gif'}" if every else ""))
    return result


if __name__ == "__main__":
    main(R.parse(Config))
