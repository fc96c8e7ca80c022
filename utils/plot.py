"""Figures from real runs: image grids (PNG), GIFs (imageio) and training curves from metrics.jsonl."""
import math
from pathlib import Path

import numpy as np
import torch

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def to_uint8(x):
    """(N, C, H, W) float in [0, 1] (or uint8) -> uint8 numpy (N, H, W, C)."""
    x = x.detach().cpu()
    if x.dtype != torch.uint8:
        x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def make_grid(x, nrow=None, pad=2):
    """Tile (N, C, H, W) images into one uint8 array (rows*H, cols*W, C), white padding."""
    imgs = to_uint8(x)
    n, h, w, c = imgs.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    grid = np.full((ncol * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, np.uint8)
    for i, img in enumerate(imgs):
        r, col = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = img
    return grid


def save_grid(x, path, nrow=None, scale=2):
    """PNG of an image grid, upscaled by an integer factor so small images stay visible."""
    import imageio.v3 as iio
    g = make_grid(x, nrow).repeat(scale, 0).repeat(scale, 1)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(path, g[..., 0] if g.shape[-1] == 1 else g)
    return path


def save_gif(frames, path, fps=10, hold=20):
    """GIF from a list of uint8 (H, W[, C]) arrays; the last frame is held for `hold` extra frames."""
    import imageio.v2 as imageio
    frames = list(frames) + [frames[-1]] * hold
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    imageio.mimsave(path, frames, duration=1000 / fps, loop=0)
    return path


def labeled_grid(x, titles, path, ncol=8, colors=None, cmap="gray"):
    """Images with a caption under each (predicted/true labels, log-probabilities, ...)."""
    imgs = to_uint8(x)
    n = len(imgs)
    nrow = math.ceil(n / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(1.6 * ncol, 1.9 * nrow), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            img = imgs[i][..., 0] if imgs.shape[-1] == 1 else imgs[i]
            ax.imshow(img, cmap=cmap, vmin=0, vmax=255)
            ax.set_title(titles[i], fontsize=7, color=(colors[i] if colors else "black"))
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_curves(series, path, xlabel="step", ylabel="", title="", logy=False):
    """series: {label: (xs, ys)} or {label: (xs, ys, lo, hi)} -> one PNG with a line per label (and a shaded band
    from lo to hi)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (xs, ys, *band) in series.items():
        line, = ax.plot(xs, ys, label=label)
        if band:
            ax.fill_between(xs, band[0], band[1], color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
