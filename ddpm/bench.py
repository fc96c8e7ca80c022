"""Our DDPM next to the `denoising-diffusion-pytorch` package, trained and scored the same way.

    pip install -r requirements-bench.txt
    python ddpm/bench.py                      # Fashion-MNIST, 1500 steps of batch 64 each -> out/ddpm_bench/

Their `GaussianDiffusion` is set to what the paper and ours do: epsilon prediction (`pred_noise`), the linear
schedule, T = 1000, no min-SNR weighting, no offset noise; their `Unet` gets our width (`dim` = ch), multipliers and
two residual blocks per level (theirs adds linear attention at every level). Both see the same batches and flips,
Adam with the same lr/warmup, gradient clipping, our EMA class and the same autocast. Training alternates between
the two in chunks of steps so that drift in the machine's speed hits both alike. Each EMA model then draws the same
number of DDIM-50 samples (eta 0 unless --eta) with its own sampler under the same autocast, scored by our FID
(ddpm/evaluate.py).
Prints steps/s and FID for both and writes summary.json, a grid of each model's first 64 samples and its EMA weights.
"""
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch

from ddpm.evaluate import feature_net, features, fid, to_8bit
from ddpm.model import EMA
from ddpm.train import build, check_unet, train_step, unet_config
from utils import data as D
from utils import plot as P
from utils import run as R


@dataclass
class Config:
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    ch: int = 32
    ch_mult: tuple[int, ...] = (1, 2, 2)
    attn_levels: tuple[int, ...] = ()
    """our U-Net's extra attention levels (ddpm/train.py's flag)"""
    linear_attn_levels: tuple[int, ...] = ()
    """our U-Net's linear-attention levels (ddpm/train.py's flag)"""
    norm: Literal["group", "rms"] = "group"
    """our U-Net's normalization, group or rms (ddpm/train.py's flag)"""
    scale_shift: bool = False
    """our U-Net's time conditioning as GroupNorm scale and shift (ddpm/train.py's flag)"""
    models: str = "ours,theirs"
    """which to train and score: ours, theirs or both (steps/s are comparable only when both alternate)"""
    steps: int = 1500
    batch_size: int = 64
    lr: float = 2e-4
    warmup: int = 100
    """linear LR warmup steps (0: none)"""
    ema_decay: float = 0.995
    chunk: int = 50
    """training steps per turn, alternating ours / theirs"""
    eta: float = 0.0
    """DDIM eta for both samplers: 0 deterministic, 1 the ancestral sigma"""
    fid_samples: int = 2000
    """DDIM-50 samples per model for FID, against as many test images (at most the test set's size)"""
    fid_cache_dir: str | None = None
    """where the FID classifier is cached (None: the repo's data/)"""
    fid_epochs: int = 2
    """epochs of the FID classifier, when it is trained (no cache yet)"""
    cpu_bf16: bool | None = None
    device: str = "auto"
    seed: int = 0
    out_dir: str = "out/ddpm_bench"

    def check(self):
        R.RunConfig.check(self)  # the shared checks of out_dir, seed and device (this is no training run)
        D.base_name(self.dataset)
        R.existing_folder(self.data_dir, "--data-dir")
        if self.fid_cache_dir is not None:
            R.folder(self.fid_cache_dir, "--fid-cache-dir")
        names = self.models.split(",")
        R.check(names and set(names) <= {"ours", "theirs"} and len(set(names)) == len(names),
                f"--models: ours, theirs or ours,theirs, not {self.models!r}")
        R.positive(self, "steps", "batch_size", "lr", "chunk")
        R.nonnegative(self, "warmup")
        R.one_of(self, "norm", ("group", "rms"))  # Literal: tyro checks the CLI, this the Python callers
        R.between(self, "ema_decay", 0, 1, hi_open=True)
        R.between(self, "eta", 0, 1)
        R.between(self, "fid_samples", 2, 100_000)
        R.between(self, "fid_epochs", 1, 100)
        check_unet(self)


def import_theirs():
    try:
        from denoising_diffusion_pytorch import GaussianDiffusion, Unet
    except ImportError:
        R.die("the side by side needs denoising-diffusion-pytorch: pip install -r requirements-bench.txt "
              "(or --models ours)")
    return GaussianDiffusion, Unet


def theirs(cfg, channels, size):
    """denoising-diffusion-pytorch's Unet + GaussianDiffusion, set to DDPM's epsilon objective and schedule."""
    GaussianDiffusion, Unet = import_theirs()
    unet = Unet(dim=cfg.ch, dim_mults=tuple(cfg.ch_mult), channels=channels)
    return GaussianDiffusion(unet, image_size=size, timesteps=1000, sampling_timesteps=50, ddim_sampling_eta=cfg.eta,
                             objective="pred_noise", beta_schedule="linear",
                             auto_normalize=False)  # we feed [-1, 1] ourselves


def main(cfg: Config) -> dict:
    R.validate(cfg)
    names = cfg.models.split(",")
    if "theirs" in names:
        import_theirs()  # fails fast, with one line, when the package is missing
    device = R.pick_device(cfg.device)
    bf16 = R.resolve_cpu_bf16(cfg.cpu_bf16)
    c, size, _ = D.dataset_info(cfg.dataset)
    xtr, _ = D.load_images(cfg.dataset, "train", cfg.data_dir)
    xte, _ = D.load_images(cfg.dataset, "test", cfg.data_dir)
    torch.manual_seed(cfg.seed)
    mcfg = unet_config(cfg, c, num_res_blocks=2)
    build_one = {"ours": lambda: build(mcfg, 1000, "linear", "beta"), "theirs": lambda: theirs(cfg, c, size)}
    models = {k: build_one[k]().to(device) for k in names}
    opts = {k: torch.optim.Adam(m.parameters(), lr=cfg.lr) for k, m in models.items()}
    emas = {k: EMA(m, cfg.ema_decay) for k, m in models.items()}
    params = {k: sum(p.numel() for p in (m.eps_model if k == "ours" else m.model).parameters())
              for k, m in models.items()}
    print("params: " + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in params.items()) + f" | {cfg.steps} steps "
          f"of batch {cfg.batch_size} | bf16 {bf16} | {device}")
    flip = D.flips_are_valid(cfg.dataset)
    batches, epoch = [], 0
    while len(batches) < cfg.steps:  # the same index sequence for both (a batch larger than the data exits 2)
        batches += list(D.shuffled_batches(len(xtr), cfg.batch_size, epoch, cfg.seed))
        epoch += 1
    train_s, losses = {k: 0.0 for k in models}, {k: [] for k in models}
    for start in range(0, cfg.steps, cfg.chunk):
        for k, model in models.items():
            gen = torch.Generator().manual_seed(cfg.seed + start)  # the same flips for both
            t0 = time.perf_counter()
            for step in range(start, min(start + cfg.chunk, cfg.steps)):
                x0 = D.to_unit_range(xtr[batches[step]].to(device))
                if flip:
                    x0 = D.random_flip(x0, gen)
                lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else cfg.lr
                loss, _ = train_step(model, model, opts[k], emas[k], x0, lr, step, device, bf16, 1.0)
                losses[k].append(loss)
            train_s[k] += time.perf_counter() - t0
        done = min(start + cfg.chunk, cfg.steps)
        print(f"step {done}: " + ", ".join(f"{k} loss {sum(v[-cfg.chunk:]) / len(v[-cfg.chunk:]):.4f} "
                                           f"{done / train_s[k]:.2f} steps/s" for k, v in losses.items()), flush=True)

    net = feature_net(cfg.dataset, device, cfg.data_dir, cfg.fid_epochs, cfg.fid_cache_dir)
    n = min(cfg.fid_samples, len(xte))
    f_test = features(net, xte[:n], device)
    res = {"config": asdict(cfg), "device": str(device)}
    with torch.no_grad():
        for k in models:
            ema, out = emas[k].model, []
            torch.manual_seed(cfg.seed)
            t0 = time.perf_counter()
            for i in range(0, n, 500):
                b = min(500, n - i)
                with R.autocast(device, bf16):  # the networks in bf16, both chains in fp32
                    out.append(ema.sample((b, c, size, size), device, "ddim", 50, eta=cfg.eta)[0] if k == "ours"
                               else ema.sample(b))
            sample_s = time.perf_counter() - t0
            x = to_8bit(torch.cat(out).float().clamp(-1, 1).cpu())  # the 8-bit pixels a saved PNG holds
            P.save_grid(x[:64], Path(cfg.out_dir) / f"samples_{k}.png", nrow=8)
            R.save_checkpoint({"ema": ema.state_dict(), "unet_config": mcfg if k == "ours" else None},
                              Path(cfg.out_dir) / f"ema_{k}.pt")  # for looking into the samples later
            res[k] = {"params": params[k], "steps_per_s": round(cfg.steps / train_s[k], 3),
                      "final_loss": sum(losses[k][-100:]) / len(losses[k][-100:]),
                      "fid": fid(features(net, x, device), f_test), "fid_n": n, "sample_s": round(sample_s, 1)}
            print(f"{k}: {res[k]['steps_per_s']} steps/s, FID {res[k]['fid']:.2f} ({n} DDIM-50 samples, "
                  f"eta {cfg.eta}, {sample_s:.0f} s)")
    if len(models) == 2:
        res["speed_ratio"] = res["ours"]["steps_per_s"] / res["theirs"]["steps_per_s"]
        print(f"ours / theirs: {res['speed_ratio']:.2f}x training steps/s; FID {res['ours']['fid']:.2f} vs "
              f"{res['theirs']['fid']:.2f}")
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    R.write_json(Path(cfg.out_dir) / "summary.json", res)
    return res


if __name__ == "__main__":
    main(R.parse(Config))
