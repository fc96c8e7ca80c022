"""Train a Vision Transformer classifier.

    python vit/train.py --preset quick                         # Fashion-MNIST, ~2 min on a laptop CPU
    python vit/train.py                                        # the 30-minute CPU quality run (the paper's hybrid)
    python vit/train.py --preset pure                          # the same budget, patches of raw pixels
    torchrun --nproc_per_node 8 vit/train.py --preset paper --dataset cifar10

5,000 training images are held out (--val-size): best.pt is the epoch with the best validation accuracy, and the
test set is evaluated once, at the end, on it. Ctrl-C or SIGTERM saves ckpt.pt; --resume continues exactly.
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
    patches of a 16-channel CNN feature map; ~27 min on a 2-core CPU with AMX (bf16), ~54 min on one with AVX2 only
    (fp32)."""
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
    val_size: int = 5000
    """training images held out (a fixed seeded slice, D.val_split) to select the checkpoint on; the test set is
    evaluated once, on that checkpoint (0: no validation split, nothing is selected, the last epoch is tested)"""
    compile: bool = False
    cpu_bf16: bool | None = None
    """bf16 autocast on the CPU too; None: on when the CPU has AMX or AVX512-BF16 (always on for CUDA)"""

    def check(self):
        super().check()
        _, size, _ = D.dataset_info(self.dataset)
        R.positive(self, "patch_size", "dim", "depth", "heads", "mlp_dim", "epochs", "batch_size", "lr")
        R.nonnegative(self, "stem", "weight_decay", "warmup_epochs", "crop_pad", "val_size")
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
    """Linear warmup, then cosine decay to zero at step `total` (and zero after it)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return 0.5 * lr * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


NO_DECAY = ("cls_token", "pos_embedding")  # as timm's no_weight_decay(): the tokens and position embeddings


def param_groups(model, weight_decay):
    """AdamW groups: weight decay on the weight matrices and conv kernels only; none on norms, biases, the class
    token and the position embeddings."""
    named = list(model.named_parameters())
    decay = [p for n, p in named if p.dim() >= 2 and n not in NO_DECAY]
    no_decay = [p for n, p in named if p.dim() < 2 or n in NO_DECAY]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def evaluate(model, x, y, device, batch_size=500, cpu_bf16=False):
    """Returns (accuracy, predictions) over uint8 images x, in eval mode; the model's mode is restored after."""
    was_training = model.training
    model.eval()
    preds = []
    try:
        for i in range(0, len(x), batch_size):
            with R.autocast(device, cpu_bf16):
                logits = model(D.to_unit_range(x[i:i + batch_size].to(device)))
            preds.append(logits.argmax(-1).cpu())
    finally:
        model.train(was_training)
    preds = torch.cat(preds)
    return (preds == y).float().mean().item(), preds


def main(cfg: Config) -> dict:
    R.validate(cfg)
    R.sigterm_as_interrupt()
    rank, world, device = R.ddp_setup(cfg.device)
    master = rank == 0
    R.seed_everything(cfg.seed + rank)
    cfg = replace(cfg, cpu_bf16=R.resolve_cpu_bf16(cfg.cpu_bf16))
    out = Path(cfg.out_dir)
    ckpt = None
    if cfg.resume:  # before any data loads: a wrong checkpoint or changed flags fail at once
        ckpt = R.load_checkpoint(out / "ckpt.pt", "vit", device, keys=("model", "optimizer", "config", "progress",
                                                                        "rng"))
        R.check_resume(ckpt["config"], cfg, ignore=("epochs",))
        R.check(ckpt["progress"]["world"] == world, f"--resume with {world} process(es): the checkpoint was "
                f"written by {ckpt['progress']['world']}")
    c, size, classes = D.dataset_info(cfg.dataset)
    xtr, ytr = D.load_images(cfg.dataset, "train", cfg.data_dir)
    xte, yte = D.load_images(cfg.dataset, "test", cfg.data_dir)
    train_idx, val_idx = D.val_split(len(xtr), cfg.val_size)
    xval, yval = xtr[val_idx], ytr[val_idx]
    xtr, ytr = xtr[train_idx], ytr[train_idx]
    mcfg = ViTConfig(image_size=size, patch_size=cfg.patch_size, in_chans=c, num_classes=len(classes), dim=cfg.dim,
                     depth=cfg.depth, heads=cfg.heads, mlp_dim=cfg.mlp_dim, dropout=cfg.dropout,
                     drop_path=cfg.drop_path, pool=cfg.pool, pos_emb=cfg.pos_emb, stem=cfg.stem)
    model = ViT(mcfg).to(device)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999))
    # where the run stands: epochs and batches done, the unfinished epoch's sums, the selection so far
    prog = dict(epoch=0, epoch_step=0, step=0, loss_sum=0.0, correct=0, seen=0, best_val_acc=-1.0, best_epoch=0,
                train_s=0.0, images_seen=0, world=world)
    if ckpt is not None:
        R.load_state(model, ckpt["model"], "model")
        R.load_state(opt, ckpt["optimizer"], "optimizer state")
        prog.update(ckpt["progress"])
        if master:  # the other ranks' streams are not stored: they re-seed by the step
            R.set_rng_state(ckpt["rng"])
        else:
            R.seed_everything(cfg.seed + rank + 1000 * prog["step"])
    elif master:
        (out / "best.pt").unlink(missing_ok=True)  # a fresh run: sample.py must not pick an older run's selection
    raw = model
    if cfg.compile:
        model = torch.compile(model)
    model = R.wrap_ddp(model, device)
    steps_per_epoch = len(D.shuffled_batches(len(xtr), cfg.batch_size, 0, cfg.seed, rank, world))
    total, warmup = cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch)
    flip = cfg.hflip and D.flips_are_valid(cfg.dataset)
    log = R.Logger(out, cfg, "papers-vit", cfg.wandb, cfg.resume, enabled=master)
    if master:
        print(f"ViT {param_count(raw) / 1e6:.2f}M params | {raw.num_patches} patches + "
              f"{'cls' if cfg.pool == 'cls' else 'mean pool'} | {cfg.dataset} {len(xtr)} train / {len(xval)} val / "
              f"{len(xte)} test | world {world} | {device}{' bf16' if device.type == 'cuda' or cfg.cpu_bf16 else ''}")
    batch_rng, batch_buffers = None, {}  # the RNG state and buffers the running batch started from: an interrupted
    # batch is redone from them (its forward pass already moved BatchNorm's running statistics)

    def checkpoint(path):
        R.save_checkpoint({"kind": "vit", "model": raw.state_dict(), "model_config": asdict(mcfg),
                           "config": asdict(cfg), "classes": classes, "dataset": cfg.dataset, "epoch": prog["epoch"],
                           "step": prog["step"], "optimizer": opt.state_dict(), "progress": dict(prog),
                           "rng": batch_rng or R.rng_state()}, path)

    t_start, finished, lr = time.time(), False, 0.0
    try:
        while prog["epoch"] < cfg.epochs:
            t0, seen0 = time.perf_counter(), prog["seen"]
            batches = D.shuffled_batches(len(xtr), cfg.batch_size, prog["epoch"], cfg.seed, rank, world)
            for idx in R.progress(batches[prog["epoch_step"]:], desc=f"epoch {prog['epoch'] + 1}/{cfg.epochs}",
                                  disable=not master, leave=False):
                batch_buffers = {k: b.clone() for k, b in raw.named_buffers()}
                batch_rng = R.rng_state()
                x, y = xtr[idx].to(device), ytr[idx].to(device)
                if flip:
                    x = D.random_flip(x)
                if cfg.crop_pad:  # on the uint8 pixels, so that the padding is black (0) as in torchvision
                    x = D.random_crop(x, cfg.crop_pad)
                x = D.to_unit_range(x)
                if cfg.erase_p:
                    x = D.random_erasing(x, cfg.erase_p)
                lr = lr_at(prog["step"], total, warmup, cfg.lr)
                for group in opt.param_groups:
                    group["lr"] = lr
                with R.autocast(device, cfg.cpu_bf16):
                    logits = model(x)
                    loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                with R.stops_held():  # an update is never saved without the step that counts it
                    opt.step()
                    prog["step"], prog["epoch_step"] = prog["step"] + 1, prog["epoch_step"] + 1
                    prog["loss_sum"] += loss.item() * len(y)
                    prog["correct"] += (logits.argmax(-1) == y).sum().item()
                    prog["seen"] += len(y)
                    batch_rng = None
            dt = time.perf_counter() - t0
            seen = prog["seen"] - seen0
            row = {"epoch": prog["epoch"] + 1, "step": prog["step"], "train_loss": prog["loss_sum"] / prog["seen"],
                   "train_acc": prog["correct"] / prog["seen"], "lr": lr, "epoch_s": dt,
                   "images_per_s": seen * world / dt}
            val_acc = evaluate(raw, xval, yval, device, cpu_bf16=cfg.cpu_bf16)[0] if master and cfg.val_size else None
            with R.stops_held():  # the epoch's bookkeeping as one: a stop before it only redoes the evaluation
                prog["train_s"], prog["images_seen"] = prog["train_s"] + dt, prog["images_seen"] + seen * world
                prog.update(epoch=prog["epoch"] + 1, epoch_step=0, loss_sum=0.0, correct=0, seen=0)
                if master:
                    if val_acc is not None:
                        row["val_acc"] = val_acc
                        if val_acc > prog["best_val_acc"]:
                            prog["best_val_acc"], prog["best_epoch"] = val_acc, prog["epoch"]
                            checkpoint(out / "best.pt")
                    val = f" | val acc {val_acc:.4f}" if val_acc is not None else ""
                    log.log(row, step=prog["step"], echo=f"epoch {row['epoch']} | loss {row['train_loss']:.4f} | "
                            f"train acc {row['train_acc']:.4f}{val} | {dt:.0f} s | {row['images_per_s']:.0f} img/s")
                    checkpoint(out / "ckpt.pt")  # every epoch
        finished = True
    except KeyboardInterrupt:
        if batch_rng is not None:  # stopped inside a batch: back to the buffers it started from
            for k, b in raw.named_buffers():
                b.copy_(batch_buffers[k])
        if master:
            checkpoint(out / "ckpt.pt")
            print(f"interrupted in epoch {prog['epoch'] + 1}: saved {out / 'ckpt.pt'} (continue with --resume)")
    summary = {"finished": finished, "epochs": prog["epoch"], "wall_s": round(time.time() - t_start, 1),
               "train_s": round(prog["train_s"], 1), "images_per_s": round(prog["images_seen"] /
                                                                          max(prog["train_s"], 1e-9), 1),
               "params": param_count(raw), "dataset": cfg.dataset, "train_size": len(xtr), "val_size": len(xval),
               "world_size": world, "device": str(device)}
    if master and finished:  # the test set, once, on the selected checkpoint
        if cfg.val_size:
            R.load_state(raw, R.load_checkpoint(out / "best.pt", "vit", device, keys=("model",))["model"], "model")
            summary.update(selected="best.pt", selected_on=f"validation accuracy ({len(xval)} held-out training "
                           f"images)", best_epoch=prog["best_epoch"], val_acc=prog["best_val_acc"])
        else:
            summary.update(selected="ckpt.pt", selected_on="nothing (--val-size 0): the last epoch",
                           best_epoch=prog["epoch"])
        summary["test_acc"] = evaluate(raw, xte, yte, device, cpu_bf16=cfg.cpu_bf16)[0]
        log.log({"epoch": prog["epoch"], "test_acc": summary["test_acc"], "selected_epoch": summary["best_epoch"]})
    if master:
        R.write_json(out / "summary.json", summary)
        if finished:
            print(f"done: test acc {summary['test_acc']:.4f} on {summary['selected']} (epoch {summary['best_epoch']}"
                  f", selected on {summary['selected_on']}) after {prog['epoch']} epochs in {summary['wall_s']} s, "
                  f"{summary['images_per_s']:.0f} img/s -> {out}")
    log.close()
    R.ddp_cleanup()
    return summary


if __name__ == "__main__":
    main(R.parse(Config, PRESETS))
