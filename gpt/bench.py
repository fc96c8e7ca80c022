"""KV-cache benchmark: tokens/s of generate() with and without the cache at the `paper` model size.

    python gpt/bench.py            # prints both speeds and the ratio, writes out/gpt-bench/summary.json
    python gpt/bench.py --new-tokens 20 --n-layer 1 --n-head 2 --n-embd 32 --block-size 32  # a tiny check
"""
import time
from dataclasses import dataclass

import torch

from gpt.model import GPT, GPTConfig
from utils import run as R


@dataclass
class Config:
    out_dir: str = "out/gpt-bench"
    """summary.json goes here"""
    new_tokens: int = 500
    block_size: int = 256
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    """the model size: the `paper` preset's by default"""
    device: str = "auto"
    seed: int = 0

    def check(self):
        R.folder(self.out_dir, "--out-dir")
        R.positive(self, "new_tokens", "block_size", "n_layer", "n_head", "n_embd")
        R.nonnegative(self, "seed")
        R.check(self.n_embd % self.n_head == 0, f"--n-embd {self.n_embd} must be divisible by --n-head {self.n_head}")
        R.check(self.new_tokens <= 100_000 and self.block_size <= 65536 and self.n_layer <= 1024 and
                self.n_embd <= 16384, "--new-tokens <= 100000, --block-size <= 65536, --n-layer <= 1024 and "
                "--n-embd <= 16384")
        R.check_device(self.device)


def main(cfg: Config) -> dict:
    R.validate(cfg)
    device = R.pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = GPT(GPTConfig(vocab_size=65, block_size=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                          n_embd=cfg.n_embd)).to(device)
    model.eval()
    prompt = torch.zeros(1, 1, dtype=torch.long, device=device)
    result = {}
    for use_cache in (True, False):
        model.generate(prompt, 20, use_cache=use_cache)  # warm-up
        t0 = time.perf_counter()
        model.generate(prompt, cfg.new_tokens, use_cache=use_cache)
        if device.type == "cuda":
            torch.cuda.synchronize()
        result["cached" if use_cache else "uncached"] = cfg.new_tokens / (time.perf_counter() - t0)
    summary = {"tokens_per_s_cached": result["cached"], "tokens_per_s_uncached": result["uncached"],
               "speedup": result["cached"] / result["uncached"], "new_tokens": cfg.new_tokens,
               "block_size": cfg.block_size, "n_layer": cfg.n_layer, "n_embd": cfg.n_embd,
               "params": model.num_params(), "device": str(device)}
    R.write_json(f"{cfg.out_dir}/summary.json", summary)
    print(f"KV cache: {summary['tokens_per_s_cached']:,.0f} tok/s vs {summary['tokens_per_s_uncached']:,.0f} tok/s "
          f"without -> {summary['speedup']:.1f}x ({cfg.new_tokens} new tokens, block {cfg.block_size}, "
          f"{summary['params'] / 1e6:.1f}M params, {device})")
    return summary


if __name__ == "__main__":
    main(R.parse(Config))
