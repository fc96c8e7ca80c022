"""Sample from a trained GPT into generated.txt.

    python gpt/sample.py --out-dir out/gpt --num-samples 20 --prompt "ROMEO:" --temperature 0.8 --top-k 40
"""
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from gpt.model import GPT, CharTokenizer, GPTConfig
from utils import run as R


@dataclass
class Config:
    out_dir: str = "out/gpt"
    """training output folder: best.pt (else ckpt.pt) is loaded from it"""
    ckpt: str | None = None
    """an explicit checkpoint path instead"""
    output: str | None = None
    """where the samples go (default: <out_dir>/generated.txt)"""
    num_samples: int = 20
    max_new_tokens: int = 500
    prompt: str = "\n"
    temperature: float = 0.8
    top_k: int | None = None
    top_p: float | None = None
    use_cache: bool = True
    """KV cache: one new token per forward pass"""
    seed: int = 1337
    device: str = "auto"


def load_model(path, device):
    ckpt = R.load_checkpoint(path, "gpt", device)
    model = GPT(GPTConfig(**ckpt["model_config"])).to(device)
    model.load_state_dict(ckpt["model"])
    return model.eval(), CharTokenizer(ckpt["vocab"]), ckpt


def main(cfg: Config) -> dict:
    R.check(cfg.num_samples > 0 and cfg.max_new_tokens > 0, "--num-samples and --max-new-tokens must be positive")
    R.check(cfg.temperature >= 0, "--temperature must be >= 0 (0 is greedy)")
    R.check(cfg.top_k is None or cfg.top_k > 0, "--top-k must be positive")
    R.check(cfg.top_p is None or 0 < cfg.top_p <= 1, "--top-p must be in (0, 1]")
    R.check(len(cfg.prompt) > 0, "--prompt must not be empty")
    device = R.pick_device(cfg.device)
    out = Path(cfg.out_dir)
    path = Path(cfg.ckpt) if cfg.ckpt else (out / "best.pt" if (out / "best.pt").exists() else out / "ckpt.pt")
    model, tok, ckpt = load_model(path, device)
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
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text("".join(f"################ SAMPLE {i} ################\n{s}\n" for i, s in enumerate(samples)))
    print(samples[0][:300])
    print(f"\n{cfg.num_samples} samples x {cfg.max_new_tokens} tokens in {dt:.1f} s ({tps:,.0f} tokens/s, "
          f"cache {'on' if cfg.use_cache else 'off'}) -> {dest}  [model at iter {ckpt['step']}]")
    return {"tokens_per_s": tps, "output": str(dest)}


if __name__ == "__main__":
    main(R.parse(Config))
