"""CartPole-v1 benchmark: our PPO on several seeds, side by side with Stable-Baselines3's PPO (same
hyperparameters) when `stable-baselines3` is installed.

    pip install -r requirements-bench.txt
    python ppo/bench.py --seeds 1 2 3 4 5          # per-seed table, solved count, wall-time ratio -> summary.json
"""
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ppo import train
from utils import run as R


@dataclass
class Config:
    out_dir: str = "out/ppo-bench"
    """ours-seed<N>/ (one training run per seed) and summary.json go here"""
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])
    total_timesteps: int = 100_000
    """per run, with the `default` preset's (RL-Zoo's) other settings"""
    sb3: bool = True
    """also run Stable-Baselines3 (skipped with a note when it is not installed)"""
    eval_episodes: int = 20

    def check(self):
        R.check(bool(str(self.out_dir).strip()), "--out-dir must not be empty")
        R.folder(self.out_dir, "--out-dir")
        R.check(0 < len(self.seeds) <= 100, "--seeds needs 1 to 100 seeds")
        R.check(all(s >= 0 for s in self.seeds), f"--seeds must be >= 0, got {self.seeds}")
        R.check(len(set(self.seeds)) == len(self.seeds), f"--seeds has a repeated seed: {self.seeds}")
        R.positive(self, "total_timesteps")
        R.between(self, "eval_episodes", 1, 10_000)


def run_sb3(seed, cfg, hp):
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.evaluation import evaluate_policy

    def lin(v):
        return lambda progress: progress * v  # progress goes 1 -> 0
    env = make_vec_env(hp.env, n_envs=hp.num_envs, seed=seed)
    model = PPO("MlpPolicy", env, n_steps=hp.num_steps, batch_size=hp.minibatch_size, n_epochs=hp.update_epochs,
                gamma=hp.gamma, gae_lambda=hp.gae_lambda, learning_rate=lin(hp.lr), clip_range=lin(hp.clip_coef),
                ent_coef=hp.ent_coef, vf_coef=hp.vf_coef, max_grad_norm=hp.max_grad_norm, seed=seed, device="cpu",
                verbose=0)
    t0 = time.time()
    model.learn(cfg.total_timesteps)
    train_s = time.time() - t0
    rets, _ = evaluate_policy(model, make_vec_env(hp.env, n_envs=1, seed=10_000 + seed),
                              n_eval_episodes=cfg.eval_episodes, deterministic=True, return_episode_rewards=True)
    return {"eval_return_mean": float(np.mean(rets)), "train_s": round(train_s, 2),
            "torch_threads": torch.get_num_threads()}


def main(cfg: Config) -> dict:
    R.validate(cfg)
    out = Path(cfg.out_dir)
    hp = train.DEFAULT
    rows, sb3 = [], cfg.sb3
    for seed in cfg.seeds:
        s = train.main(R.preset(train.PRESETS, "default", out_dir=str(out / f"ours-seed{seed}"), seed=seed,
                                total_timesteps=cfg.total_timesteps, eval_episodes=cfg.eval_episodes))
        row = {"seed": seed, "ours_return": s["eval_return_mean"], "ours_train_s": s["train_s"]}
        if sb3:
            try:
                threads = torch.get_num_threads()
                torch.set_num_threads(2)  # SB3 as a user runs it: torch's default threads on this machine
                b = run_sb3(seed, cfg, hp)
                torch.set_num_threads(threads)
                row.update(sb3_return=b["eval_return_mean"], sb3_train_s=b["train_s"])
            except ImportError:
                print("stable-baselines3 is not installed: pip install -r requirements-bench.txt")
                sb3 = False
        rows.append(row)
        print(row)
    summary = {"env": hp.env, "total_timesteps": cfg.total_timesteps, "rows": rows,
               "ours_solved": sum(r["ours_return"] >= 500 for r in rows),
               "ours_train_s_mean": float(np.mean([r["ours_train_s"] for r in rows]))}
    if sb3:
        summary["sb3_solved"] = sum(r["sb3_return"] >= 500 for r in rows)
        summary["sb3_train_s_mean"] = float(np.mean([r["sb3_train_s"] for r in rows]))
        summary["wall_ratio"] = summary["ours_train_s_mean"] / summary["sb3_train_s_mean"]
    R.write_json(out / "summary.json", summary)
    print("\n| seed | ours return | ours train s |" + (" SB3 return | SB3 train s |" if sb3 else ""))
    print("|---|---|---|" + ("---|---|" if sb3 else ""))
    for r in rows:
        print(f"| {r['seed']} | {r['ours_return']:.1f} | {r['ours_train_s']:.1f} |" +
              (f" {r['sb3_return']:.1f} | {r['sb3_train_s']:.1f} |" if sb3 else ""))
    print(f"ours solved {summary['ours_solved']}/{len(rows)}" + (f", SB3 solved {summary['sb3_solved']}/{len(rows)}, "
          f"wall ratio ours/SB3 {summary['wall_ratio']:.2f}" if sb3 else ""))
    return summary


if __name__ == "__main__":
    main(R.parse(Config))
