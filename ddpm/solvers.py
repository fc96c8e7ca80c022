"""DPM-Solver++ (Lu, Zhou, Bao, Chen, Li, Zhu 2022, arXiv 2211.01095) for the discrete-time DDPM of ddpm/model.py:
the multistep second-order solver in the data-prediction form, DPM-Solver++(2M) (Algorithm 2), on the paper's
logSNR-uniform time steps. It reads the schedule from the Diffusion's alpha_bar buffer; there is no second schedule.

Notation: alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t), lambda_t = log(alpha_t / sigma_t)
(half the log-SNR); x_theta(x_t, t) is the model's x0 prediction (Diffusion.denoise, any parameterization).
"""
import math

import numpy as np
import torch


def log_snr_half(alpha_bar):
    """lambda_t = log(alpha_t / sigma_t) = 0.5 log(alpha_bar_t / (1 - alpha_bar_t)), in float64; decreasing in t."""
    ab = alpha_bar.double().cpu()
    return 0.5 * (ab.log() - (-ab).log1p())


def logsnr_timesteps(alpha_bar, steps):
    """The time steps the paper uses for discrete-time DDPMs ("logSNR" spacing): `steps` points
    uniform in lambda between lambda_{T-1} and lambda_0, each mapped back to the discrete t whose lambda is nearest by
    linear interpolation of t over lambda, then rounded. Returned increasing, tau_0 = 0 and tau_{S-1} = T - 1 like
    the DDIM grid; where rounding collides (lambda moves ~0.4 per step near t = 0), neighbours are pushed apart so
    that the grid stays strictly increasing inside [0, T - 1] (S = T gives every t). One step is [T - 1]."""
    T = len(alpha_bar)
    if not 1 <= steps <= T:
        raise ValueError(f"DPM-Solver++ steps must be in [1, T = {T}], got {steps}")
    if steps == 1:
        return torch.tensor([T - 1])
    lam = log_snr_half(alpha_bar).numpy()
    targets = np.linspace(lam[0], lam[-1], steps)  # lambda_0 (largest) down to lambda_{T-1}
    t = np.interp(-targets, -lam, np.arange(T, dtype=np.float64))  # np.interp wants increasing x: -lambda is
    tau = np.rint(t).astype(np.int64).tolist()
    tau[0], tau[-1] = 0, T - 1
    for i in range(1, steps):  # forward: strictly increasing, tau_i >= i
        tau[i] = max(tau[i], tau[i - 1] + 1)
    tau[-1] = T - 1
    for i in range(steps - 2, -1, -1):  # backward: tau_i <= T - 1 - (S - 1 - i), still >= i
        tau[i] = min(tau[i], tau[i + 1] - 1)
    return torch.tensor(tau)


@torch.no_grad()
def dpm_solver_pp_step(diffusion, x, s, t, prev=None, order=2):
    """One step of DPM-Solver++(2M) from time index s to t < s (t = -1: the data, alpha = 1, sigma = 0).

    First order (DPM-Solver++1, which the paper notes is DDIM's eta = 0 update, written in x0):
        x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) x_theta(x_s, s),   h = lambda_t - lambda_s.
    Second order (Algorithm 2), with the previous point u > s (prev = (x_theta(x_u, u), u)), r = h_prev / h:
        D = (1 + 1 / (2 r)) x_theta(x_s, s) - 1 / (2 r) x_theta(x_u, u),
        x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) D.
    The first step has no previous point and is first order; the last (to t = -1, h = inf) is first order too, the
    paper's `lower_order_final` (there x_t = x_theta(x_s, s): alpha_t = 1 and sigma_t = 0).
    Returns (x_t, (x_theta(x_s, s), s)), the second part being `prev` for the next step."""
    ts = torch.full((x.shape[0],), s, device=x.device, dtype=torch.long)
    x0, _ = diffusion.denoise(x, ts)
    if t < 0:
        return x0, (x0, s)
    ab = diffusion.alpha_bar
    ab_s, ab_t = ab[s].item(), ab[t].item()  # python floats: the coefficients in float64
    sigma_s, sigma_t, alpha_t = math.sqrt(1 - ab_s), math.sqrt(1 - ab_t), math.sqrt(ab_t)
    lam_s, lam_t = 0.5 * math.log(ab_s / (1 - ab_s)), 0.5 * math.log(ab_t / (1 - ab_t))
    h = lam_t - lam_s
    D = x0
    if order == 2 and prev is not None:
        x0_u, u = prev
        ab_u = ab[u].item()
        r = (lam_s - 0.5 * math.log(ab_u / (1 - ab_u))) / h  # h_prev / h
        D = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_u
    return sigma_t / sigma_s * x - alpha_t * math.expm1(-h) * D, (x0, s)
