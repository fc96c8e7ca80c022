"""Train a DDPM.

    python ddpm/train.py --preset quick                 # Fashion-MNIST, ~3 min on a laptop CPU
    python ddpm/train.py                                # the `default` preset: the CPU quality run
    torchrun --nproc_per_node 8 ddpm/train.py --preset paper --dataset cifar10
"""
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import torch

from ddpm.model import EMA, Diffusion
from ddpm.unet import UNet, UNetConfig
from utils import data as D
from utils import plot as P
from utils import run as R


@dataclass
class Config(R.ImageRunConfig):
    out_dir: str = "out/ddpm"
    """ckpt.pt (model, EMA, optimizer, RNG state), metrics.jsonl, summary.json, samples_step*.png"""
    preset: str = "default"
    """quick | default | paper; flags given explicitly override it"""
    ch: int = 32
    """channels at full resolution; every width ch * m must suit GroupNorm(min(32, width // 4))"""
    ch_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    attn_levels: tuple[int, ...] = ()
    """levels (indices into ch_mult) with self-attention after each residual block; the middle always has it"""
    linear_attn_levels: tuple[int, ...] = ()
    """levels with linear attention after each residual block (not in the paper; denoising-diffusion-pytorch's)"""
    norm: Literal["group", "rms"] = "group"
    """group (GroupNorm, the paper's) or rms (per-pixel RMSNorm, denoising-diffusion-pytorch's)"""
    scale_shift: bool = False
    """time embedding as GroupNorm scale and shift (Nichol & Dhariwal) instead of the paper's sum"""
    dropout: float = 0.0
    T: int = 1000
    schedule: Literal["linear", "cosine"] = "linear"
    """linear (the paper) | cosine (Nichol & Dhariwal)"""
    sigma: Literal["beta", "beta_tilde"] = "beta"
    """the reverse-process variance sigma_t^2"""
    parameterization: Literal["eps", "v"] = "eps"
    """what the network predicts: eps (the paper) | v = sqrt(ab) eps - sqrt(1 - ab) x0 (Salimans & Ho 2022); stored
    in the checkpoint, so sample.py and evaluate.py read it from there"""
    loss_weight: Literal["none", "min-snr"] = "none"
    """per-timestep loss weight: none (the paper's Eq. 14) | min-snr (Hang et al. 2023: min(SNR_t, gamma) / SNR_t
    for eps, min(SNR_t, gamma) / (SNR_t + 1) for v)"""
    min_snr_gamma: float = 5.0
    """gamma of --loss-weight min-snr (the paper's 5)"""
    steps: int = 4000
    """total training steps (a --resume may raise it)"""
    batch_size: int = 128
    """per process"""
    lr: float = 2e-4
    warmup: int = 500
    """linear LR warmup steps (0: none)"""
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    hflip: bool = True
    """random horizontal flips (never applied to digits)"""
    cpu_bf16: bool | None = None
    """bf16 autocast on the CPU too; None: on when the CPU has AMX or AVX512-BF16 (always on for CUDA)"""
    sample_interval: int = 2000
    """a DDIM-50 grid of the EMA model every this many steps (0: only at the end)"""
    grid_samples: int = 64
    """images in each samples_step*.png grid"""
    ckpt_interval: int = 500
    """ckpt.pt every this many steps (0: only at the end and on Ctrl-C / SIGTERM)"""
    log_interval: int = 100

    def check(self):
        super().check()
        R.positive(self, "steps", "batch_size", "lr", "grad_clip", "log_interval")
        R.one_of(self, "norm", ("group", "rms"))  # Literal: tyro checks the CLI, this the Python callers
        R.one_of(self, "schedule", ("linear", "cosine"))
        R.one_of(self, "sigma", ("beta", "beta_tilde"))
        R.one_of(self, "parameterization", ("eps", "v"))
        R.one_of(self, "loss_weight", ("none", "min-snr"))
        R.positive(self, "min_snr_gamma")
        R.between(self, "grid_samples", 1, 256)
        R.nonnegative(self, "warmup", "sample_interval", "ckpt_interval")
        R.between(self, "T", 2, 10_000)
        R.between(self, "dropout", 0, 1, hi_open=True)
        R.between(self, "ema_decay", 0, 1, hi_open=True)
        R.between(self, "num_res_blocks", 1, 16)
        check_unet(self)


def check_unet(cfg):
    """The U-Net flags train.py and bench.py share: widths GroupNorm and the time embedding accept, levels that
    exist, sizes that fit in memory."""
    R.check(1 <= len(cfg.ch_mult) <= 8 and all(1 <= m <= 16 for m in cfg.ch_mult),
            f"--ch-mult needs 1 to 8 multipliers in [1, 16], got {tuple(cfg.ch_mult)}")
    R.check(cfg.ch >= 4 and cfg.ch % 2 == 0, f"--ch must be even and >= 4 (the sinusoidal embedding), got {cfg.ch}")
    for c in sorted({cfg.ch * m for m in cfg.ch_mult}):
        g = min(32, c // 4)
        R.check(c % g == 0, f"--ch {cfg.ch}: width {c} is not divisible by its GroupNorm's min(32, {c} // 4) = {g} "
                            "groups (use a multiple of 32, or of 4 below 128)")
        R.check(c <= 4096, f"--ch {cfg.ch} x --ch-mult {max(cfg.ch_mult)} = {c} channels is too wide (at most 4096)")
    for name in ("attn_levels", "linear_attn_levels"):
        bad = [i for i in getattr(cfg, name) if not 0 <= i < len(cfg.ch_mult)]
        R.check(not bad, f"--{name.replace('_', '-')} {bad}: levels are 0 .. {len(cfg.ch_mult) - 1} (ch_mult indices)")


DEFAULT = Config()  # the CPU quality run: 1.5M-param U-Net, 4000 steps of batch 128
PRESETS = {
    "default": DEFAULT,
    # the demo's budget: LR 2e-3 and min-SNR-5 took FID (DDIM-50, eta = 1) from 81 / 96 to 61 / 70 on two seeds (README)
    "quick": replace(DEFAULT, preset="quick", num_res_blocks=1, steps=1000, batch_size=32, lr=2e-3, warmup=100,
                     loss_weight="min-snr", ema_decay=0.995, sample_interval=500, ckpt_interval=250, log_interval=50),
    # Ho et al. 2020 Appendix B, CIFAR-10: attention at 16x16, 35.7M params, dropout 0.1, 800k steps, EMA 0.9999
    "paper": replace(DEFAULT, preset="paper", ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_levels=(1,),
                     dropout=0.1, steps=800_000, batch_size=128, warmup=5000, ema_decay=0.9999,
                     sample_interval=10_000, ckpt_interval=5000, log_interval=500),
}
RESUME_MAY_CHANGE = ("steps", "sample_interval", "ckpt_interval", "log_interval", "grid_samples")


def unet_config(cfg, in_chans, num_res_blocks, dropout=0.0):
    """The U-Net's config (a dict, as checkpoints store it) from the U-Net flags train.py and bench.py share."""
    return asdict(UNetConfig(in_chans=in_chans, ch=cfg.ch, ch_mult=tuple(cfg.ch_mult), num_res_blocks=num_res_blocks,
                             attn_levels=tuple(cfg.attn_levels), linear_attn_levels=tuple(cfg.linear_attn_levels),
                             norm=cfg.norm, scale_shift=cfg.scale_shift, dropout=dropout))


def build(model_config, T, schedule, sigma, parameterization="eps", **loss_options):
    """The Diffusion of a checkpoint's `model_config` (the U-Net's) and `diffusion` dict (T, schedule, sigma and the
    parameterization; older checkpoints lack it and predict eps)."""
    return Diffusion(UNet(UNetConfig(**model_config)), T=T, schedule=schedule, sigma=sigma,
                     parameterization=parameterization, **loss_options)


def train_step(model, module, opt, ema, x0, lr, step, device, cpu_bf16, grad_clip):
    """Algorithm 1, one step: the loss of `model` (maybe DDP-wrapped `module`), an Adam step at `lr` with gradient
    clipping, then the EMA. Returns (loss, grad norm)."""
    for g in opt.param_groups:
        g["lr"] = lr
    with R.autocast(device, cpu_bf16):
        loss = model(x0)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    gnorm = torch.nn.utils.clip_grad_norm_(module.parameters(), grad_clip)
    opt.step()
    ema.update(module, step)
    return loss.item(), gnorm.item()


def save_samples(diffusion, path, n, shape, device, seed=0):
    """A DDIM-50 grid from fixed noise (the same at every step, so the grids show progress), drawn on a fork of the
    RNG: writing a grid does not change the training's random stream, so a resumed run continues it exactly."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        x, _ = diffusion.sample((n, *shape), device, sampler="ddim", steps=min(50, diffusion.T))
    P.save_grid((x + 1) / 2, path, nrow=int(n ** 0.5))


def main(cfg: Config) -> dict:
    R.validate(cfg)
    cfg = replace(cfg, cpu_bf16=R.resolve_cpu_bf16(cfg.cpu_bf16))
    rank, world, device = R.ddp_setup(cfg.device)
    master = rank == 0
    R.seed_everything(cfg.seed + rank)
    R.sigterm_as_interrupt()
    c, size, _ = D.dataset_info(cfg.dataset)
    mcfg = unet_config(cfg, c, cfg.num_res_blocks, cfg.dropout)
    out = Path(cfg.out_dir)
    ckpt = None
    if cfg.resume:  # checked before the data loads
        ckpt = R.load_checkpoint(out / "ckpt.pt", "ddpm", device, keys=("model", "ema", "optimizer", "step", "config"))
        R.check_resume(ckpt["config"], cfg, ignore=RESUME_MAY_CHANGE)
        R.check(ckpt.get("world", 1) == world, f"--resume with {world} process(es): the checkpoint was written by "
                f"{ckpt.get('world', 1)} (the batch position depends on it)")
    xtr, _ = D.load_images(cfg.dataset, "train", cfg.data_dir)
    diffusion = build(mcfg, cfg.T, cfg.schedule, cfg.sigma, cfg.parameterization, loss_weight=cfg.loss_weight,
                      min_snr_gamma=cfg.min_snr_gamma).to(device)
    ema = EMA(diffusion, cfg.ema_decay)
    opt = torch.optim.Adam(diffusion.parameters(), lr=cfg.lr)
    step, losses, totals = 0, [], {"train_s": 0.0, "wall_s": 0.0, "seen": 0, "timed_steps": 0}
    if ckpt is not None:
        R.load_state(diffusion, ckpt["model"], "model")
        R.load_state(ema.model, ckpt["ema"], "EMA model")
        R.load_state(opt, ckpt["optimizer"], "optimizer state")
        step, losses, totals = ckpt["step"], list(ckpt.get("recent_losses", [])), {**totals, **ckpt.get("totals", {})}
        if "rng" in ckpt and master:
            R.set_rng_state(ckpt["rng"])  # exact continuation (one process; other ranks reseed below)
        elif not master:
            R.seed_everything(cfg.seed + rank + 7919 * step)
    model = R.wrap_ddp(diffusion, device)
    flip = cfg.hflip and D.flips_are_valid(cfg.dataset)
    log = R.Logger(out, cfg, "papers-ddpm", cfg.wandb, cfg.resume, enabled=master)
    n_params = sum(p.numel() for p in diffusion.eps_model.parameters())
    # every epoch has the same number of full batches per rank (D.shuffled_batches; exits 2 if there are none)
    per_epoch = len(D.shuffled_batches(len(xtr), cfg.batch_size, 0, cfg.seed, rank, world))
    epoch, skip = divmod(step, per_epoch)  # resume at the batch where the run stopped
    if master:
        print(f"U-Net {n_params / 1e6:.2f}M params | T={cfg.T} {cfg.schedule} | predicts {cfg.parameterization}, loss "
              f"weight {cfg.loss_weight} | {cfg.dataset} {len(xtr)} | "
              f"world {world} | {device} | step {step} of {cfg.steps}")

    def checkpoint(rng=None):
        R.save_checkpoint({"kind": "ddpm", "model": diffusion.state_dict(), "ema": ema.model.state_dict(),
                           "model_config": mcfg, "config": asdict(cfg), "dataset": cfg.dataset,
                           "diffusion": dict(T=cfg.T, schedule=cfg.schedule, sigma=cfg.sigma,
                                             parameterization=cfg.parameterization), "step": step,
                           "optimizer": opt.state_dict(), "rng": rng or R.rng_state(), "recent_losses": losses[-100:],
                           "totals": totals, "world": world}, out / "ckpt.pt")

    t_start, rng_at_step = time.time(), None
    batches = iter(D.shuffled_batches(len(xtr), cfg.batch_size, epoch, cfg.seed, rank, world)[skip:])
    bar = R.progress(None, total=cfg.steps, initial=step, desc="train", disable=not master, mininterval=2)
    try:
        while step < cfg.steps:
            idx = next(batches, None)
            if idx is None:
                epoch += 1
                batches = iter(D.shuffled_batches(len(xtr), cfg.batch_size, epoch, cfg.seed, rank, world))
                continue
            rng_at_step = R.rng_state()  # an interrupt inside this step saves the state it started from
            t0 = time.perf_counter()
            x0 = D.to_unit_range(xtr[idx].to(device))
            if flip:
                x0 = D.random_flip(x0)
            lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else cfg.lr
            with R.stops_held():  # an update is never saved without the step that counts it (its EMA, its log row)
                loss, gnorm = train_step(model, diffusion, opt, ema, x0, lr, step, device, cfg.cpu_bf16, cfg.grad_clip)
                step, rng_at_step = step + 1, None
                totals["train_s"] += time.perf_counter() - t0
                totals["seen"] += len(idx) * world
                totals["timed_steps"] += 1
                losses = (losses + [loss])[-100:]
                bar.update()
                if step % cfg.log_interval == 0 and master:
                    recent = losses[-cfg.log_interval:]
                    row = {"step": step, "loss": sum(recent) / len(recent), "grad_norm": gnorm, "lr": lr,
                           "images_per_s": totals["seen"] / totals["train_s"]}
                    log.log(row, step=step)
                    bar.set_postfix(loss=f"{row['loss']:.4f}")
                    if bar.disable:  # no bar in a log file: one line per interval instead
                        print(f"step {step} | loss {row['loss']:.4f} | lr {lr:.2e} | {row['images_per_s']:.0f} img/s",
                              flush=True)
            if master and cfg.sample_interval and step % cfg.sample_interval == 0 and step < cfg.steps:
                save_samples(ema.model, out / f"samples_step{step}.png", cfg.grid_samples, (c, size, size), device,
                             cfg.seed)
            if master and cfg.ckpt_interval and step % cfg.ckpt_interval == 0 and step < cfg.steps:
                totals["wall_s"] += time.time() - t_start
                t_start = time.time()
                checkpoint()
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (R.sigterm_as_interrupt)
        if master:
            print(f"interrupted at step {step}: saving {out / 'ckpt.pt'} (continue with --resume)")
    bar.close()
    interrupted_rng = rng_at_step
    totals["wall_s"] += time.time() - t_start
    summary = {"final_loss": sum(losses) / len(losses) if losses else None, "steps": step,
               "params": n_params, "wall_s": round(totals["wall_s"], 1),
               "images_per_s": round(totals["seen"] / max(totals["train_s"], 1e-9), 1),
               "steps_per_s": round(totals["timed_steps"] / max(totals["train_s"], 1e-9), 3), "dataset": cfg.dataset,
               "world_size": world, "device": str(device)}
    if master:
        checkpoint(interrupted_rng)
        if step == cfg.steps:
            save_samples(ema.model, out / f"samples_step{step}.png", cfg.grid_samples, (c, size, size), device,
                         cfg.seed)
        old = out / "summary.json"
        try:  # keep what evaluate.py stored there
            prev = json.loads(old.read_text()) if old.exists() else {}
        except (OSError, ValueError):
            prev = {}
        if cfg.resume and isinstance(prev, dict) and "eval" in prev:
            summary["eval"] = prev["eval"]
        R.write_json(old, summary)
        print(f"done: loss {summary['final_loss'] or float('nan'):.4f} after {step} steps, {summary['wall_s']} s of wall time "
              f"({summary['steps_per_s']} steps/s) -> {out}")
    log.close()
    R.ddp_cleanup()
    return summary


if __name__ == "__main__":
    main(R.parse(Config, PRESETS))
