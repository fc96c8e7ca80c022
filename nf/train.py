"""Train Real NVP by maximum likelihood; report bits per dimension.

    python nf/train.py --preset quick              # ~3 min on a laptop CPU
    python nf/train.py --preset default            # the CPU quality run
    python nf/train.py --preset seed               # 30 couplings at one scale, as the seed had it
"""
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import torch

from nf.model import FlowConfig, RealNVP, num_params
from utils import data as D
from utils import plot as P
from utils import run as R


@dataclass
class Config(R.ImageRunConfig):
    out_dir: str = "out/nf"
    """ckpt.pt, metrics.jsonl, summary.json, samples_step*.png"""
    preset: str = "default"
    """quick | default | seed | paper; flags given explicitly override it"""
    num_scales: int = 2
    final_couplings: int = 4
    hidden: int = 64
    num_blocks: int = 2
    norm: Literal["actnorm", "batchnorm", "none"] = "actnorm"
    """normalization flow layer after each coupling"""
    dequant: Literal["uniform", "variational"] = "variational"
    """uniform noise (Real NVP) or a learned q(u|x) (Flow++)"""
    single_scale: int = 0
    """>0: this many checkerboard couplings at one scale instead of the multi-scale flow"""
    steps: int = 9000
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 200
    weight_decay: float = 5e-5
    """L2 on the weights, as the paper (5e-5)"""
    grad_clip: float = 100.0
    eval_interval: int = 1000
    eval_batches: int = 4
    """test batches in each periodic estimate (the final number uses the whole test set)"""
    log_interval: int = 100
    cpu_bf16: bool | None = None
    """bf16 autocast for the s/t networks on the CPU too; None: on when the CPU has AMX or AVX512-BF16 (always on
    for CUDA). The flow arithmetic and every reported bits/dim stay in fp32"""


    def check(self):
        super().check()
        R.positive(self, "hidden", "steps", "lr", "grad_clip", "eval_interval", "eval_batches", "log_interval")
        R.nonnegative(self, "num_scales", "final_couplings", "num_blocks", "single_scale", "warmup", "weight_decay")
        R.check(self.batch_size >= 2, f"--batch-size must be at least 2, got {self.batch_size}")
        R.check(self.lr <= 1, f"--lr {self.lr} is far too large for Adam (at most 1)")
        R.check(self.hidden <= 1024 and self.num_blocks <= 64 and self.batch_size <= 65536,
                "--hidden <= 1024, --num-blocks <= 64 and --batch-size <= 65536")
        R.check(self.single_scale <= 256 and self.final_couplings <= 256, "--single-scale and --final-couplings <= 256")
        _, size, _ = D.dataset_info(self.dataset)
        R.check(self.single_scale or size % (2 ** self.num_scales) == 0,
                f"image size {size} is not divisible by 2^{self.num_scales} (--num-scales)")
        R.check(self.single_scale or self.num_scales + self.final_couplings > 0,
                "the flow needs --num-scales or --final-couplings (or --single-scale) > 0")


DEFAULT = Config()  # the CPU quality run: ~1.7 h on 2 cores with bf16 s/t networks
PRESETS = {
    "default": DEFAULT,
    "quick": replace(DEFAULT, preset="quick", hidden=32, num_blocks=1, final_couplings=2, dequant="uniform",
                     steps=500, eval_interval=250),
    "seed": replace(DEFAULT, preset="seed", single_scale=30, hidden=32, num_blocks=1, norm="none", dequant="uniform",
                    steps=6000, eval_batches=20),
    "paper": replace(DEFAULT, preset="paper", num_blocks=8, steps=100_000, eval_batches=20),
}


def lr_at(step, cfg):
    """Linear warmup, then cosine decay to 1% of lr."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    return cfg.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))))


@torch.no_grad()
def test_bpd(model, x, device, batch_size=500, max_batches=None):
    """Mean bits/dim over (a prefix of) the test set, in eval mode (running statistics)."""
    model.eval()
    total, n = 0.0, 0
    for i, start in enumerate(range(0, len(x), batch_size)):
        if max_batches is not None and i >= max_batches:
            break
        xb = x[start:start + batch_size].to(device)
        total += model.bits_per_dim(xb).sum().item()
        n += len(xb)
    model.train()
    return total / n


def main(cfg: Config) -> dict:
    R.validate(cfg)
    device = R.pick_device(cfg.device)
    cfg = replace(cfg, cpu_bf16=R.resolve_cpu_bf16(cfg.cpu_bf16))
    R.seed_everything(cfg.seed)
    c, size, _ = D.dataset_info(cfg.dataset)
    xtr, _ = D.load_images(cfg.dataset, "train", cfg.data_dir)
    xte, _ = D.load_images(cfg.dataset, "test", cfg.data_dir)
    mcfg = FlowConfig(in_chans=c, image_size=size, num_scales=cfg.num_scales, final_couplings=cfg.final_couplings,
                      hidden=cfg.hidden, num_blocks=cfg.num_blocks, norm=cfg.norm, dequant=cfg.dequant,
                      single_scale=cfg.single_scale)
    model = RealNVP(mcfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    out = Path(cfg.out_dir)
    step = 0
    if cfg.resume:
        ckpt = R.load_checkpoint(out / "ckpt.pt", "nf", device)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
    log = R.Logger(out, cfg, "papers-nf", cfg.wandb, cfg.resume)
    print(f"Real NVP {num_params(model) / 1e6:.2f}M params | {cfg.dataset} {len(xtr)}/{len(xte)} | {device}"
          f"{' bf16' if device.type == 'cuda' or cfg.cpu_bf16 else ''}")

    def checkpoint():
        R.save_checkpoint({"kind": "nf", "model": model.state_dict(), "model_config": asdict(mcfg),
                           "config": asdict(cfg), "dataset": cfg.dataset, "step": step,
                           "optimizer": opt.state_dict()}, out / "ckpt.pt")

    t_start, t_train, seen = time.time(), 0.0, 0
    epoch = step * cfg.batch_size // len(xtr)
    batches = iter(D.shuffled_batches(len(xtr), cfg.batch_size, epoch, cfg.seed))
    bar = R.progress(None, total=cfg.steps, initial=step, desc="train", mininterval=2)
    try:
        while step < cfg.steps:
            idx = next(batches, None)
            if idx is None:
                epoch += 1
                batches = iter(D.shuffled_batches(len(xtr), cfg.batch_size, epoch, cfg.seed))
                continue
            t0 = time.perf_counter()
            lr = lr_at(step, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            with R.autocast(device, cfg.cpu_bf16):  # only the convolutions of s and t run in bf16
                bpd = model.bits_per_dim(xtr[idx].to(device)).mean()  # maximum likelihood = minimum bits/dim
            opt.zero_grad(set_to_none=True)
            bpd.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            step += 1
            t_train += time.perf_counter() - t0
            seen += len(idx)
            bar.update()
            if step % cfg.log_interval == 0:
                log.log({"step": step, "train_bpd": bpd.item(), "lr": lr, "grad_norm": gnorm.item(),
                         "images_per_s": seen / t_train}, step=step)
                bar.set_postfix(bpd=f"{bpd.item():.3f}")
            if step % cfg.eval_interval == 0 or step == cfg.steps:
                tb = test_bpd(model, xte, device, max_batches=cfg.eval_batches)
                log.log({"step": step, "test_bpd_estimate": tb}, step=step,
                        echo=f"step {step} | train bpd {bpd.item():.3f} | test bpd (first {cfg.eval_batches * 500}) {tb:.3f}")
                model.eval()
                P.save_grid(model.sample(64, 0.7)[0], out / f"samples_step{step}.png", nrow=8)
                model.train()
                if step < cfg.steps:  # the last one is written once, after the loop
                    checkpoint()
    except KeyboardInterrupt:
        print(f"interrupted at step {step}: saving {out / 'ckpt.pt'} (continue with --resume)")
    bar.close()
    checkpoint()
    t_eval = time.perf_counter()
    final = test_bpd(model, xte, device)
    summary = {"test_bpd": final, "dataset": cfg.dataset, "steps": step, "params": num_params(model),
               "wall_s": round(time.time() - t_start, 1), "images_per_s": round(seen / max(t_train, 1e-9), 1),
               "eval_s": round(time.perf_counter() - t_eval, 1), "device": str(device)}
    R.write_json(out / "summary.json", summary)
    log.log({"step": step, "test_bpd": final}, step=step)
    log.close()
    print(f"done: test bits/dim {final:.4f} on all {len(xte)} test images after {step} steps, "
          f"{summary['wall_s']} s -> {out}")
    return summary


if __name__ == "__main__":
    main(R.parse(Config, PRESETS))
