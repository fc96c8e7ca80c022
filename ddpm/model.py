"""Denoising Diffusion Probabilistic Models (Ho, Jain, Abbeel 2020, arXiv 2006.11239), with DDIM sampling
(Song, Meng, Ermon 2021, arXiv 2010.02502) and DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095; ddpm/solvers.py).
Equation numbers refer to the DDPM paper unless a paper is named.

Options beside the paper's: v-prediction (Salimans & Ho 2022, arXiv 2202.00512) and min-SNR-gamma loss weights
(Hang et al. 2023, arXiv 2303.09556). The algorithm is separate from the network: Diffusion(eps_model=UNet(...));
the network's output is noise eps or velocity v as `parameterization` says, and `predict_x0_eps` is the one place
that turns it into (x0, eps) for every sampler and the bound.
"""
import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ddpm.solvers import dpm_solver_pp_step, logsnr_timesteps


def linear_betas(T=1000, beta_1=1e-4, beta_T=0.02):
    """Section 4: beta_t increasing linearly from 1e-4 to 0.02."""
    return torch.linspace(beta_1, beta_T, T, dtype=torch.float64)


def cosine_betas(T=1000, s=0.008):
    """Nichol & Dhariwal 2021 Eq. (17): alpha_bar(t) = cos^2((t/T + s) / (1 + s) * pi / 2), betas clipped at 0.999."""
    steps = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=0.999)


class Diffusion(nn.Module):
    """Timesteps are 0-indexed: index t here is the paper's t + 1, so x_0 is data and index T - 1 is x_T."""

    def __init__(self, eps_model, T=1000, schedule="linear", sigma="beta", clip_denoised=True, parameterization="eps",
                 loss_weight="none", min_snr_gamma=5.0):
        super().__init__()
        assert schedule in ("linear", "cosine") and sigma in ("beta", "beta_tilde")
        assert parameterization in ("eps", "v") and loss_weight in ("none", "min-snr") and min_snr_gamma > 0
        self.eps_model, self.T, self.sigma, self.clip_denoised = eps_model, T, sigma, clip_denoised
        self.parameterization, self.loss_weight, self.min_snr_gamma = parameterization, loss_weight, min_snr_gamma
        betas = linear_betas(T) if schedule == "linear" else cosine_betas(T)
        alpha_bar = torch.cumprod(1 - betas, dim=0)
        alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
        beta_tilde = betas * (1 - alpha_bar_prev) / (1 - alpha_bar)  # Eq. (7)
        for name, v in dict(betas=betas, alphas=1 - betas, alpha_bar=alpha_bar, alpha_bar_prev=alpha_bar_prev,
                            beta_tilde=beta_tilde,
                            # Eq. (7): mu_tilde = coef0 * x_0 + coef_t * x_t
                            coef0=alpha_bar_prev.sqrt() * betas / (1 - alpha_bar),
                            coef_t=(1 - betas).sqrt() * (1 - alpha_bar_prev) / (1 - alpha_bar)).items():
            self.register_buffer(name, v.float())

    @staticmethod
    def _at(buf, t, x):
        return buf[t].view(-1, *([1] * (x.dim() - 1)))  # broadcast (B,) over the image dims

    def q_sample(self, x0, t, eps):
        """Eq. (4): x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps."""
        ab = self._at(self.alpha_bar, t, x0)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * eps

    def loss(self, x0, t=None, eps=None):
        """Simplified objective, Eq. (14) / Algorithm 1: E_{t, x_0, eps} || eps - eps_theta(x_t, t) ||^2; with
        parameterization "v" the target is v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0 (Salimans & Ho 2022);
        with loss_weight "min-snr" each image's squared error is weighted by `snr_weight(t)`. t and eps are drawn
        here unless given (a test pins them)."""
        t = torch.randint(0, self.T, (x0.shape[0],), device=x0.device) if t is None else t
        eps = torch.randn_like(x0) if eps is None else eps
        xt = self.q_sample(x0, t, eps)
        if self.parameterization == "eps":
            target = eps
        else:
            ab = self._at(self.alpha_bar, t, x0)
            target = ab.sqrt() * eps - (1 - ab).sqrt() * x0
        out = self.eps_model(xt, t)
        if self.loss_weight == "none":
            return F.mse_loss(out, target)
        per_image = (out.float() - target).pow(2).flatten(1).mean(1)  # (B,)
        return (self.snr_weight(t) * per_image).mean()

    def snr_weight(self, t):
        """Min-SNR-gamma (Hang et al. 2023), SNR_t = alpha_bar_t / (1 - alpha_bar_t): the weight
        min(SNR_t, gamma) / SNR_t on the eps loss, min(SNR_t, gamma) / (SNR_t + 1) on the v loss (both weight the x0
        error by min(SNR_t, gamma))."""
        ab = self.alpha_bar[t]
        snr = ab / (1 - ab)
        return snr.clamp(max=self.min_snr_gamma) / (snr if self.parameterization == "eps" else snr + 1)

    def forward(self, x0):
        """The training loss, so that DistributedDataParallel sees the forward pass."""
        return self.loss(x0)

    def predict_x0(self, xt, t, eps):
        """Invert Eq. (4) for x_0 given the predicted noise."""
        ab = self._at(self.alpha_bar, t, xt)
        x0 = (xt - (1 - ab).sqrt() * eps) / ab.sqrt()
        return x0.clamp(-1, 1) if self.clip_denoised else x0

    def predict_x0_eps(self, out, xt, t):
        """The network's output -> (x0_hat, eps_hat), the one conversion every sampler and the bound use.
        eps: x0 = (x_t - sqrt(1 - ab) eps) / sqrt(ab) (Eq. 4 inverted).
        v = sqrt(ab) eps - sqrt(1 - ab) x0 (Salimans & Ho 2022): x0 = sqrt(ab) x_t - sqrt(1 - ab) v and
        eps = sqrt(1 - ab) x_t + sqrt(ab) v (a rotation, as ab + (1 - ab) = 1).
        With clip_denoised, x0 is clipped to [-1, 1] and eps re-derived from it, so that
        x_t = sqrt(ab) x0 + sqrt(1 - ab) eps still holds (DDIM relies on it; the ancestral mean uses x0 only)."""
        ab = self._at(self.alpha_bar, t, xt)
        if self.parameterization == "eps":
            x0, eps = self.predict_x0(xt, t, out), out
        else:
            x0, eps = ab.sqrt() * xt - (1 - ab).sqrt() * out, (1 - ab).sqrt() * xt + ab.sqrt() * out
            x0 = x0.clamp(-1, 1) if self.clip_denoised else x0
        if self.clip_denoised:  # keep eps consistent with the clipped x0
            eps = (xt - ab.sqrt() * x0) / (1 - ab).sqrt()
        return x0, eps

    def denoise(self, xt, t):
        """(x0_hat, eps_hat) at (B,) timesteps t from the network, in fp32 also under bf16 autocast."""
        return self.predict_x0_eps(self.eps_model(xt, t).float(), xt, t)

    def sigma2(self, t):
        """sigma_t^2 = beta_t or beta_tilde_t (Section 3.2; both gave similar results in the paper)."""
        return self.betas[t] if self.sigma == "beta" else self.beta_tilde[t]

    def p_mean(self, xt, t):
        """mu_theta(x_t, t): the posterior mean of Eq. (7) at the predicted x_0 (equal to Eq. (11) when unclipped)."""
        x0, _ = self.denoise(xt, t)  # fp32 chain arithmetic, also under bf16 autocast
        return self._at(self.coef0, t, xt) * x0 + self._at(self.coef_t, t, xt) * xt

    @torch.no_grad()
    def p_sample(self, xt, t_int):
        """One step of Algorithm 2: x_{t-1} = mu_theta(x_t, t) + sigma_t z, z ~ N(0, I) (no noise at the last step)."""
        t = torch.full((xt.shape[0],), t_int, device=xt.device, dtype=torch.long)
        mean = self.p_mean(xt, t)
        if t_int == 0:
            return mean
        return mean + self.sigma2(t_int).sqrt() * torch.randn_like(xt)

    def ddim_timesteps(self, steps, spacing="uniform"):
        """A sub-sequence tau of [0, T) with `steps` entries, always ending at T - 1 (the chain starts from x_T):
        evenly spaced, or quadratic (tau_i ~ (i / S)^2, denser near t = 0; the DDIM paper tries both). One step is
        [T - 1]: a single jump from x_T to x_0."""
        if not 1 <= steps <= self.T:
            raise ValueError(f"DDIM steps must be in [1, T = {self.T}], got {steps}")
        if steps == 1:
            return torch.tensor([self.T - 1])
        if spacing == "uniform":
            return torch.linspace(0, self.T - 1, steps).round().long()  # distinct: spacing (T-1)/(S-1) >= 1
        tau = (torch.linspace(0, 1, steps) ** 2 * (self.T - 1)).round().long().tolist()
        for i in range(1, len(tau)):  # keep it strictly increasing where rounding collides near 0 (stays <= T - 1
            tau[i] = max(tau[i], tau[i - 1] + 1)  # for S <= T: tau_j + (S - 1 - j) <= (T - 1) x^2 + (T - 1)(1 - x))
        return torch.tensor(tau)

    def ddim_sigma(self, t, t_prev, eta):
        """DDIM Eq. (16): sigma = eta sqrt((1 - ab_prev) / (1 - ab_t)) sqrt(1 - ab_t / ab_prev)."""
        ab, ab_prev = self.alpha_bar[t], (self.alpha_bar[t_prev] if t_prev >= 0 else self.alpha_bar.new_tensor(1.0))
        return eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).sqrt()

    @torch.no_grad()
    def ddim_step(self, xt, t_int, t_prev, eta):
        """DDIM Eq. (12): x_prev = sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev - sigma^2) eps_theta + sigma z."""
        t = torch.full((xt.shape[0],), t_int, device=xt.device, dtype=torch.long)
        x0, eps = self.denoise(xt, t)  # eps re-derived from the clipped x0 with clip_denoised
        ab_prev = self.alpha_bar[t_prev] if t_prev >= 0 else self.alpha_bar.new_tensor(1.0)
        sigma = self.ddim_sigma(t_int, t_prev, eta)
        x = ab_prev.sqrt() * x0 + (1 - ab_prev - sigma ** 2).clamp(min=0).sqrt() * eps
        return x + sigma * torch.randn_like(xt) if t_prev >= 0 else x

    @torch.no_grad()
    def sample(self, shape, device, sampler="ddpm", steps=None, eta=0.0, trajectory_every=0, progress=None,
               spacing="uniform", order=2, x_T=None):
        """x_T ~ N(0, I) of `shape` (or the given x_T), then the reverse chain: ddpm (Algorithm 2, T steps), ddim
        (S steps on `spacing`) or dpm++ (DPM-Solver++(2M), S steps on the logSNR grid; `order` 1 is DDIM eta = 0 on
        that grid). S model calls for S steps. Returns (x_0 in [-1, 1], [x_t snapshots] if trajectory_every)."""
        x = torch.randn(shape, device=device) if x_T is None else x_T.to(device)
        traj = [x] if trajectory_every else []
        if sampler == "ddpm":
            ts = list(range(self.T - 1, -1, -1))
            pairs = [(t, t - 1) for t in ts]
        else:
            S = 50 if steps is None else steps
            tau = self.ddim_timesteps(S, spacing) if sampler == "ddim" else logsnr_timesteps(self.alpha_bar, S)
            tau = tau.tolist()
            pairs = [(tau[i], tau[i - 1] if i > 0 else -1) for i in range(len(tau) - 1, -1, -1)]
        prev = None  # DPM-Solver++'s previous x0 prediction and its timestep
        for i, (t, t_prev) in enumerate(progress(pairs) if progress else pairs):
            if sampler == "ddpm":
                x = self.p_sample(x, t)
            elif sampler == "ddim":
                x = self.ddim_step(x, t, t_prev, eta)
            else:
                x, prev = dpm_solver_pp_step(self, x, t, t_prev, prev, order)
            if trajectory_every and ((i + 1) % trajectory_every == 0 or t_prev < 0):
                traj.append(x)
        return x.clamp(-1, 1), traj

    # ------------------------------------------------------------------ the variational bound (Section 3.3)

    @torch.no_grad()
    def nll_bound_bpd(self, x0, num_t=None):
        """L = L_T + sum_{t>1} L_{t-1} + L_0 (Eq. 5) in bits/dim, for x0 in [-1, 1] on the 256-level grid.

        L_T = KL(q(x_T|x_0) || N(0, I)); L_{t-1} = KL(q(x_{t-1}|x_t, x_0) || p_theta(x_{t-1}|x_t)) between Gaussians
        with p's variance sigma_t^2; L_0 = -log p_theta(x_0|x_1) with the discrete decoder of Eq. (13).
        num_t=None sums all T terms; an integer gives an unbiased Monte-Carlo estimate of the sum over t.

        The decoder's variance is beta_tilde at the paper's t = 2 (index 1 here), whichever sigma the chain uses: the
        authors' code does so (diffusion_utils_2.py, p_mean_variance: the log-variance at t = 0 is
        log(posterior_variance[1]) for both 'fixedsmall' and 'fixedlarge', "to get a better decoder log
        likelihood"); the paper's sigma_1^2 = beta_1 would give a looser bound (1.71 vs 1.31 bits for an interior
        pixel with a perfect mean, T = 1000). Sampling is unaffected: the last step adds no noise."""
        B, D = x0.shape[0], x0[0].numel()
        ab_T = self.alpha_bar[-1]
        mean_T, var_T = ab_T.sqrt() * x0, 1 - ab_T
        L_T = 0.5 * (var_T + mean_T ** 2 - 1 - torch.log(var_T)).flatten(1).sum(1)
        ts = torch.arange(1, self.T) if num_t is None else torch.randint(1, self.T, (num_t,))
        L_mid = torch.zeros(B, device=x0.device)
        for t_int in ts.tolist():
            t = torch.full((B,), t_int, device=x0.device, dtype=torch.long)
            xt = self.q_sample(x0, t, torch.randn_like(x0))
            mu_q = self._at(self.coef0, t, x0) * x0 + self._at(self.coef_t, t, x0) * xt
            var_q, var_p = self.beta_tilde[t_int], self.sigma2(t_int)
            kl = 0.5 * (torch.log(var_p / var_q) + (var_q + (mu_q - self.p_mean(xt, t)) ** 2) / var_p - 1)
            L_mid += kl.flatten(1).sum(1)
        if num_t is not None:
            L_mid *= (self.T - 1) / num_t
        t0 = torch.zeros(B, device=x0.device, dtype=torch.long)
        x1 = self.q_sample(x0, t0, torch.randn_like(x0))
        L_0 = -discretized_gaussian_log_likelihood(x0, self.p_mean(x1, t0), self.beta_tilde[1]).flatten(1).sum(1)
        return (L_T + L_mid + L_0) / (D * math.log(2))


def discretized_gaussian_log_likelihood(x0, mean, var):
    """Eq. (13): log of the Gaussian mass of the bin of width 2/255 around each pixel, bins at the edges extended
    to -inf / +inf."""
    std = var.sqrt()
    normal = torch.distributions.Normal(mean, std)
    upper = torch.where(x0 > 0.999, torch.ones_like(x0), normal.cdf(x0 + 1 / 255))
    lower = torch.where(x0 < -0.999, torch.zeros_like(x0), normal.cdf(x0 - 1 / 255))
    return torch.log((upper - lower).clamp(min=1e-12))


class EMA:
    """Exponential moving average of the weights (Section 4: decay 0.9999), used for sampling and evaluation."""

    def __init__(self, model, decay=0.9999):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model, step=None):
        """With `step`, the decay warms up as min(decay, (1 + step) / (10 + step)) so that short runs do not keep a
        share of the random initialisation (decay^step: 14% after 2000 steps at 0.999)."""
        decay = self.decay if step is None else min(self.decay, (1 + step) / (10 + step))
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p, 1 - decay)
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)
