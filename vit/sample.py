"""Evaluate a trained ViT: accuracy, per-class accuracy, confusion matrix, predictions, attention rollout, and
classification of your own images.

    python vit/sample.py --out-dir out/vit
    python vit/sample.py --out-dir out/vit --images shoe.jpg shirt.png

Without a training run in --out-dir it evaluates the shipped model (vit/pretrained/default.safetensors).
"""
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from utils import data as D
from utils import plot as P
from utils import run as R
from utils import weights as W
from vit.model import ViT, ViTConfig, attention_rollout
from vit.train import evaluate

# utils/weights.py: what a shipped file holds (the run's best.pt: best validation accuracy) and how it is scored
EXPORT = {"files": {"default": ("best.pt", "ckpt.pt")}, "weights": "model",
          "keys": ("config", "classes", "dataset", "epoch")}
SCORE_SUBSET = "the first 1,000 test images"


@dataclass
class Config:
    out_dir: str = "out/vit"
    """training output folder: the selected checkpoint (best.pt, chosen on the validation split; ckpt.pt, the last
    epoch, when training ran without one; else the shipped model) is loaded, figures and eval.json are written here"""
    ckpt: str | None = None
    """a checkpoint file (or shipped .safetensors) to evaluate instead"""
    images: list[str] = field(default_factory=list)
    """your own image files to classify (any size or mode); prints the top-3 classes"""
    data_dir: str | None = None
    num_show: int = 32
    """test images in the predictions grid (1-256)"""
    device: str = "auto"

    def check(self):
        R.check_device(self.device)
        R.between(self, "num_show", 1, 256)
        R.file_exists(self.ckpt, "--ckpt")
        R.folder(self.out_dir, "--out-dir")
        for path in self.images:
            R.file_exists(path, "image")
        R.existing_folder(self.data_dir, "--data-dir")


def build(ckpt):
    return ViT(ViTConfig(**ckpt["model_config"]))


def load_model(path, device):
    return R.load_model(path, "vit", build, device, keys=("config", "classes", "dataset", "epoch"))


def score(model, ckpt):
    """The card's metric (utils/weights.py): accuracy on the first 1,000 test images."""
    x, y = D.load_images(ckpt["dataset"], "test")
    acc, _ = evaluate(model, x[:1000], y[:1000], next(model.parameters()).device,
                      cpu_bf16=bool(ckpt["config"].get("cpu_bf16")))
    return {"test_acc_1000": acc}


def read_image(path, cfg):
    """Any image file -> uint8 (1, C, H, W) at the model's size and channel count."""
    from PIL import Image, UnidentifiedImageError
    try:
        img = Image.open(path)
        img = img.convert("L" if cfg.in_chans == 1 else "RGB").resize((cfg.image_size, cfg.image_size))
    except (FileNotFoundError, IsADirectoryError):
        R.die(f"image not found: {path}")
    except (UnidentifiedImageError, OSError) as e:
        R.die(f"cannot decode image {path}: {e}")
    x = torch.from_numpy(np.array(img, dtype=np.uint8))
    return (x[None, None] if x.ndim == 2 else x.permute(2, 0, 1)[None]).contiguous()


def classify(model, paths, classes, device):
    results = []
    for p in paths:
        x = read_image(p, model.cfg)
        probs = F.softmax(model(D.to_unit_range(x.to(device))), dim=-1)[0]
        top = probs.topk(min(3, len(classes)))
        results.append({"image": str(p), "top3": [(classes[i], round(v.item(), 4)) for v, i in zip(*top)]})
        print(f"{p}: " + ", ".join(f"{c} {v:.1%}" for c, v in results[-1]["top3"]))
    return results


def confusion_figure(y, preds, classes, path):
    cm = torch.zeros(len(classes), len(classes), dtype=torch.long)
    cm.index_put_((y, preds), torch.ones_like(y), accumulate=True)
    fig, ax = P.plt.subplots(figsize=(6.5, 5.5))
    ax.imshow(cm, cmap="Blues")
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=6,
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=60, fontsize=7)
    ax.set_yticks(range(len(classes)), classes, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    P.plt.close(fig)
    return cm


def rollout_figure(model, x, classes, path, device):
    """Top row: test images; bottom row: attention rollout from the read-out token, upsampled to the image.
    Returns the rollout (B, N)."""
    logits, atts = model(D.to_unit_range(x.to(device)), need_weights=True)
    rel = attention_rollout(atts, model.cfg.pool == "cls")  # (B, N)
    g = model.cfg.image_size // model.cfg.patch_size
    heat = F.interpolate(rel.view(-1, 1, g, g), size=x.shape[-2:], mode="bilinear", align_corners=False)
    fig, axes = P.plt.subplots(2, len(x), figsize=(1.5 * len(x), 3.2), squeeze=False)
    for i in range(len(x)):
        img = x[i].permute(1, 2, 0).numpy()
        axes[0, i].imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray")
        axes[0, i].set_title(classes[logits[i].argmax().item()], fontsize=7)
        axes[1, i].imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray")
        axes[1, i].imshow(heat[i, 0].cpu(), cmap="jet", alpha=0.5)
        for ax in axes[:, i]:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    P.plt.close(fig)
    return rel


@torch.no_grad()
def main(cfg: Config) -> dict:
    R.validate(cfg)
    device = R.pick_device(cfg.device)
    out = Path(cfg.out_dir)
    # the checkpoint train.py selected: best.pt (best validation accuracy), or ckpt.pt when it ran with --val-size 0
    path = W.pick(cfg.ckpt, out, "vit")
    model, ckpt = load_model(path, device)
    origin = Path(ckpt.get("shipped_from") or path).name  # a shipped file says which file of its run it holds
    selected_on = ("--ckpt" if cfg.ckpt else "validation accuracy" if origin == "best.pt" else
                   "nothing: the last epoch")
    out.mkdir(parents=True, exist_ok=True)
    classes = ckpt["classes"]
    if cfg.images:  # only the user's images: no dataset needed
        return {"predictions": classify(model, cfg.images, classes, device)}
    xte, yte = D.load_images(ckpt["dataset"], "test", cfg.data_dir)
    t0 = time.perf_counter()
    acc, preds = evaluate(model, xte, yte, device, cpu_bf16=bool(ckpt["config"].get("cpu_bf16")))  # as in training
    dt = time.perf_counter() - t0
    per_class = {c: (preds[yte == i] == i).float().mean().item() for i, c in enumerate(classes)}
    confusion_figure(yte, preds, classes, out / "confusion.png")
    n = min(cfg.num_show, len(xte))
    P.labeled_grid(xte[:n], [f"{classes[p]}\n({classes[t]})" for p, t in zip(preds[:n], yte[:n])],
                   out / "predictions.png", colors=["green" if p == t else "red" for p, t in zip(preds[:n], yte[:n])])
    rollout_figure(model, xte[:8], classes, out / "attention.png", device)
    summary = {"test_acc": acc, "per_class_acc": per_class, "eval_images_per_s": len(xte) / dt,
               "checkpoint": str(path), "selected_on": selected_on, "epoch": ckpt["epoch"], "dataset": ckpt["dataset"]}
    R.write_json(out / "eval.json", summary)
    print(f"test accuracy {acc:.4f} on {len(xte)} {ckpt['dataset']} images ({len(xte) / dt:.0f} img/s)")
    for c, a in per_class.items():
        print(f"  {c:>12s} {a:.3f}")
    print(f"wrote {out / 'confusion.png'}, {out / 'predictions.png'}, {out / 'attention.png'}, {out / 'eval.json'}")
    return summary


if __name__ == "__main__":
    main(R.parse(Config))
