"""Train PPO on a gymnasium environment.

    python ppo/train.py                                 # CartPole-v1, RL-Zoo hyperparameters, 100k steps
    python ppo/train.py --preset pendulum               # Pendulum-v1 (continuous actions)
    python ppo/train.py --env MountainCar-v0 --total-timesteps 500000
"""
import importlib.util
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

from ppo.model import ActorCritic, RunningNorm, compute_gae, ppo_loss
from utils import run as R


@dataclass
class Config(R.RunConfig):
    out_dir: str = "out/ppo"
    """ckpt.pt (last), best.pt (best running training return), metrics.jsonl, summary.json"""
    preset: str = "default"
    """quick | default (= cartpole) | cartpole | acrobot | pendulum | paper (the paper's MuJoCo settings)"""
    env: str = "CartPole-v1"
    """any gymnasium id with a Box observation and Discrete or Box actions"""
    device: str = "cpu"
    """cpu only (auto means cpu): small MLPs stepping CPU envs run fastest there"""
    seed: int = 1
    total_timesteps: int = 100_000
    num_envs: int = 8
    num_steps: int = 32
    """rollout length T per env"""
    minibatch_size: int = 256
    update_epochs: int = 20
    gamma: float = 0.98
    gae_lambda: float = 0.8
    lr: float = 1e-3
    anneal_lr: bool = True
    """lr decays linearly to 0"""
    clip_coef: float = 0.2
    anneal_clip: bool = True
    """epsilon decays linearly to 0 (RL-Zoo's lin_0.2)"""
    vf_clip: float | None = None
    """clip the value update around the old values (None: off)"""
    vf_coef: float = 0.5
    ent_coef: float = 0.0
    max_grad_norm: float = 0.5
    target_kl: float | None = None
    """stop the epochs of an update once approx_kl exceeds this"""
    norm_adv: bool = True
    normalize_obs: bool = False
    """running mean/std of observations, frozen during a rollout and its update, then updated with its observations"""
    normalize_reward: bool = False
    hidden: int = 64
    shared: bool = False
    """one trunk for actor and critic"""
    eval_episodes: int = 20
    threads: int = 1
    """torch threads; 1 is fastest for 64-unit MLPs"""
    save_interval: int = 20
    """write ckpt.pt every this many updates (also at the end, on Ctrl-C and on SIGTERM)"""

    def check(self):
        super().check()
        R.check(self.device in ("auto", "cpu"), f"--device {self.device}: PPO runs on the CPU only (its small MLPs "
                "act on one CPU-stepped env batch at a time, faster than a copy to the GPU every step); use cpu")
        check_env(self.env)
        R.positive(self, "total_timesteps", "num_envs", "num_steps", "minibatch_size", "update_epochs",
                   "eval_episodes", "hidden", "threads", "lr", "max_grad_norm", "save_interval")
        R.between(self, "gamma", 0, 1, lo_open=True)
        R.between(self, "gae_lambda", 0, 1)
        R.nonnegative(self, "clip_coef", "vf_coef", "ent_coef")
        R.check(self.vf_clip is None or self.vf_clip > 0, "--vf-clip must be positive (or None: off)")
        R.check(self.target_kl is None or self.target_kl > 0, "--target-kl must be positive (or None: off)")
        R.check(self.num_envs <= 1024 and self.hidden <= 4096 and self.threads <= 256,
                "--num-envs <= 1024, --hidden <= 4096 and --threads <= 256")
        R.check(self.num_envs * self.num_steps <= 2 ** 22, "--num-envs x --num-steps (the rollout) must be <= 2**22")
        R.check(self.eval_episodes <= 10_000, "--eval-episodes must be <= 10000")


DEFAULT = Config()  # RL-Zoo's CartPole-v1 settings
PRESETS = {
    "default": DEFAULT,
    "cartpole": replace(DEFAULT, preset="cartpole"),
    "quick": replace(DEFAULT, preset="quick", total_timesteps=50_000),
    "acrobot": replace(DEFAULT, preset="acrobot", env="Acrobot-v1", total_timesteps=300_000, num_envs=16,
                       num_steps=256, minibatch_size=512, update_epochs=4, gamma=0.99, gae_lambda=0.94, lr=1e-3,
                       anneal_clip=False, normalize_obs=True, normalize_reward=True),
    "pendulum": replace(DEFAULT, preset="pendulum", env="Pendulum-v1", total_timesteps=300_000, num_envs=4,
                        num_steps=1024, minibatch_size=256, update_epochs=10, gamma=0.9, gae_lambda=0.95, lr=1e-3,
                        anneal_clip=False, normalize_obs=True, normalize_reward=True),
    # Table 3 of the paper (MuJoCo): 2048 steps, 10 epochs, minibatch 64, gamma 0.99, lambda 0.95, Adam 3e-4
    "paper": replace(DEFAULT, preset="paper", env="HalfCheetah-v5", total_timesteps=1_000_000, num_envs=1,
                     num_steps=2048, minibatch_size=64, update_epochs=10, gamma=0.99, gae_lambda=0.95, lr=3e-4,
                     anneal_clip=False, normalize_obs=True, normalize_reward=True, vf_clip=0.2),
}


EXTRAS = {"gymnasium.envs.mujoco": ("mujoco", "mujoco"), "gymnasium.envs.box2d": ("Box2D", "box2d")}


def check_env(env_id, installed=False):
    """A registered gymnasium id (at parse time); with `installed`, also that its simulator is importable (at the
    start of a run: a preset naming a MuJoCo env is a valid config on a machine without MuJoCo)."""
    R.check(bool(env_id.strip()), "--env must not be empty")
    try:
        entry = str(gym.spec(env_id).entry_point)
    except gym.error.Error as e:
        R.die(f"unknown env '{env_id}': {e}")
    for prefix, (module, extra) in EXTRAS.items() if installed else ():
        R.check(not entry.startswith(prefix) or importlib.util.find_spec(module) is not None,
                f'{env_id} needs {extra}, which requirements.txt does not install: pip install "gymnasium[{extra}]"')


def make_env(env_id, render_mode=None):
    try:
        return gym.make(env_id, render_mode=render_mode, disable_env_checker=True)
    except gym.error.Error as e:
        R.die(f"cannot make env '{env_id}': {e}")
    except ImportError as e:
        R.die(f"env '{env_id}' needs an extra package: {e}")


def env_spaces(env):
    obs, act = env.observation_space, env.action_space
    R.check(isinstance(obs, gym.spaces.Box) and len(obs.shape) == 1, f"needs a flat Box observation, got {obs}")
    R.check(isinstance(act, (gym.spaces.Discrete, gym.spaces.Box)), f"needs Discrete or Box actions, got {act}")
    continuous = isinstance(act, gym.spaces.Box)
    return obs.shape[0], (act.shape[0] if continuous else int(act.n)), continuous


@torch.no_grad()
def evaluate(agent, env_id, episodes, seed, deterministic=True, render_mode=None, frames_of=0):
    """Run full episodes with one env; returns (returns, lengths, frames of episode `frames_of` if rendering)."""
    if render_mode == "rgb_array":
        os.environ.setdefault("SDL_VIDEODRIVER", "dummy")  # off-screen frames need no display
    env = make_env(env_id, render_mode)
    low, high = (env.action_space.low, env.action_space.high) if agent.continuous else (None, None)
    returns, lengths, frames = [], [], []
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed + ep)
        done, ret, n = False, 0.0, 0
        while not done:
            if render_mode == "rgb_array" and ep == frames_of:
                frames.append(env.render())
            a, _, _, _ = agent.act(torch.as_tensor(obs, dtype=torch.float32)[None], deterministic=deterministic)
            a = a[0].numpy()
            obs, r, term, trunc, _ = env.step(np.clip(a, low, high) if agent.continuous else int(a))
            ret, n, done = ret + float(r), n + 1, term or trunc
        returns.append(ret)
        lengths.append(n)
    env.close()
    return returns, lengths, frames


def clone(x):
    """A copy of the tensors in nested dicts and lists (the rest is immutable or rebuilt by state_dict())."""
    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, dict):
        return {k: clone(v) for k, v in x.items()}
    return [clone(v) for v in x] if isinstance(x, list) else x


def main(cfg: Config) -> dict:
    R.validate(cfg)
    R.single_process("PPO")
    check_env(cfg.env, installed=True)
    torch.set_num_threads(cfg.threads)
    R.seed_everything(cfg.seed)
    obs_dim, act_dim, continuous = env_spaces(make_env(cfg.env))  # fails fast, with one line, on a bad env
    agent = ActorCritic(obs_dim, act_dim, continuous, cfg.hidden, cfg.shared, cfg.normalize_obs)
    opt = torch.optim.Adam(agent.parameters(), lr=cfg.lr, eps=1e-5, fused=True)
    ret_norm, ret_acc = RunningNorm(()), np.zeros(cfg.num_envs)  # reward scaling by the discounted return's std
    T, N = cfg.num_steps, cfg.num_envs
    batch = T * N
    num_updates = max(1, cfg.total_timesteps // batch)
    out = Path(cfg.out_dir)
    update, global_step, best, recent, train_s0 = 0, 0, -float("inf"), [], 0.0
    if cfg.resume:
        ckpt = R.load_checkpoint(out / "ckpt.pt", "ppo", keys=("config", "model", "optimizer", "reward_norm", "rng",
                                                               "update", "step", "best_return", "recent", "train_s"))
        R.check_resume(ckpt["config"], cfg, ignore=("total_timesteps", "eval_episodes", "threads", "save_interval"))
        R.load_state(agent, ckpt["model"], "model")  # weights and the observation statistics (buffers)
        R.load_state(opt, ckpt["optimizer"], "optimizer state")
        R.load_state(ret_norm, ckpt["reward_norm"], "reward statistics")
        R.set_rng_state(ckpt["rng"])
        update, global_step, best, recent, train_s0 = (ckpt[k] for k in ("update", "step", "best_return", "recent",
                                                                          "train_s"))
        recent = list(recent)
    envs = gym.vector.SyncVectorEnv([lambda: make_env(cfg.env) for _ in range(N)],
                                    autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    log = R.Logger(out, cfg, "papers-ppo", cfg.wandb, cfg.resume)
    low, high = (envs.single_action_space.low, envs.single_action_space.high) if continuous else (None, None)
    model_config = dict(obs_dim=obs_dim, act_dim=act_dim, continuous=continuous, hidden=cfg.hidden,
                        shared=cfg.shared, normalize_obs=cfg.normalize_obs)

    def snapshot():
        """The run at an update boundary: what ckpt.pt holds (a Ctrl-C mid-update saves the last boundary). Tensors
        are cloned, not deep-copied: ~1 ms per update here, against ~5 ms for copy.deepcopy."""
        return clone({
            "kind": "ppo", "env": cfg.env, "model": agent.state_dict(), "model_config": model_config,
            "config": asdict(cfg), "update": update, "step": global_step, "optimizer": opt.state_dict(),
            "reward_norm": ret_norm.state_dict(), "rng": R.rng_state(), "best_return": best, "recent": recent[-20:],
            "train_s": train_s0 + time.time() - t_start})

    buf = {k: np.zeros((T, N) + s, np.float32) for k, s in [("obs", (obs_dim,)), ("next_obs", (obs_dim,)),
           ("logp", ()), ("values", ()), ("rewards", ()), ("term", ()), ("trunc", ()),
           ("actions", (act_dim,) if continuous else ())]}  # filled as numpy, turned into tensors once per rollout
    params = list(agent.parameters())
    # a resumed run starts fresh episodes: gymnasium envs have no general state to save
    obs, _ = envs.reset(seed=cfg.seed + 1000 * update)
    envs.action_space.seed(cfg.seed)
    t_start, start_update = time.time(), update
    ep_ret, ep_len = np.zeros(N), np.zeros(N, dtype=np.int64)  # running episode return (unnormalised) and length
    saved = snapshot()
    print(f"PPO on {cfg.env}: {num_updates} updates of {N} envs x {T} steps, {cfg.update_epochs} epochs, "
          f"minibatch {cfg.minibatch_size}" + (f" (resumed at update {update})" if cfg.resume else ""))
    R.sigterm_as_interrupt()
    try:
        while update < num_updates:
            frac = 1.0 - update / num_updates
            lr, clip = cfg.lr * (frac if cfg.anneal_lr else 1.0), cfg.clip_coef * (frac if cfg.anneal_clip else 1.0)
            opt.param_groups[0]["lr"] = lr
            # ---- rollout: T steps in N envs with pi_theta_old (obs statistics frozen until the update is done)
            agent.eval()
            for t in range(T):
                with torch.inference_mode():
                    action, logp, _, value = agent.act(torch.as_tensor(obs, dtype=torch.float32))
                a = action.numpy()
                next_obs, r, term, trunc, info = envs.step(np.clip(a, low, high) if continuous else a)
                real_next = next_obs.copy()  # with SAME_STEP autoreset a finished env already shows its reset obs
                ep_ret, ep_len = ep_ret + r, ep_len + 1
                for i in np.flatnonzero(term | trunc):
                    real_next[i] = info["final_obs"][i]
                    recent.append(float(ep_ret[i]))
                    log.log({"step": global_step + (t + 1) * N, "episodic_return": float(ep_ret[i]),
                             "episodic_length": int(ep_len[i])}, step=global_step + (t + 1) * N)
                    ep_ret[i], ep_len[i] = 0.0, 0
                if cfg.normalize_reward:
                    ret_acc = ret_acc * cfg.gamma + r
                    ret_norm.update(ret_acc)
                    ret_acc[term | trunc] = 0.0
                    r = r / np.sqrt(ret_norm.var.item() + 1e-8)
                for k, v in (("obs", obs), ("actions", a), ("logp", logp), ("values", value), ("rewards", r),
                             ("term", term), ("trunc", trunc), ("next_obs", real_next)):
                    buf[k][t] = v
                obs = next_obs
            global_step += batch
            roll = {k: torch.from_numpy(v) for k, v in buf.items()}
            with torch.no_grad():
                next_values = agent.value(roll["next_obs"].view(T * N, -1)).view(T, N)
                advantages, returns = compute_gae(roll["rewards"], roll["values"], next_values, roll["term"],
                                                  roll["trunc"], cfg.gamma, cfg.gae_lambda)
            # ---- optimise the surrogate for K epochs over minibatches
            agent.train()
            b = {k: v.reshape((T * N,) + v.shape[2:]) for k, v in roll.items()}
            b_adv, b_ret = advantages.reshape(-1), returns.reshape(-1)
            stats = []
            for epoch in range(cfg.update_epochs):
                perm = torch.randperm(batch)
                for start in range(0, batch, cfg.minibatch_size):
                    mb = perm[start:start + cfg.minibatch_size]
                    _, new_logp, ent, new_v = agent.act(b["obs"][mb], b["actions"][mb])
                    adv = b_adv[mb]
                    if cfg.norm_adv and len(mb) > 1:
                        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
                    L = ppo_loss(new_logp, b["logp"][mb], adv, new_v, b["values"][mb], b_ret[mb], ent, clip,
                                 cfg.vf_clip, cfg.vf_coef, cfg.ent_coef)
                    if epoch == 0 and start == 0:  # before any step pi_theta = pi_theta_old: the ratio is 1
                        first_ratio_dev = (new_logp - b["logp"][mb]).exp().sub(1).abs().max().item()
                    opt.zero_grad(set_to_none=True)
                    L["loss"].backward()
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                    opt.step()
                    stats.append(torch.stack([v.detach() for v in L.values()]))
                if cfg.target_kl is not None and L["approx_kl"].item() > cfg.target_kl:
                    break
            if cfg.normalize_obs:  # fold this rollout's observations in for the next rollout
                agent.obs_norm.update(b["obs"])
            update += 1
            mean = dict(zip(L.keys(), torch.stack(stats).mean(0).tolist()))
            sps = batch * (update - start_update) / (time.time() - t_start)
            mean_ret = float(np.mean(recent[-20:])) if recent else float("nan")
            log.log({"step": global_step, "update": update, "lr": lr, "clip_coef": clip, "steps_per_s": sps,
                     "mean_return_20": mean_ret, "losses/first_ratio_dev": first_ratio_dev,
                     **{f"losses/{k}": v for k, v in mean.items()}}, step=global_step)
            if update % max(1, num_updates // 20) == 0 or update == num_updates:
                print(f"step {global_step:>7d} | return(20) {mean_ret:8.2f} | pg {mean['pg_loss']:+.4f} | v "
                      f"{mean['v_loss']:.4f} | ent {mean['entropy']:.3f} | kl {mean['approx_kl']:.4f} | clipfrac "
                      f"{mean['clipfrac']:.3f} | {sps:,.0f} steps/s")
            improved = len(recent) >= 5 and mean_ret > best
            best = max(best, mean_ret) if improved else best
            saved = snapshot()
            if improved:
                R.save_checkpoint(saved, out / "best.pt")
            if update % cfg.save_interval == 0:
                R.save_checkpoint(saved, out / "ckpt.pt")
    except KeyboardInterrupt:
        print(f"interrupted: saving {out / 'ckpt.pt'} at update {saved['update']} (continue with --resume)")
    envs.close()
    R.save_checkpoint(saved, out / "ckpt.pt")
    train_s, global_step = saved["train_s"], saved["step"]
    agent.load_state_dict(saved["model"])  # the evaluated policy is the saved one
    agent.eval()
    rets, lens, _ = evaluate(agent, cfg.env, cfg.eval_episodes, seed=10_000 + cfg.seed)
    summary = {"env": cfg.env, "eval_return_mean": float(np.mean(rets)), "eval_return_std": float(np.std(rets)),
               "eval_episodes": len(rets), "eval_length_mean": float(np.mean(lens)), "env_steps": global_step,
               "updates": saved["update"], "wall_s": round(train_s0 + time.time() - t_start, 2),
               "train_s": round(train_s, 2), "steps_per_s": round(global_step / max(train_s, 1e-9), 1),
               "seed": cfg.seed}
    R.write_json(out / "summary.json", summary)
    log.log({"step": global_step, "eval_return_mean": summary["eval_return_mean"]}, step=global_step)
    log.close()
    print(f"done: eval return {summary['eval_return_mean']:.1f} +- {summary['eval_return_std']:.1f} over "
          f"{len(rets)} deterministic episodes after {global_step} steps; train {train_s:.1f} s, "
          f"{summary['steps_per_s']:,.0f} steps/s -> {out}")
    return summary


if __name__ == "__main__":
    main(R.parse(Config, PRESETS))
