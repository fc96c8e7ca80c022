"""Evaluate a trained PPO agent and render an episode to a GIF.

    python ppo/sample.py --out-dir out/ppo                  # 20 deterministic episodes + episode.gif
    python ppo/sample.py --out-dir out/ppo --render human    # watch it (needs a display)

Without a training run in --out-dir it plays the shipped CartPole policy (ppo/pretrained/default.safetensors).
"""
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from ppo.model import ActorCritic
from ppo.train import check_env, evaluate
from utils import plot as P
from utils import run as R
from utils import weights as W

# utils/weights.py: what a shipped file holds (the last policy of a run, with its observation statistics) and its score
EXPORT = {"files": {"default": ("ckpt.pt",)}, "weights": "model", "keys": ("env", "step", "config")}
SCORE_SUBSET = "5 deterministic episodes, seeds 0-4"


@dataclass
class Config:
    out_dir: str = "out/ppo"
    """training output folder: ckpt.pt (else the shipped policy) is loaded from it, eval.json and episode.gif
    written to it"""
    ckpt: str | None = None
    """another checkpoint file, or shipped .safetensors (default: out_dir/ckpt.pt)"""
    env: str | None = None
    """defaults to the checkpoint's env; another id is refused"""
    episodes: int = 20
    stochastic: bool = False
    """sample actions instead of taking the mode"""
    render: Literal["gif", "human", "none"] = "gif"
    """gif: episode.gif; human: a window (needs a display); none"""
    gif_scale: float = 0.5
    """frame size factor for the GIF (keeps it small)"""
    seed: int = 0

    def check(self):
        R.check(bool(str(self.out_dir).strip()), "--out-dir must not be empty")
        R.folder(self.out_dir, "--out-dir")
        R.file_exists(self.ckpt, "--ckpt")
        if self.env is not None:
            check_env(self.env)
        R.between(self, "episodes", 1, 10_000)
        R.between(self, "gif_scale", 0, 4, lo_open=True)
        R.nonnegative(self, "seed")
        R.check(self.render != "human" or sys.platform != "linux" or "DISPLAY" in os.environ
                or "WAYLAND_DISPLAY" in os.environ, "--render human needs a display (none here); use gif")


def build(ckpt):
    return ActorCritic(**ckpt["model_config"])


def load_agent(path):
    return R.load_model(path, "ppo", build, keys=("env", "step"))


def score(agent, ckpt):
    """The card's metric (utils/weights.py): mean return of 5 deterministic episodes."""
    return {"return_5": float(np.mean(evaluate(agent, ckpt["env"], 5, seed=0)[0]))}


def main(cfg: Config) -> dict:
    R.validate(cfg)
    out = Path(cfg.out_dir)
    agent, ckpt = load_agent(W.pick(cfg.ckpt, out, "ppo"))
    env_id = cfg.env or ckpt["env"]
    R.check(env_id == ckpt["env"], f"the checkpoint is for {ckpt['env']}, not {env_id}")
    torch.manual_seed(cfg.seed)
    rets, lens, _ = evaluate(agent, env_id, cfg.episodes, cfg.seed, not cfg.stochastic,
                             "human" if cfg.render == "human" else None)
    result = {"env": env_id, "returns": rets, "lengths": lens, "mean": float(np.mean(rets)),
              "std": float(np.std(rets)), "deterministic": not cfg.stochastic, "step": ckpt["step"]}
    R.write_json(out / "eval.json", result)
    print(f"{env_id}: return {result['mean']:.1f} +- {result['std']:.1f} over {cfg.episodes} episodes -> "
          f"{out / 'eval.json'}")
    if cfg.render == "gif":
        from PIL import Image
        r, _, frames = evaluate(agent, env_id, 1, cfg.seed, not cfg.stochastic, "rgb_array")
        h, w = frames[0].shape[:2]
        size = (max(1, int(w * cfg.gif_scale)), max(1, int(h * cfg.gif_scale)))
        small = [np.asarray(Image.fromarray(f).resize(size)) for f in frames[::2]]  # every other frame: 25 fps
        P.save_gif(small, out / "episode.gif", fps=25, hold=5)
        result["gif"] = str(out / "episode.gif")
        print(f"wrote {out / 'episode.gif'} ({len(small)} frames, return {r[0]:.1f})")
    return result


if __name__ == "__main__":
    main(R.parse(Config))
