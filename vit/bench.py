"""Training throughput of our ViT next to the `vit-pytorch` package's ViT of the same size.

    pip install -r requirements-bench.txt
    python vit/bench.py                      # prints images/s for both and the ratio, writes summary.json
"""
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from utils import run as R
from vit.model import ViT, ViTConfig, param_count


@dataclass
class Config:
    out_dir: str = "out/vit-bench"
    steps: int = 30
    batch_size: int = 128
    image_size: int = 28
    in_chans: int = 1
    patch_size: int = 4
    dim: int = 128
    depth: int = 6
    heads: int = 4
    mlp_dim: int = 256
    device: str = "auto"
    cpu_bf16: bool = False
    """both models under bf16 autocast on the CPU too"""

    def check(self):
        R.check(bool(str(self.out_dir).strip()), "--out-dir must not be empty")
        R.folder(self.out_dir, "--out-dir")
        R.check_device(self.device)
        R.positive(self, "steps", "batch_size", "image_size", "in_chans", "patch_size", "dim", "depth", "heads",
                   "mlp_dim")
        for name, hi in (("steps", 10_000), ("batch_size", 4096), ("image_size", 512), ("in_chans", 16),
                         ("dim", 4096), ("depth", 128), ("mlp_dim", 16384)):
            R.between(self, name, 1, hi)
        R.check(self.image_size % self.patch_size == 0, f"--patch-size {self.patch_size} does not divide "
                f"--image-size {self.image_size}")
        R.check(self.dim % self.heads == 0, f"--dim {self.dim} must be divisible by --heads {self.heads}")


def throughput(model, cfg, device):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(cfg.batch_size, cfg.in_chans, cfg.image_size, cfg.image_size, device=device)
    y = torch.randint(0, 10, (cfg.batch_size,), device=device)

    def step():
        with R.autocast(device, cfg.cpu_bf16):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    for _ in range(3):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(cfg.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return cfg.steps * cfg.batch_size / (time.perf_counter() - t0)


def main(cfg: Config) -> dict:
    R.validate(cfg)
    try:
        from vit_pytorch import ViT as TheirViT
    except ImportError:
        R.die("this benchmark needs vit-pytorch: pip install -r requirements-bench.txt")
    device = R.pick_device(cfg.device)
    torch.manual_seed(0)
    ours = ViT(ViTConfig(image_size=cfg.image_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans, dim=cfg.dim,
                         depth=cfg.depth, heads=cfg.heads, mlp_dim=cfg.mlp_dim, drop_path=0.0)).to(device)
    theirs = TheirViT(image_size=cfg.image_size, patch_size=cfg.patch_size, num_classes=10, dim=cfg.dim,
                      depth=cfg.depth, heads=cfg.heads, mlp_dim=cfg.mlp_dim, channels=cfg.in_chans,
                      dim_head=cfg.dim // cfg.heads).to(device)
    res = {"ours_images_per_s": throughput(ours, cfg, device), "vit_pytorch_images_per_s": throughput(theirs, cfg, device),
           "ours_params": param_count(ours), "vit_pytorch_params": param_count(theirs), "device": str(device),
           "config": {k: v for k, v in vars(cfg).items() if k != "out_dir"}}
    res["ratio"] = res["ours_images_per_s"] / res["vit_pytorch_images_per_s"]
    R.write_json(f"{cfg.out_dir}/summary.json", res)
    print(f"training throughput: ours {res['ours_images_per_s']:.0f} img/s ({res['ours_params'] / 1e6:.2f}M params) | "
          f"vit-pytorch {res['vit_pytorch_images_per_s']:.0f} img/s ({res['vit_pytorch_params'] / 1e6:.2f}M) | "
          f"ratio {res['ratio']:.2f}x on {device}")
    return res


if __name__ == "__main__":
    main(R.parse(Config))
