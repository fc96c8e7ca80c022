"""Proximal Policy Optimization: actor-critic networks, GAE and the clipped surrogate loss.

Schulman et al. 2017, "Proximal Policy Optimization Algorithms" (arXiv 1707.06347); GAE from Schulman et al. 2016,
"High-Dimensional Continuous Control Using Generalized Advantage Estimation" (arXiv 1506.02438). Equation numbers
refer to the PPO paper.
"""
import math

import numpy as np
import torch
import torch.nn as nn


def layer_init(layer, std=np.sqrt(2), bias=0.0):
    """Orthogonal weights, constant bias (the implementation detail of OpenAI's baselines)."""
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias)
    return layer


def mlp(n_in, n_out, hidden, out_std):
    return nn.Sequential(layer_init(nn.Linear(n_in, hidden)), nn.Tanh(), layer_init(nn.Linear(hidden, hidden)),
                         nn.Tanh(), layer_init(nn.Linear(hidden, n_out), std=out_std))


class RunningNorm(nn.Module):
    """Running mean and variance (parallel Welford update); buffers, so the statistics live in the checkpoint and
    are used again at evaluation."""

    def __init__(self, shape, clip=10.0):
        super().__init__()
        self.clip = clip
        self.register_buffer("mean", torch.zeros(shape, dtype=torch.float64))
        self.register_buffer("var", torch.ones(shape, dtype=torch.float64))
        self.register_buffer("count", torch.tensor(1e-4, dtype=torch.float64))

    def update(self, x):
        x = torch.as_tensor(x, dtype=torch.float64).reshape(-1, *self.mean.shape)
        b_mean, b_var, b = x.mean(0), x.var(0, unbiased=False), x.shape[0]
        delta, tot = b_mean - self.mean, self.count + b
        self.mean += delta * b / tot
        self.var.copy_((self.var * self.count + b_var * b + delta ** 2 * self.count * b / tot) / tot)
        self.count.copy_(tot)

    def forward(self, x):
        return ((x - self.mean.float()) / torch.sqrt(self.var.float() + 1e-8)).clamp(-self.clip, self.clip)


class ActorCritic(nn.Module):
    """pi_theta(a|s) and V(s): Categorical logits for Discrete actions, a diagonal Gaussian with a state-independent
    log-std for Box actions. `shared` puts both heads on one trunk (Eq. 9 then trains it with c1 * L^VF)."""

    def __init__(self, obs_dim, act_dim, continuous, hidden=64, shared=False, normalize_obs=False):
        super().__init__()
        self.continuous, self.shared = continuous, shared
        self.obs_norm = RunningNorm((obs_dim,)) if normalize_obs else None
        if shared:
            self.trunk = nn.Sequential(layer_init(nn.Linear(obs_dim, hidden)), nn.Tanh(),
                                       layer_init(nn.Linear(hidden, hidden)), nn.Tanh())
            self.actor_head = layer_init(nn.Linear(hidden, act_dim), std=0.01)
            self.critic_head = layer_init(nn.Linear(hidden, 1), std=1.0)
        else:
            self.actor = mlp(obs_dim, act_dim, hidden, out_std=0.01)
            self.critic = mlp(obs_dim, 1, hidden, out_std=1.0)
        if continuous:
            self.log_std = nn.Parameter(torch.zeros(act_dim))

    def _features(self, obs):
        return self.obs_norm(obs) if self.obs_norm is not None else obs

    def value(self, obs):
        x = self._features(obs)
        return (self.critic_head(self.trunk(x)) if self.shared else self.critic(x)).squeeze(-1)

    def policy_params(self, obs):
        """Categorical logits, or the Gaussian mean (the log-std is a free parameter)."""
        x = self._features(obs)
        return self.actor_head(self.trunk(x)) if self.shared else self.actor(x)

    def act(self, obs, action=None, deterministic=False):
        """Returns (action, log pi(a|s), entropy, V(s)), written out rather than through torch.distributions
        (whose object overhead dominates at these sizes; the tests compare the two).
        Gaussian log-probs are of the unclipped sample."""
        out = self.policy_params(obs)
        if self.continuous:
            mean, log_std = out, self.log_std.expand_as(out)
            if action is None:
                action = mean if deterministic else mean + log_std.exp() * torch.randn_like(mean)
            z = (action - mean) / log_std.exp()
            logp = (-0.5 * z ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)  # independent dimensions
            ent = (0.5 + 0.5 * math.log(2 * math.pi) + log_std).sum(-1)
        else:
            log_p = out.log_softmax(-1)
            if action is None:
                # inverse-CDF sampling: the first action whose cumulative probability exceeds u ~ U[0, 1)
                u = torch.rand(log_p.shape[:-1] + (1,), device=log_p.device)
                action = log_p.argmax(-1) if deterministic else (log_p.exp().cumsum(-1) <= u).sum(-1).clamp(
                    max=log_p.shape[-1] - 1)
            logp = log_p.gather(-1, action.long().unsqueeze(-1)).squeeze(-1)
            ent = -(log_p.exp() * log_p).sum(-1)
        return action, logp, ent, self.value(obs)


def compute_gae(rewards, values, next_values, terminated, truncated, gamma=0.99, lam=0.95):
    """GAE-lambda, PPO Eqs. (11)-(12), over a rollout of shape (T, N).

    delta_t = r_t + gamma * (1 - terminated_t) * V(s_{t+1}) - V(s_t)
    A_t     = delta_t + gamma * lam * (1 - done_t) * A_{t+1},   done_t = terminated_t or truncated_t

    next_values[t] is V of the real next state: on a time-limit truncation that is the final observation (the
    episode could have gone on, so we bootstrap from it); on a termination it is ignored (no future rewards).
    Returns (advantages, returns = advantages + values)."""
    T = rewards.shape[0]
    terminated, truncated = terminated.float(), truncated.float()
    not_done = 1.0 - torch.maximum(terminated, truncated)
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[0])
    for t in reversed(range(T)):
        delta = rewards[t] + gamma * (1.0 - terminated[t]) * next_values[t] - values[t]
        last = delta + gamma * lam * not_done[t] * last
        advantages[t] = last
    return advantages, advantages + values


def ppo_loss(new_logprob, old_logprob, advantages, new_values, old_values, returns, entropy, clip_coef=0.2,
             vf_clip=None, vf_coef=0.5, ent_coef=0.0):
    """Eq. (9): maximise L^CLIP - c1 L^VF + c2 S, i.e. minimise pg_loss + vf_coef * v_loss - ent_coef * entropy.

    L^CLIP (Eq. 7) = E[min(r_t A_t, clip(r_t, 1 - eps, 1 + eps) A_t)],  r_t = pi_theta(a|s) / pi_theta_old(a|s).
    With vf_clip the value loss is clipped around the old values as in OpenAI's baselines."""
    log_ratio = new_logprob - old_logprob
    ratio = log_ratio.exp()
    pg_loss = -torch.min(ratio * advantages, ratio.clamp(1 - clip_coef, 1 + clip_coef) * advantages).mean()
    if vf_clip is None:
        v_loss = 0.5 * ((new_values - returns) ** 2).mean()
    else:
        v_clipped = old_values + (new_values - old_values).clamp(-vf_clip, vf_clip)
        v_loss = 0.5 * torch.max((new_values - returns) ** 2, (v_clipped - returns) ** 2).mean()
    ent = entropy.mean()
    with torch.no_grad():  # diagnostics: KL(old || new) estimator (Schulman 2020, "k3") and clipped fraction
        approx_kl = ((ratio - 1) - log_ratio).mean()
        clipfrac = ((ratio - 1).abs() > clip_coef).float().mean()
    return {"loss": pg_loss + vf_coef * v_loss - ent_coef * ent, "pg_loss": pg_loss, "v_loss": v_loss,
            "entropy": ent, "approx_kl": approx_kl, "clipfrac": clipfrac}
