"""Sample from a trained GPT into generated.txt.

    python gpt/sample.py --out-dir out/gpt --num-samples 20 --prompt "ROMEO:" --temperature 0.8 --top-k 40

Without a training run in --out-dir it samples the shipped model (gpt/pretrained/default.safetensors).
"""
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from gpt.model import GPT, CharTokenizer, GPTConfig
from gpt.train import windows
from utils import data as D
from utils import run as R
from utils import weights as W

# utils/weights.py: what a shipped file holds (the run's best.pt: lowest validation loss) and how it is scored
EXPORT = {"files": {"default": ("best.pt", "ckpt.pt")}, "weights": "model", "keys": ("vocab", "step", "config")}
SCORE_SUBSET = "16 windows of block_size characters evenly spaced over the validation text (its last 10%)"


@dataclass
class Config:
    out_dir: str = "out/gpt"
    """training output folder: best.pt (lowest val loss), else ckpt.pt, else the shipped model is loaded; the
    samples go to it"""
    ckpt: str | None = None
    """an explicit checkpoint path (or shipped .safetensors) instead"""
    output: str | None = None
    """where the samples go, in an existing folder (default: <out_dir>/generated.txt)"""
    num_samples: int = 20
    max_new_tokens: int = 500
    prompt: str = "\n"
    temperature: float = 0.8
    """0 is greedy"""
    top_k: int | None = None
    """sample from the k most likely tokens only (None: all)"""
    top_p: float | None = None
    """nucleus sampling: the smallest set of tokens whose probability reaches p, in (0, 1] (None: off)"""
    use_cache: bool = True
    """KV cache: one new token per forward pass"""
    seed: int = 1337
    device: str = "auto"

    def check(self):
        R.positive(self, "num_samples", "max_new_tokens")
        R.check(self.num_samples <= 100_000 and self.max_new_tokens <= 1_000_000,
                "--num-samples <= 100000 and --max-new-tokens <= 1000000")
        R.nonnegative(self, "temperature", "seed")
        R.check(self.top_k is None or self.top_k > 0, f"--top-k must be positive, got {self.top_k}")
        R.check(self.top_p is None or 0 < self.top_p <= 1, f"--top-p must be in (0, 1], got {self.top_p}")
        R.check(len(self.prompt) > 0, "--prompt must not be empty")
        R.check(self.output is None or (self.output.strip() and not Path(self.output).is_dir()),
                f"--output {self.output!r} must name a file")
        R.check(self.output is None or Path(self.output).parent.is_dir(),
                f"--output {self.output}: the folder {Path(self.output or '.').parent} does not exist")
        R.check_device(self.device)
        R.file_exists(self.ckpt, "--ckpt")
        R.folder(self.out_dir, "--out-dir")


def build(ckpt):
    return GPT(GPTConfig(**ckpt["model_config"]))


def load_model(path, device):
    model, ckpt = R.load_model(path, "gpt", build, device, keys=("vocab", "step"))
    return model, CharTokenizer(ckpt["vocab"]), ckpt


@torch.no_grad()
def score(model, ckpt):
    """The card's metric (utils/weights.py): mean cross-entropy of 16 fixed validation windows."""
    tok, T = CharTokenizer(ckpt["vocab"]), ckpt["model_config"]["block_size"]
    ids = torch.tensor(tok.encode(D.load_text(ckpt["config"]["text"])), dtype=torch.long)
    val = ids[int(0.9 * len(ids)):]  # train.py's split
    x, y = windows(val, torch.linspace(0, len(val) - T - 2, 16).long(), T)
    device = next(model.parameters()).device
    return {"val_loss_16": model(x.to(device), y.to(device))[1].item()}


def main(cfg: Config) -> dict:
    R.validate(cfg)
    device = R.pick_device(cfg.device)
    out = Path(cfg.out_dir)
    model, tok, ckpt = load_model(W.pick(cfg.ckpt, out, "gpt"), device)
    bad = tok.unknown(cfg.prompt)
    R.check(not bad, f"--prompt has characters outside the model's vocabulary: {''.join(bad)!r}")
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    idx = torch.tensor([tok.encode(cfg.prompt)], device=device)
    samples, t0 = [], time.perf_counter()
    for _ in range(cfg.num_samples):
        y = model.generate(idx, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, cfg.use_cache, g)
        samples.append(tok.decode(y[0].tolist()))
    dt = time.perf_counter() - t0
    tps = cfg.num_samples * cfg.max_new_tokens / dt
    dest = Path(cfg.output) if cfg.output else out / "generated.txt"
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text("".join(f"################ SAMPLE {i} ################\n{s}\n" for i, s in enumerate(samples)))
    except OSError as e:
        R.die(f"cannot write {dest}: {e.strerror}")
    print(samples[0][:300])
    print(f"\n{cfg.num_samples} samples x {cfg.max_new_tokens} tokens in {dt:.1f} s ({tps:,.0f} tokens/s, "
          f"cache {'on' if cfg.use_cache else 'off'}) -> {dest}  [model at iter {ckpt['step']}]")
    return {"tokens_per_s": tps, "output": str(dest)}


if __name__ == "__main__":
    main(R.parse(Config))
