"""Real NVP: a normalizing flow of affine coupling layers with a multi-scale architecture.

Dinh, Sohl-Dickstein, Bengio 2017, "Density estimation using Real NVP" (arXiv 1605.08803). Equation numbers refer
to that paper. Every layer maps x -> (y, log|det dy/dx|) per sample and has an exact inverse.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class FlowConfig:
    in_chans: int = 1
    image_size: int = 28
    num_scales: int = 2
    """each scale: 3 checkerboard couplings, squeeze, 3 channel-wise couplings, factor out half (Section 3.6)"""
    final_couplings: int = 4
    """checkerboard couplings after the last scale"""
    hidden: int = 64
    """channels of the residual CNN computing s and t"""
    num_blocks: int = 4
    """residual blocks in that CNN"""
    norm: str = "actnorm"
    """actnorm | batchnorm | none: normalization flow layer after each coupling"""
    alpha: float = 0.05
    """logit pre-processing: y = logit(alpha + (1 - 2 alpha) x)"""
    dequant: str = "uniform"
    """uniform | variational (Flow++)"""
    single_scale: int = 0
    """>0: the seed's flow instead: this many checkerboard couplings at one scale, no squeeze"""


# ----------------------------------------------------------------------------- layers

class ResNet(nn.Module):
    """The s, t network of a coupling: conv in, residual blocks, conv out (zero-initialised: identity flow)."""

    def __init__(self, c_in, c_out, hidden, num_blocks):
        super().__init__()
        self.inp = nn.Conv2d(c_in, hidden, 3, padding=1)
        self.blocks = nn.ModuleList(nn.Sequential(nn.BatchNorm2d(hidden), nn.ReLU(), nn.Conv2d(hidden, hidden, 3, padding=1),
                                                  nn.BatchNorm2d(hidden), nn.ReLU(), nn.Conv2d(hidden, hidden, 3, padding=1))
                                    for _ in range(num_blocks))
        self.out = nn.Sequential(nn.BatchNorm2d(hidden), nn.ReLU(), nn.Conv2d(hidden, c_out, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)


def checkerboard(h, w, parity, device):
    """b(i, j) = 1 where (i + j) % 2 == parity: the half of the pixels that conditions the other half."""
    i, j = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    return ((i + j) % 2 == parity).float()[None, None]  # (1, 1, H, W)


class AffineCoupling(nn.Module):
    """Eq. (9): y = b * x + (1 - b) * (x * exp(s(b * x)) + t(b * x)),  log|det| = sum (1 - b) * s   (Eq. 6).

    mask='checkerboard': b is a spatial checkerboard; mask='channel': b selects the first (or second) half of the
    channels. s = scale * tanh(s_raw) keeps the scales bounded (stability, as in the authors' code)."""

    def __init__(self, channels, mask, parity, hidden, num_blocks):
        super().__init__()
        self.mask, self.parity = mask, parity
        c_cond = channels + 1 if mask == "checkerboard" else channels // 2  # checkerboard also sees b itself
        c_out = 2 * (channels if mask == "checkerboard" else channels // 2)
        self.net = ResNet(c_cond, c_out, hidden, num_blocks)
        self.scale = nn.Parameter(torch.ones(1))

    def _st(self, cond):
        s, t = self.net(cond).float().chunk(2, dim=1)  # fp32 from here on, even under bf16 autocast
        return self.scale * torch.tanh(s), t

    def forward(self, x, reverse=False):
        if self.mask == "checkerboard":
            b = checkerboard(x.shape[2], x.shape[3], self.parity, x.device)
            xb = x * b
            s, t = self._st(torch.cat([xb, b.expand(x.shape[0], 1, -1, -1)], dim=1))
            s, t = s * (1 - b), t * (1 - b)  # only the other half is transformed
            y = xb + (1 - b) * (x * s.exp() + t) if not reverse else xb + (1 - b) * ((x - t) * (-s).exp())
            return y, s.flatten(1).sum(1) * (-1 if reverse else 1)
        x_a, x_b = x.chunk(2, dim=1)
        if self.parity:
            x_a, x_b = x_b, x_a
        s, t = self._st(x_b)
        y_a = x_a * s.exp() + t if not reverse else (x_a - t) * (-s).exp()
        y = torch.cat([y_a, x_b] if not self.parity else [x_b, y_a], dim=1)
        return y, s.flatten(1).sum(1) * (-1 if reverse else 1)

    def inverse(self, y):
        return self.forward(y, reverse=True)[0]


class ActNorm(nn.Module):
    """Glow's activation normalization (Kingma & Dhariwal 2018): y = (x - mu) * exp(-log_sigma) per channel,
    initialised from the first batch so that y has zero mean and unit variance. log|det| = -H W sum log_sigma."""

    def __init__(self, channels):
        super().__init__()
        self.mu = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.log_sigma = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(False))

    def forward(self, x):
        if not self.initialized and self.training:
            with torch.no_grad():
                self.mu.copy_(x.mean(dim=(0, 2, 3), keepdim=True))
                self.log_sigma.copy_(x.std(dim=(0, 2, 3), keepdim=True).add(1e-6).log())
                self.initialized.fill_(True)
        y = (x - self.mu) * torch.exp(-self.log_sigma)
        return y, (-self.log_sigma.sum() * x.shape[2] * x.shape[3]).expand(x.shape[0])

    def inverse(self, y):
        return y * torch.exp(self.log_sigma) + self.mu


class BatchNormFlow(nn.Module):
    """Section 3.7: batch normalization as a flow layer, y = (x - mu) / sqrt(var + eps) * exp(log_gamma) + beta, with
    batch statistics in training and running averages in evaluation. log|det| = H W sum(log_gamma - 0.5 log(var + eps))."""

    def __init__(self, channels, momentum=0.05, eps=1e-4):
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.log_gamma = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.register_buffer("running_mean", torch.zeros(1, channels, 1, 1))
        self.register_buffer("running_var", torch.ones(1, channels, 1, 1))

    def forward(self, x):
        if self.training:
            mean, var = x.mean(dim=(0, 2, 3), keepdim=True), x.var(dim=(0, 2, 3), keepdim=True, unbiased=False)
            with torch.no_grad():
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(var, self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        y = (x - mean) / torch.sqrt(var + self.eps) * self.log_gamma.exp() + self.beta
        log_det = (self.log_gamma - 0.5 * torch.log(var + self.eps)).sum() * x.shape[2] * x.shape[3]
        return y, log_det.expand(x.shape[0])

    def inverse(self, y):
        return (y - self.beta) * (-self.log_gamma).exp() * torch.sqrt(self.running_var + self.eps) + self.running_mean


class Squeeze(nn.Module):
    """Space-to-depth, Section 3.6: (C, H, W) -> (4C, H/2, W/2); volume preserving (log|det| = 0)."""

    def forward(self, x):
        B, C, H, W = x.shape
        y = x.view(B, C, H // 2, 2, W // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(B, 4 * C, H // 2, W // 2)
        return y, x.new_zeros(B)

    def inverse(self, y):
        B, C4, H, W = y.shape
        return y.view(B, C4 // 4, 2, 2, H, W).permute(0, 1, 4, 2, 5, 3).reshape(B, C4 // 4, 2 * H, 2 * W)


class Logit(nn.Module):
    """Section 4.1 pre-processing: y = logit(p), p = alpha + (1 - 2 alpha) x for x in [0, 1].
    log|det| = sum log(1 - 2 alpha) - log p - log(1 - p)."""

    def __init__(self, alpha):
        super().__init__()
        self.alpha = alpha

    def forward(self, x):
        p = self.alpha + (1 - 2 * self.alpha) * x
        y = torch.log(p) - torch.log1p(-p)
        log_det = (math.log(1 - 2 * self.alpha) - torch.log(p) - torch.log1p(-p)).flatten(1).sum(1)
        return y, log_det

    def inverse(self, y):
        return (torch.sigmoid(y) - self.alpha) / (1 - 2 * self.alpha)


class VariationalDequantizer(nn.Module):
    """Flow++ (Ho et al. 2019): noise u ~ q(u | x) instead of U[0, 1). Here q is one conditional affine step
    followed by a sigmoid: u = sigmoid(mu(x) + sigma(x) eps), eps ~ N(0, I).
    Returns (u, log q(u | x)) with log q = log N(eps) - log sigma - log sigmoid'(.)."""

    def __init__(self, channels, hidden):
        super().__init__()
        self.net = ResNet(channels, 2 * channels, hidden, 1)

    def forward(self, x01):
        mu, log_sigma = self.net(x01 * 2 - 1).float().chunk(2, dim=1)  # fp32 even under bf16 autocast
        log_sigma = torch.tanh(log_sigma)
        eps = torch.randn_like(x01)
        h = mu + log_sigma.exp() * eps
        u = torch.sigmoid(h)
        log_q = (-0.5 * eps ** 2 - 0.5 * math.log(2 * math.pi) - log_sigma - F.logsigmoid(h) - F.logsigmoid(-h))
        return u, log_q.flatten(1).sum(1)


# ----------------------------------------------------------------------------- the flow

class RealNVP(nn.Module):
    """x in [0, 1] (dequantized) -> logit -> scales of couplings with squeeze and factor-out -> z ~ N(0, I).

    forward(x) -> (zs, log_det), inverse(zs) -> x, log_prob(x) (density of the dequantized x in [0, 1]^D),
    sample(n, temperature)."""

    def __init__(self, cfg: FlowConfig):
        super().__init__()
        self.cfg = cfg
        self.logit = Logit(cfg.alpha)
        self.dequantizer = VariationalDequantizer(cfg.in_chans, 32) if cfg.dequant == "variational" else None
        c, s = cfg.in_chans, cfg.image_size
        self.scales, self.z_shapes = nn.ModuleList(), []
        if cfg.single_scale:  # the seed's flow: one scale, alternating checkerboards
            self.final = self._couplings(c, "checkerboard", cfg.single_scale)
        else:
            for _ in range(cfg.num_scales):
                layers = self._couplings(c, "checkerboard", 3)
                layers.append(Squeeze())
                c, s = 4 * c, s // 2
                layers.extend(self._couplings(c, "channel", 3))
                self.scales.append(layers)
                c //= 2  # factor out half of the channels: they go straight to the prior
                self.z_shapes.append((c, s, s))
            self.final = self._couplings(c, "checkerboard", cfg.final_couplings)
        self.z_shapes.append((c, s, s))

    def _couplings(self, channels, mask, n):
        layers = nn.ModuleList()
        for i in range(n):
            layers.append(AffineCoupling(channels, mask, i % 2, self.cfg.hidden, self.cfg.num_blocks))
            if self.cfg.norm == "actnorm":
                layers.append(ActNorm(channels))
            elif self.cfg.norm == "batchnorm":
                layers.append(BatchNormFlow(channels))
        return layers

    def forward(self, x):
        """x: (B, C, H, W) in [0, 1] -> (list of z per scale, log|det dz/dx| per sample)."""
        h, log_det = self.logit(x)
        zs = []
        for layers in self.scales:
            for layer in layers:
                h, ld = layer(h)
                log_det = log_det + ld
            z, h = h.chunk(2, dim=1)  # Eq. (15): factor out z_i, keep transforming h_i
            zs.append(z)
        for layer in self.final:
            h, ld = layer(h)
            log_det = log_det + ld
        zs.append(h)
        return zs, log_det

    def inverse(self, zs):
        h = zs[-1]
        for layer in reversed(self.final):
            h = layer.inverse(h)
        for layers, z in zip(reversed(self.scales), reversed(zs[:-1])):
            h = torch.cat([z, h], dim=1)
            for layer in reversed(layers):
                h = layer.inverse(h)
        return self.logit.inverse(h)

    def log_prob(self, x):
        """log p(x) = log N(f(x); 0, I) + log|det df/dx|   (change of variables, Eq. 3)."""
        zs, log_det = self(x)
        log_pz = sum((-0.5 * z ** 2 - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1) for z in zs)
        return log_pz + log_det

    def dequantize(self, x_uint8):
        """uint8 pixels -> continuous x in [0, 1] and log q(u | x) (0 for uniform noise)."""
        x = x_uint8.float()
        if self.dequantizer is None:
            return (x + torch.rand_like(x)) / 256.0, x.new_zeros(x.shape[0])
        u, log_q = self.dequantizer(x / 255.0)
        return (x + u) / 256.0, log_q

    def bits_per_dim(self, x_uint8):
        """An upper bound on -log2 P(x) / D for 8-bit images, through dequantization (Theis et al. 2016; Flow++ Eq. 12):
        log P(x) >= E_q[log p_cont((x + u) / 256) - log q(u | x)] - D log 256,
        where p_cont is the density on [0, 1]^D and the last term converts it to the 256-level grid.
        Returns one draw of u per image: an unbiased estimate of that bound (not the exact likelihood), whose
        spread over u nf/sample.py measures."""
        x, log_q = self.dequantize(x_uint8)
        D = x[0].numel()
        log_px = self.log_prob(x) - log_q - D * math.log(256.0)
        return -log_px / (D * math.log(2.0))

    @torch.no_grad()
    def sample(self, n, temperature=1.0, device=None):
        """z ~ N(0, T^2 I) through the inverse; returns images in [0, 1] and their latents."""
        device = device or next(self.parameters()).device
        zs = [temperature * torch.randn(n, *shape, device=device) for shape in self.z_shapes]
        return self.inverse(zs).clamp(0, 1), zs


def num_params(model):
    return sum(p.numel() for p in model.parameters())
