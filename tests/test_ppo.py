import json
import subprocess
import sys
import os

import numpy as np
import pytest
import torch
from torch.distributions import Normal

from ppo import sample, train
from ppo.model import ActorCritic, RunningNorm, compute_gae, ppo_loss
from utils import run as R

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def gae_by_hand(r, v, nv, term, trunc, gamma, lam):
    """Straight from the definition: A_t = sum_l (gamma lam)^l delta_{t+l}, stopping after the episode's end."""
    T = len(r)
    delta = [r[t] + gamma * (1 - term[t]) * nv[t] - v[t] for t in range(T)]
    adv = []
    for t in range(T):
        a, w = 0.0, 1.0
        for k in range(t, T):
            a += w * delta[k]
            if term[k] or trunc[k]:
                break
            w *= gamma * lam
        adv.append(a)
    return adv


CASE = dict(r=[1.0, 0.5, -1.0, 2.0, 0.0, 1.0], v=[0.3, -0.2, 0.5, 1.0, 0.1, 0.4],
            nv=[-0.2, 0.5, 7.0, 0.1, 0.4, 0.9],  # nv[2] = V(final obs) of a truncated episode; nv[4] is a terminal's
            term=[0, 0, 0, 0, 1, 0], trunc=[0, 0, 1, 0, 0, 0])


def run_gae(gamma, lam):
    c = {k: torch.tensor(v, dtype=torch.float64)[:, None] for k, v in CASE.items()}
    return compute_gae(c["r"], c["v"], c["nv"], c["term"], c["trunc"], gamma, lam)


@pytest.mark.parametrize("gamma,lam", [(0.99, 0.95), (0.9, 0.0), (0.9, 1.0)])
def test_gae_matches_hand_computation(gamma, lam):
    adv, ret = run_gae(gamma, lam)
    assert np.allclose(adv[:, 0].numpy(), gae_by_hand(**CASE, gamma=gamma, lam=lam))
    assert torch.allclose(ret, adv + torch.tensor(CASE["v"], dtype=torch.float64)[:, None])


def test_gae_lambda_0_is_td_error_and_1_is_discounted_return():
    g = 0.9
    adv0, _ = run_gae(g, 0.0)
    td = [CASE["r"][t] + g * (1 - CASE["term"][t]) * CASE["nv"][t] - CASE["v"][t] for t in range(6)]
    assert np.allclose(adv0[:, 0].numpy(), td)
    adv1, _ = run_gae(g, 1.0)
    r, v = CASE["r"], CASE["v"]
    # episode 1 (t=0..2) is truncated: bootstrap from V(final obs) = 7.0; episode 2 (t=3,4) terminates; t=5 is cut
    # by the rollout end and bootstraps from nv[5]
    G = [r[0] + g * r[1] + g * g * r[2] + g ** 3 * 7.0, r[1] + g * r[2] + g * g * 7.0, r[2] + g * 7.0,
         r[3] + g * r[4], r[4], r[5] + g * 0.9]
    assert np.allclose(adv1[:, 0].numpy(), np.array(G) - np.array(v))


def test_clipped_objective_has_zero_gradient_on_clipped_side():
    old = torch.zeros(4)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    # ratios 1.5 (A>0, clipped), 0.9 (A>0, inside), 0.5 (A<0, clipped), 1.1 (A<0, inside)
    new = torch.log(torch.tensor([1.5, 0.9, 0.5, 1.1])).requires_grad_()
    zeros = torch.zeros(4)
    L = ppo_loss(new, old, adv, zeros, zeros, zeros, zeros, clip_coef=0.2)
    L["pg_loss"].backward()
    g = new.grad
    assert g[0] == 0 and g[2] == 0 and g[1] != 0 and g[3] != 0
    assert abs(L["clipfrac"].item() - 0.5) < 1e-6


def test_gaussian_logprob_and_entropy_equal_torch_distributions():
    torch.manual_seed(0)
    agent = ActorCritic(3, 2, continuous=True)
    with torch.no_grad():
        agent.log_std.copy_(torch.tensor([-0.5, 0.3]))
    obs = torch.randn(5, 3)
    a, logp, ent, _ = agent.act(obs)
    mu = agent.actor(obs)
    ref = Normal(mu, torch.tensor([-0.5, 0.3]).exp())
    assert torch.allclose(logp, ref.log_prob(a).sum(-1), atol=1e-6)
    assert torch.allclose(ent, ref.entropy().sum(-1), atol=1e-6)
    big = torch.full((5, 2), 10.0)  # log-prob of an action outside the bounds is the unclipped Gaussian's
    assert torch.allclose(agent.act(obs, big)[1], ref.log_prob(big).sum(-1), atol=1e-5)


def test_running_norm_matches_numpy():
    rn = RunningNorm((3,))
    x = np.random.default_rng(0).normal(2.0, 3.0, size=(1000, 3))
    for chunk in np.split(x, 10):
        rn.update(chunk)
    assert np.allclose(rn.mean.numpy(), x.mean(0), atol=1e-3) and np.allclose(rn.var.numpy(), x.var(0), rtol=1e-3)


def test_smoke_train_then_evaluate_gif(tmp_path):
    out = tmp_path / "run"
    s = train.main(train.Config(out_dir=str(out), total_timesteps=2048, num_envs=4, num_steps=64, update_epochs=2,
                                eval_episodes=2))
    for f in ["ckpt.pt", "metrics.jsonl", "summary.json"]:
        assert (out / f).exists()
    assert {"eval_return_mean", "eval_return_std", "env_steps", "wall_s", "steps_per_s"} <= set(s)
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert any("losses/approx_kl" in r for r in rows) and any("episodic_return" in r for r in rows)
    r = subprocess.run([sys.executable, "ppo/sample.py", "--out-dir", str(out), "--episodes", "2"], cwd=REPO,
                       capture_output=True, text=True, env={**os.environ, "SDL_VIDEODRIVER": "dummy"})
    assert r.returncode == 0, r.stderr
    assert (out / "episode.gif").stat().st_size > 1000 and len(json.load(open(out / "eval.json"))["returns"]) == 2
    r = subprocess.run([sys.executable, "ppo/sample.py", "--out-dir", str(out), "--env", "Acrobot-v1"], cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "CartPole-v1" in r.stderr and "Traceback" not in r.stderr


def test_continuous_env_runs(tmp_path):
    s = train.main(R.preset(train.PRESETS, "pendulum", out_dir=str(tmp_path), total_timesteps=512, num_envs=2,
                            num_steps=256, update_epochs=1, eval_episodes=1))
    assert s["env"] == "Pendulum-v1" and np.isfinite(s["eval_return_mean"])


def test_bad_input_exits_2(tmp_path):
    with pytest.raises(SystemExit) as e:
        train.main(train.Config(env="NoSuchEnv-v9", out_dir=str(tmp_path)))
    assert e.value.code == 2
    (tmp_path / "ckpt.pt").write_bytes(b"garbage")
    with pytest.raises(SystemExit) as e:
        sample.main(sample.Config(out_dir=str(tmp_path)))
    assert e.value.code == 2


@pytest.mark.slow
def test_cartpole_learns_within_30k_steps(tmp_path):
    train.main(train.Config(out_dir=str(tmp_path), total_timesteps=30_000, eval_episodes=5, seed=1))
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    best = max(r["mean_return_20"] for r in rows if "mean_return_20" in r and r["mean_return_20"] == r["mean_return_20"])
    assert best > 150, best


def test_categorical_sampling_logprob_entropy_match_torch_distributions():
    from torch.distributions import Categorical
    torch.manual_seed(0)
    agent = ActorCritic(3, 4, continuous=False)
    with torch.no_grad():
        agent.actor[-1].weight.normal_(0, 1.0)
    obs = torch.randn(1, 3).expand(20000, 3)
    a, logp, ent, _ = agent.act(obs)
    ref = Categorical(logits=agent.actor(obs[:1]))
    freq = torch.bincount(a, minlength=4).float() / len(a)
    assert torch.allclose(freq, ref.probs[0], atol=0.015)
    assert torch.allclose(logp[:8], ref.log_prob(a[:8]), atol=1e-6)
    assert torch.allclose(ent[0], ref.entropy()[0], atol=1e-6)


def tiny(tmp_path, **kw):
    """A run of a few updates on CartPole in a second or two."""
    base = dict(out_dir=str(tmp_path), total_timesteps=512, num_envs=4, num_steps=32, minibatch_size=64,
                update_epochs=2, eval_episodes=1)
    return R.preset(train.PRESETS, "default", **{**base, **kw})


def test_ratio_is_one_on_the_first_minibatch_with_obs_normalization(tmp_path):
    """pi_theta / pi_theta_old = 1 before the first optimiser step of every update: the rollout's stored log-probs
    and the update's must see the same observation statistics (they did not when obs_norm moved every step)."""
    train.main(tiny(tmp_path, normalize_obs=True, normalize_reward=True))
    devs = [r["losses/first_ratio_dev"] for r in R.read_jsonl(tmp_path / "metrics.jsonl") if "update" in r]
    assert len(devs) == 4 and max(devs) < 1e-5, devs


def same_state(a, b):
    """Checkpoints a and b hold the same run state: weights, obs statistics, optimizer, reward statistics, RNG."""
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])
    assert all(torch.equal(a["reward_norm"][k], b["reward_norm"][k]) for k in a["reward_norm"])
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"]) and torch.equal(a["rng"]["numpy"][1], b["rng"]["numpy"][1])
    assert [a[k] for k in ("update", "step", "best_return", "recent")] == [b[k] for k in ("update", "step",
                                                                                          "best_return", "recent")]


def test_sigterm_saves_the_last_update_and_resume_restores_everything(tmp_path, monkeypatch, capsys):
    """SIGTERM mid-update = Ctrl-C: ckpt.pt holds the run at the last finished update, bit-identical to a run that
    stopped there; --resume restores weights, obs/reward statistics, optimizer, RNG and counters, and refuses
    other settings."""
    import signal
    kw = dict(normalize_obs=True, normalize_reward=True, anneal_lr=False, anneal_clip=False, save_interval=1)
    train.main(tiny(tmp_path / "straight", total_timesteps=256, **kw))  # 2 updates of 128 steps
    straight = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)
    assert straight["model"]["obs_norm.count"] > 200  # the statistics are in the checkpoint
    calls, loss = [0], train.ppo_loss

    def ppo_loss_then_sigterm(*a, **k):
        calls[0] += 1
        if calls[0] == 9:  # 4 minibatches per update: the first one of update 3
            os.kill(os.getpid(), signal.SIGTERM)
        return loss(*a, **k)
    monkeypatch.setattr(train, "ppo_loss", ppo_loss_then_sigterm)
    run = tmp_path / "killed"
    s = train.main(tiny(run, total_timesteps=512, **kw))
    monkeypatch.setattr(train, "ppo_loss", loss)
    killed = torch.load(run / "ckpt.pt", weights_only=True)
    assert s["updates"] == 2 and "interrupted" in capsys.readouterr().out
    same_state(straight, killed)
    # a resume that has nothing left to do saves back exactly what it loaded
    train.main(tiny(tmp_path / "straight", total_timesteps=256, resume=True, **kw))
    same_state(straight, torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True))
    s = train.main(tiny(run, total_timesteps=512, resume=True, **kw))  # continues with updates 3 and 4
    assert s["updates"] == 4 and s["env_steps"] == 512
    assert [r["update"] for r in R.read_jsonl(run / "metrics.jsonl") if "update" in r] == [1, 2, 3, 4]
    with pytest.raises(SystemExit) as e:
        train.main(tiny(run, total_timesteps=512, resume=True, **{**kw, "normalize_obs": False}))
    assert e.value.code == 2 and "--normalize-obs" in capsys.readouterr().err


def test_ckpt_is_written_every_save_interval_updates(tmp_path, monkeypatch):
    """Item 3: a run killed by anything but a signal (OOM, power) keeps its last periodic ckpt.pt: with
    --save-interval 2, ckpt.pt is written after updates 2 and 4 of 5, then once more at the end (update 5)."""
    written, save = [], R.save_checkpoint

    def spy(state, path):
        if path.name == "ckpt.pt":
            written.append(state["update"])
        return save(state, path)
    monkeypatch.setattr(train.R, "save_checkpoint", spy)
    train.main(tiny(tmp_path, total_timesteps=640, save_interval=2))  # 5 updates of 4 x 32 steps
    assert written == [2, 4, 5]


def test_non_cpu_devices_and_torchrun_are_refused_with_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(R, "check_device", lambda name: None)  # as if this machine had a GPU
    for dev in ("cuda", "mps"):
        with pytest.raises(SystemExit) as e:
            R.parse(train.Config, train.PRESETS, args=["--device", dev])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.startswith("error:") and "CPU only" in err and len(err.splitlines()) == 1
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as e:
        train.main(tiny(tmp_path))
    assert e.value.code == 2 and "torchrun" in capsys.readouterr().err


def test_paper_preset_without_mujoco_says_what_to_install(tmp_path, capsys):
    import importlib.util
    if importlib.util.find_spec("mujoco") is not None:
        pytest.skip("mujoco is installed here")
    cfg = R.parse(train.Config, train.PRESETS, args=["--preset", "paper", "--out-dir", str(tmp_path / "o")])
    with pytest.raises(SystemExit) as e:
        train.main(cfg)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and 'pip install "gymnasium[mujoco]"' in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists()  # refused before anything ran


@pytest.mark.parametrize("script,args", [
    ("train", ["--threads", "0"]), ("train", ["--num-steps", "1000000"]), ("train", ["--hidden", "100000"]),
    ("train", ["--max-grad-norm", "0"]), ("train", ["--env", "NoSuchEnv-v9"]),
    ("sample", ["--episodes", "0"]), ("sample", ["--gif-scale", "0"]), ("sample", ["--ckpt", "/nonexistent/c.pt"]),
    ("sample", ["--render", "human"]), ("sample", ["--env", "NoSuchEnv-v9"]),
    ("bench", ["--seeds", "-1"]), ("bench", ["--seeds", "1", "1"]), ("bench", ["--total-timesteps", "0"]),
    ("bench", ["--eval-episodes", "0"]),
])
def test_every_script_refuses_bad_values_at_parse_time(script, args, tmp_path, monkeypatch, capsys):
    from ppo import bench
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    mod = {"train": train, "sample": sample, "bench": bench}[script]
    (tmp_path / "ckpt.pt").write_bytes(b"")  # sample's default checkpoint exists (it is read only later)
    with pytest.raises(SystemExit) as e:
        R.parse(mod.Config, getattr(mod, "PRESETS", None), args=["--out-dir", str(tmp_path)] + args)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error:") and len(err.splitlines()) == 1, err
