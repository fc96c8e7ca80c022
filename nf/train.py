"""Train Real NVP by maximum likelihood; report bits per dimension (the dequantization bound, see
RealNVP.bits_per_dim), estimated on a validation split during training and on the test set once, at the end.

    python nf/train.py --preset quick              # 4-5 min on a 2-core CPU
    python nf/train.py                             # the default preset: 80 min in bf16 (Zen 5 EPYC), ~5 h in fp32
    python nf/train.py --preset seed               # 30 couplings at one scale (no multi-scale)
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
    """Adam's L2 term on every parameter, ActNorm's log-scale and the couplings' scale included (the paper puts
    5e-5 on the weight-norm scale parameters only)"""
    grad_clip: float = 100.0
    val_size: int = 2000
    """training images held out for the periodic estimates (0: none); the test set is scored once, at the end"""
    eval_interval: int = 1000
    """validation estimate, sample grid and ckpt.pt every this many steps"""
    ckpt_interval: int = 250
    """ckpt.pt also every this many steps (a killed run loses at most these)"""
    eval_batches: int = 4
    """validation batches of 500 in each periodic estimate"""
    log_interval: int = 100
    cpu_bf16: bool | None = None
    """bf16 autocast for the s/t networks on the CPU too; None: on when the CPU has AMX or AVX512-BF16 (always on
    for CUDA). The flow arithmetic and every reported bits/dim stay in fp32"""


    def check(self):
        super().check()
        R.positive(self, "hidden", "steps", "lr", "grad_clip", "eval_interval", "ckpt_interval", "eval_batches",
                   "log_interval")
        R.nonnegative(self, "num_scales", "final_couplings", "num_blocks", "single_scale", "warmup", "weight_decay",
                      "val_size")
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


DEFAULT = Config()  # the CPU quality run: 80 min on 2 cores with bf16 s/t networks (Zen 5 EPYC), ~5 h in fp32
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
def eval_bpd(model, x, device, batch_size=500, max_batches=None):
    """Mean bits/dim over (the first max_batches batches of) x, in eval mode: the s/t networks' and the
    dequantizer's BatchNorm use running statistics. One draw of u per image, so with variational dequantization
    this is a one-sample estimate of the bound in RealNVP.bits_per_dim. The model's mode is restored."""
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for i, start in enumerate(range(0, len(x), batch_size)):
        if max_batches is not None and i >= max_batches:
            break
        xb = x[start:start + batch_size].to(device)
        total += model.bits_per_dim(xb).sum().item()
        n += len(xb)
    model.train(was_training)
    return total / n


def main(cfg: Config) -> dict:
    R.validate(cfg)
    R.single_process("Real NVP training")
    device = R.pick_device(cfg.device)
    cfg = replace(cfg, cpu_bf16=R.resolve_cpu_bf16(cfg.cpu_bf16))
    R.seed_everything(cfg.seed)
    c, size, _ = D.dataset_info(cfg.dataset)
    xtr, _ = D.load_images(cfg.dataset, "train", cfg.data_dir)
    train_idx, val_idx = D.val_split(len(xtr), cfg.val_size)  # the same slice for every seed
    xtr, xval = xtr[train_idx], xtr[val_idx]
    xte, _ = D.load_images(cfg.dataset, "test", cfg.data_dir)
    batches_per_epoch = len(D.shuffled_batches(len(xtr), cfg.batch_size, 0, cfg.seed))  # exits 2 if none
    mcfg = FlowConfig(in_chans=c, image_size=size, num_scales=cfg.num_scales, final_couplings=cfg.final_couplings,
                      hidden=cfg.hidden, num_blocks=cfg.num_blocks, norm=cfg.norm, dequant=cfg.dequant,
                      single_scale=cfg.single_scale)
    model = RealNVP(mcfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    out = Path(cfg.out_dir)
    step, t_train, seen, val = 0, 0.0, 0, None
    if cfg.resume:
        ckpt = R.load_checkpoint(out / "ckpt.pt", "nf", device, keys=("model", "optimizer", "config", "step", "rng"))
        R.check_resume(ckpt["config"], cfg, ignore=("steps", "eval_interval", "ckpt_interval", "eval_batches",
                                                             "log_interval"))
        R.load_state(model, ckpt["model"], "model")
        R.load_state(opt, ckpt["optimizer"], "optimizer state")
        step, t_train, seen, val = ckpt["step"], ckpt.get("train_s", 0.0), ckpt.get("images", 0), ckpt.get("val_bpd")
        R.set_rng_state(ckpt["rng"])
        if step >= cfg.steps and "summary" in ckpt:  # finished: leave summary.json as it is
            print(f"{out / 'ckpt.pt'} has finished its {step} steps; nothing to do (raise --steps to train on)")
            return ckpt["summary"]
    log = R.Logger(out, cfg, "papers-nf", cfg.wandb, cfg.resume)
    print(f"Real NVP {num_params(model) / 1e6:.2f}M params | {cfg.dataset} {len(xtr)} train / {len(xval)} val / "
          f"{len(xte)} test | {device}{' bf16' if device.type == 'cuda' or cfg.cpu_bf16 else ''}")

    def checkpoint(summary=None, rng=None):
        R.save_checkpoint({"kind": "nf", "model": model.state_dict(), "model_config": asdict(mcfg),
                           "config": asdict(cfg), "dataset": cfg.dataset, "step": step, "optimizer": opt.state_dict(),
                           "rng": rng or R.rng_state(), "train_s": t_train, "images": seen, "val_bpd": val,
                           **({"summary": summary} if summary else {})}, out / "ckpt.pt")

    R.sigterm_as_interrupt()
    t_start, rng_at_step = time.time(), None
    epoch, done = divmod(step, batches_per_epoch)  # continue inside the epoch where the run stopped
    batches = iter(D.shuffled_batches(len(xtr), cfg.batch_size, epoch, cfg.seed)[done:])
    bar = R.progress(None, total=cfg.steps, initial=step, desc="train", mininterval=2)
    try:
        while step < cfg.steps:
            idx = next(batches, None)
            if idx is None:
                epoch += 1
                batches = iter(D.shuffled_batches(len(xtr), cfg.batch_size, epoch, cfg.seed))
                continue
            # a stop inside the step redoes it: with these draws, from these BatchNorm statistics
            buffers_at_step = {k: b.clone() for k, b in model.named_buffers()}  # first: rng_at_step marks them valid
            t0, rng_at_step = time.perf_counter(), R.rng_state()
            lr = lr_at(step, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            with R.autocast(device, cfg.cpu_bf16):  # only the convolutions of s and t run in bf16
                bpd = model.bits_per_dim(xtr[idx].to(device)).mean()  # maximum likelihood = minimum bits/dim
            opt.zero_grad(set_to_none=True)
            bpd.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            with R.stops_held():  # an update is never saved without the step that counts it (and logs it)
                opt.step()
                step, rng_at_step = step + 1, None
                t_train += time.perf_counter() - t0
                seen += len(idx)
                bar.update()
                if step % cfg.log_interval == 0:
                    log.log({"step": step, "train_bpd": bpd.item(), "lr": lr, "grad_norm": gnorm.item(),
                             "images_per_s": seen / t_train}, step=step)
                    bar.set_postfix(bpd=f"{bpd.item():.3f}")
            if step % cfg.eval_interval == 0 or step == cfg.steps:
                rng = R.rng_state()  # monitoring draws its own noise: training is the same at any --eval-interval
                try:
                    msg = f"step {step} | train bpd {bpd.item():.3f}"
                    if len(xval):  # monitoring only: nothing is selected on it (the last step is the model)
                        val = eval_bpd(model, xval, device, max_batches=cfg.eval_batches)
                        log.log({"step": step, "val_bpd": val}, step=step)
                        msg += f" | val bpd {val:.3f} (first {min(len(xval), cfg.eval_batches * 500)} val images)"
                    print(msg)
                    model.eval()
                    P.save_grid(model.sample(64, 0.7)[0], out / f"samples_step{step}.png", nrow=8)
                    model.train()
                finally:
                    R.set_rng_state(rng)
            if step % cfg.eval_interval == 0 or step % cfg.ckpt_interval == 0 or step == cfg.steps:
                checkpoint()
    except KeyboardInterrupt:
        bar.close()
        if rng_at_step is not None:  # stopped inside a step: save the state it started from
            for k, b in model.named_buffers():
                b.copy_(buffers_at_step[k])
        checkpoint(rng=rng_at_step)
        log.close()
        print(f"interrupted at step {step}: saved {out / 'ckpt.pt'} (continue with --resume)")
        return {"steps": step, "interrupted": True}
    bar.close()
    t_eval = time.perf_counter()
    final = eval_bpd(model, xte, device)  # the one use of the test set
    summary = {"test_bpd": final, "val_bpd": val, "dataset": cfg.dataset, "steps": step, "params": num_params(model),
               "wall_s": round(time.time() - t_start, 1), "train_s": round(t_train, 1),
               "images_per_s": round(seen / max(t_train, 1e-9), 1), "eval_s": round(time.perf_counter() - t_eval, 1),
               "device": str(device)}
    checkpoint(summary)
    R.write_json(out / "summary.json", summary)
    log.log({"step": step, "test_bpd": final}, step=step)
    log.close()
    print(f"done: test bits/dim {final:.4f} on all {len(xte)} test images after {step} steps, "
          f"{summary['wall_s']} s -> {out}")
    return summary


if __name__ == "__main__":
    main(R.parse(Config, PRESETS))
