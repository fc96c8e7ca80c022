"""Train a DDPM.

    python ddpm/train.py --preset quick                 # Fashion-MNIST, ~3 min on a laptop CPU
    python ddpm/train.py --preset default               # the CPU quality run
    torchrun --nproc_per_node 8 ddpm/train.py --preset paper --dataset cifar10
"""
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from ddpm.model import EMA, Diffusion
from ddpm.unet import NORMS, UNet, UNetConfig
from utils import data as D
from utils import plot as P
from utils import run as R


@dataclass
class Config(R.ImageRunConfig):
    out_dir: str = "out/ddpm"
    """ckpt.pt (model, EMA, optimizer), metrics.jsonl, summary.json, samples_step*.png"""
    preset: str = "default"
    """quick | default | paper; flags given explicitly override it"""
    ch: int = 32
    ch_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    attn_levels: tuple[int, ...] = ()
    """levels (indices into ch_mult) with self-attention after each residual block; the middle always has it"""
    linear_attn_levels: tuple[int, ...] = ()
    """levels with linear attention after each residual block (not in the paper; denoising-diffusion-pytorch's)"""
    norm: str = "group"
    """group (GroupNorm, the paper's) or rms (per-pixel RMSNorm, denoising-diffusion-pytorch's)"""
    scale_shift: bool = False
    """time embedding as GroupNorm scale and shift (Nichol & Dhariwal) instead of the paper's sum"""
    dropout: float = 0.0
    T: int = 1000
    schedule: str = "linear"
    """linear (the paper) | cosine (Nichol & Dhariwal)"""
    sigma: str = "beta"
    """beta | beta_tilde: the reverse-process variance"""
    steps: int = 4000
    batch_size: int = 128
    """per process"""
    lr: float = 2e-4
    warmup: int = 500
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    hflip: bool = True
    """random horizontal flips (never applied to digits)"""
    cpu_bf16: bool | None = None
    """bf16 autocast on the CPU too; None: on when the CPU has AMX or AVX512-BF16 (always on for CUDA)"""
    sample_interval: int = 2000
    log_interval: int = 100


DEFAULT = Config()  # the CPU quality run: 1.5M-param U-Net, 4000 steps of batch 128
PRESETS = {
    "default": DEFAULT,
    "quick": replace(DEFAULT, preset="quick", num_res_blocks=1, steps=1000, batch_size=32, warmup=100,
                     ema_decay=0.995, sample_interval=500, log_interval=50),
    # Ho et al. 2020 Appendix B, CIFAR-10: attention at 16x16, 35.7M params, dropout 0.1, 800k steps, EMA 0.9999
    "paper": replace(DEFAULT, preset="paper", ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_levels=(1,),
                     dropout=0.1, steps=800_000, batch_size=128, warmup=5000, ema_decay=0.9999,
                     sample_interval=10_000, log_interval=500),
}


def unet_config(cfg, in_chans, num_res_blocks, dropout=0.0):
    """The U-Net's config (a dict, as checkpoints store it) from the U-Net flags train.py and bench.py share."""
    R.check(cfg.norm in NORMS, f"--norm must be one of {', '.join(NORMS)}, not {cfg.norm!r}")
    return asdict(UNetConfig(in_chans=in_chans, ch=cfg.ch, ch_mult=tuple(cfg.ch_mult), num_res_blocks=num_res_blocks,
                             attn_levels=tuple(cfg.attn_levels), linear_attn_levels=tuple(cfg.linear_attn_levels),
                             norm=cfg.norm, scale_shift=cfg.scale_shift, dropout=dropout))


def build(model_config, T, schedule, sigma):
    return Diffusion(UNet(UNetConfig(**model_config)), T=T, schedule=schedule, sigma=sigma)


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


def save_samples(diffusion, path, n, shape, device):
    x, _ = diffusion.sample((n, *shape), device, sampler="ddim", steps=50)
    P.save_grid((x + 1) / 2, path, nrow=int(n ** 0.5))


def main(cfg: Config) -> dict:
    R.check(cfg.steps > 0 and cfg.batch_size > 0 and cfg.T > 1, "--steps, --batch-size must be positive, --T > 1")
    R.check(cfg.schedule in ("linear", "cosine"), "--schedule must be linear or cosine")
    R.check(cfg.sigma in ("beta", "beta_tilde"), "--sigma must be beta or beta_tilde")
    cfg = replace(cfg, cpu_bf16=R.resolve_cpu_bf16(cfg.cpu_bf16))
    rank, world, device = R.ddp_setup(cfg.device)
    master = rank == 0
    R.seed_everything(cfg.seed + rank)
    c, size, _ = D.dataset_info(cfg.dataset)
    mcfg = unet_config(cfg, c, cfg.num_res_blocks, cfg.dropout)  # checks the U-Net flags before the data loads
    xtr, _ = D.load_images(cfg.dataset, "train", cfg.data_dir)
    diffusion = build(mcfg, cfg.T, cfg.schedule, cfg.sigma).to(device)
    ema = EMA(diffusion, cfg.ema_decay)
    opt = torch.optim.Adam(diffusion.parameters(), lr=cfg.lr)
    out = Path(cfg.out_dir)
    step = 0
    if cfg.resume:
        ckpt = R.load_checkpoint(out / "ckpt.pt", "ddpm", device)
        diffusion.load_state_dict(ckpt["model"])
        ema.model.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
    model = R.wrap_ddp(diffusion, device)
    flip = cfg.hflip and D.flips_are_valid(cfg.dataset)
    log = R.Logger(out, cfg, "papers-ddpm", cfg.wandb, cfg.resume, enabled=master)
    n_params = sum(p.numel() for p in diffusion.eps_model.parameters())
    if master:
        print(f"U-Net {n_params / 1e6:.2f}M params | T={cfg.T} {cfg.schedule} | {cfg.dataset} {len(xtr)} | "
              f"world {world} | {device}")

    def checkpoint():
        R.save_checkpoint({"kind": "ddpm", "model": diffusion.state_dict(), "ema": ema.model.state_dict(),
                           "model_config": mcfg, "config": asdict(cfg), "dataset": cfg.dataset,
                           "diffusion": dict(T=cfg.T, schedule=cfg.schedule, sigma=cfg.sigma), "step": step,
                           "optimizer": opt.state_dict()}, out / "ckpt.pt")

    t_start, t_train, seen = time.time(), 0.0, 0
    epoch = step * cfg.batch_size * world // len(xtr)
    batches = iter(D.shuffled_batches(len(xtr), cfg.batch_size, epoch, cfg.seed, rank, world))
    bar = tqdm(total=cfg.steps, initial=step, desc="train", disable=not master, mininterval=2)
    losses = []
    try:
        while step < cfg.steps:
            idx = next(batches, None)
            if idx is None:
                epoch += 1
                batches = iter(D.shuffled_batches(len(xtr), cfg.batch_size, epoch, cfg.seed, rank, world))
                continue
            t0 = time.perf_counter()
            x0 = D.to_unit_range(xtr[idx].to(device))
            if flip:
                x0 = D.random_flip(x0)
            lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup)
            loss, gnorm = train_step(model, diffusion, opt, ema, x0, lr, step, device, cfg.cpu_bf16, cfg.grad_clip)
            step += 1
            t_train += time.perf_counter() - t0
            seen += len(idx) * world
            losses.append(loss)
            bar.update()
            if step % cfg.log_interval == 0 and master:
                row = {"step": step, "loss": sum(losses[-cfg.log_interval:]) / len(losses[-cfg.log_interval:]),
                       "grad_norm": gnorm, "lr": opt.param_groups[0]["lr"], "images_per_s": seen / t_train}
                log.log(row, step=step)
                bar.set_postfix(loss=f"{row['loss']:.4f}")
            if master and (step % cfg.sample_interval == 0 or step == cfg.steps):
                save_samples(ema.model, out / f"samples_step{step}.png", 64, (c, size, size), device)
                if step < cfg.steps:  # the last one is written once, after the loop
                    checkpoint()
    except KeyboardInterrupt:
        if master:
            print(f"interrupted at step {step}: saving {out / 'ckpt.pt'} (continue with --resume)")
    bar.close()
    summary = {"final_loss": sum(losses[-100:]) / max(1, len(losses[-100:])), "steps": step, "params": n_params,
               "wall_s": round(time.time() - t_start, 1), "images_per_s": round(seen / max(t_train, 1e-9), 1),
               "steps_per_s": round(len(losses) / max(t_train, 1e-9), 3), "dataset": cfg.dataset,
               "world_size": world, "device": str(device)}
    if master:
        checkpoint()
        R.write_json(out / "summary.json", summary)
        print(f"done: loss {summary['final_loss']:.4f} after {step} steps in {summary['wall_s']} s "
              f"({summary['steps_per_s']} steps/s) -> {out}")
    log.close()
    R.ddp_cleanup()
    return summary


if __name__ == "__main__":
    main(R.parse(Config, PRESETS))
