"""Train a Vision Transformer classifier.

    python vit/train.py --preset quick                         # Fashion-MNIST, ~2 min on a laptop CPU
    python vit/train.py --preset default                       # the 30-minute CPU quality run (the paper's hybrid)
    python vit/train.py --preset pure                          # the same budget, patches of raw pixels
    torchrun --nproc_per_node 8 vit/train.py --preset paper --dataset cifar10
"""
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from utils import data as D
from utils import run as R
from vit.model import ViT, ViTConfig, param_count


@dataclass
class Config(R.ImageRunConfig):
    """The defaults are the `default` preset: the paper's hybrid (Section 3.1), the pure ViT's transformer on 7x7
    patches of a 16-channel CNN feature map, ~27 min on a 2-core CPU with AMX (bf16)."""
    out_dir: str = "out/vit"
    """ckpt.pt (last), best.pt (best validation accuracy), metrics.jsonl, summary.json"""
    preset: str = "default"
    """quick | default (the hybrid) | pure | paper; flags given explicitly override it"""
    patch_size: int = 7
    """7x7 patches on 28x28 images: 16 tokens (must divide the image size)"""
    dim: int = 128
    depth: int = 6
    heads: int = 4
    mlp_dim: int = 256
    dropout: float = 0.0
    drop_path: float = 0.05
    """stochastic depth rate of the last block"""
    pool: Literal["cls", "mean"] = "mean"
    """cls: read out a class token (Eq. 4); mean: average the patch tokens"""
    pos_emb: Literal["learned", "sincos"] = "learned"
    """learned (the paper) | sincos (fixed 2-D sine-cosine; needs --dim divisible by 4)"""
    stem: int = 16
    """hybrid ViT: channels of the CNN stem the patches are cut from (0: raw pixels, the pure ViT)"""
    epochs: int = 46
    batch_size: int = 256
    """per process"""
    lr: float = 1.5e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    crop_pad: int = 2
    """random crop after zero padding by this many pixels (0: off)"""
    erase_p: float = 0.0
    """random erasing probability (0: off)"""
    hflip: bool = True
    """random horizontal flips (never applied to digits)"""
    compile: bool = False
    cpu_bf16: bool | None = None
    """bf16 autocast on the CPU too; None: on when the CPU has AMX or AVX512-BF16 (always on for CUDA)"""

    def check(self):
        super().check()
        _, size, _ = D.dataset_info(self.dataset)
        R.positive(self, "patch_size", "dim", "depth", "heads", "mlp_dim", "epochs", "batch_size", "lr")
        R.nonnegative(self, "stem", "weight_decay", "warmup_epochs", "crop_pad")
        R.between(self, "dropout", 0, 1, hi_open=True)
        R.between(self, "drop_path", 0, 1, hi_open=True)
        R.between(self, "label_smoothing", 0, 1)
        R.between(self, "erase_p", 0, 1)
        R.check(size % self.patch_size == 0, f"--patch-size {self.patch_size} does not divide the image size {size}"
                f" of {self.dataset}")
        R.check(self.dim % self.heads == 0, f"--dim {self.dim} must be divisible by --heads {self.heads}")
        R.check(self.pos_emb != "sincos" or self.dim % 4 == 0, f"--pos-emb sincos needs --dim divisible by 4, "
                f"got {self.dim}")
        R.check(self.warmup_epochs <= self.epochs, f"--warmup-epochs {self.warmup_epochs} exceeds --epochs "
                f"{self.epochs}")
        R.check(self.crop_pad <= size, f"--crop-pad {self.crop_pad} exceeds the image size {size}")
        # sane upper bounds: beyond these a typo would exhaust memory or run for days
        for name, hi in (("dim", 4096), ("depth", 128), ("mlp_dim", 16384), ("stem", 1024), ("batch_size", 65536),
                         ("epochs", 100_000)):
            R.between(self, name, 0, hi)


DEFAULT = Config()
# The pure ViT, ~26 min on a 2-core CPU with AMX (bf16): 7x7 patches (16 tokens) buy 2.4x the images/s of 4x4
# patches and learn faster per epoch in a short schedule; light regularisation, mean pooling
PURE = replace(DEFAULT, preset="pure", stem=0, batch_size=128, lr=1e-3, epochs=52)
PRESETS = {
    "default": DEFAULT,
    "pure": PURE,
    "quick": replace(PURE, preset="quick", dim=64, depth=4, mlp_dim=128, epochs=4, warmup_epochs=0.5, drop_path=0.0,
                     crop_pad=0),
    # ViT-Tiny (Touvron et al. 2021) width and depth, for GPUs: 4x4 patches, a class token, random erasing
    "paper": replace(DEFAULT, preset="paper", patch_size=4, dim=192, depth=12, heads=3, mlp_dim=768, drop_path=0.1,
                     pool="cls", stem=0, epochs=100, lr=1e-3, warmup_epochs=5, erase_p=0.25),
}


def lr_at(step, total, warmup, lr):
    """Linear warmup, then cosine decay to zero."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return 0.5 * lr * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@torch.no_grad()
def evaluate(model, x, y, device, batch_size=500, cpu_bf16=False):
    """Returns (accuracy, predictions) over uint8 images x."""
    model.eval()
    preds = []
    for i in range(0, len(x), batch_size):
        with R.autocast(device, cpu_bf16):
            logits = model(D.to_unit_range(x[i:i + batch_size].to(device)))
        preds.append(logits.argmax(-1).cpu())
    model.train()
    preds = torch.cat(preds)
    return (preds == y).float().mean().item(), preds


def main(cfg: Config) -> dict:
    R.validate(cfg)
    rank, world, device = R.ddp_setup(cfg.device)
    master = rank == 0
    R.seed_everything(cfg.seed + rank)
    cfg = replace(cfg, cpu_bf16=R.resolve_cpu_bf16(cfg.cpu_bf16))
    c, size, classes = D.dataset_info(cfg.dataset)
    xtr, ytr = D.load_images(cfg.dataset, "train", cfg.data_dir)
    xte, yte = D.load_images(cfg.dataset, "test", cfg.data_dir)
    mcfg = ViTConfig(image_size=size, patch_size=cfg.patch_size, in_chans=c, num_classes=len(classes), dim=cfg.dim,
                     depth=cfg.depth, heads=cfg.heads, mlp_dim=cfg.mlp_dim, dropout=cfg.dropout,
                     drop_path=cfg.drop_path, pool=cfg.pool, pos_emb=cfg.pos_emb, stem=cfg.stem)
    model = ViT(mcfg).to(device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "pos_embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or "pos_embedding" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.999))
    out = Path(cfg.out_dir)
    epoch, best_acc, step = 0, 0.0, 0
    if cfg.resume:
        ckpt = R.load_checkpoint(out / "ckpt.pt", "vit", device)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        epoch, best_acc, step = ckpt["epoch"], ckpt["best_test_acc"], ckpt["step"]
    raw = model
    if cfg.compile:
        model = torch.compile(model)
    model = R.wrap_ddp(model, device)
    steps_per_epoch = len(D.shuffled_batches(len(xtr), cfg.batch_size, 0, cfg.seed, rank, world))
    R.check(steps_per_epoch > 0, f"batch size {cfg.batch_size} x {world} is larger than the training set")
    total, warmup = cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch)
    flip = cfg.hflip and D.flips_are_valid(cfg.dataset)
    log = R.Logger(out, cfg, "papers-vit", cfg.wandb, cfg.resume, enabled=master)
    if master:
        print(f"ViT {param_count(raw) / 1e6:.2f}M params | {raw.num_patches} patches + "
              f"{'cls' if cfg.pool == 'cls' else 'mean pool'} | {cfg.dataset} {len(xtr)}/{len(xte)} | "
              f"world {world} | {device}{' bf16' if device.type == 'cuda' or cfg.cpu_bf16 else ''}")

    def checkpoint(path):
        R.save_checkpoint({"kind": "vit", "model": raw.state_dict(), "model_config": asdict(mcfg),
                           "config": asdict(cfg), "classes": classes, "dataset": cfg.dataset, "epoch": epoch,
                           "step": step, "optimizer": opt.state_dict(), "best_test_acc": best_acc,
                           "test_acc": acc}, path)

    t_start, t_train, n_seen, acc = time.time(), 0.0, 0, 0.0
    try:
        while epoch < cfg.epochs:
            t0, loss_sum, correct, seen = time.perf_counter(), 0.0, 0, 0
            batches = D.shuffled_batches(len(xtr), cfg.batch_size, epoch, cfg.seed, rank, world)
            for idx in R.progress(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not master, leave=False):
                x, y = xtr[idx].to(device), ytr[idx].to(device)
                if flip:
                    x = D.random_flip(x)
                if cfg.crop_pad:  # on the uint8 pixels, so that the padding is black (0) as in torchvision
                    x = D.random_crop(x, cfg.crop_pad)
                x = D.to_unit_range(x)
                if cfg.erase_p:
                    x = D.random_erasing(x, cfg.erase_p)
                lr = lr_at(step, total, warmup, cfg.lr)
                for group in opt.param_groups:
                    group["lr"] = lr
                with R.autocast(device, cfg.cpu_bf16):
                    logits = model(x)
                    loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                step += 1
                loss_sum += loss.item() * len(y)
                correct += (logits.argmax(-1) == y).sum().item()
                seen += len(y)
            dt = time.perf_counter() - t0
            t_train, n_seen = t_train + dt, n_seen + seen * world
            epoch += 1
            acc, _ = evaluate(raw, xte, yte, device, cpu_bf16=cfg.cpu_bf16)
            best_acc = max(best_acc, acc)
            if master:
                row = {"epoch": epoch, "step": step, "train_loss": loss_sum / seen, "train_acc": correct / seen,
                       "test_acc": acc, "lr": lr, "epoch_s": dt, "images_per_s": seen * world / dt}
                log.log(row, step=step, echo=f"epoch {epoch} | loss {row['train_loss']:.4f} | train acc "
                        f"{row['train_acc']:.4f} | test acc {acc:.4f} | {dt:.0f} s | {row['images_per_s']:.0f} img/s")
                if acc >= best_acc:
                    checkpoint(out / "best.pt")
                checkpoint(out / "ckpt.pt")
    except KeyboardInterrupt:
        if master:
            checkpoint(out / "ckpt.pt")
            print(f"interrupted in epoch {epoch + 1}: saved {out / 'ckpt.pt'} (continue with --resume)")
    summary = {"test_acc": acc, "best_test_acc": best_acc, "epochs": epoch, "wall_s": round(time.time() - t_start, 1),
               "images_per_s": round(n_seen / max(t_train, 1e-9), 1), "params": param_count(raw),
               "dataset": cfg.dataset, "world_size": world, "device": str(device)}
    if master:
        R.write_json(out / "summary.json", summary)
        print(f"done: test acc {acc:.4f} (best {best_acc:.4f}) after {epoch} epochs in {summary['wall_s']} s, "
              f"{summary['images_per_s']:.0f} img/s -> {out}")
    log.close()
    R.ddp_cleanup()
    return summary


if __name__ == "__main__":
    main(R.parse(Config, PRESETS))
