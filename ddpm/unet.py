"""The noise predictor eps_theta(x_t, t): a U-Net in the style of PixelCNN++ / Ho et al. 2020 Appendix B.

Residual blocks (GroupNorm, SiLU) with the sinusoidal time embedding added in every block, self-attention at the
lowest resolution (and, optionally, after every residual block of chosen levels, as the paper does at 16x16), skip
connections from the down path to the up path. Options that are not the paper's, both as denoising-diffusion-pytorch
has them, for the side-by-side bench: linear attention (Shen et al. 2018, "Efficient Attention") after the residual
blocks of chosen levels, and a per-pixel RMSNorm in place of GroupNorm.
"""
import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class UNetConfig:
    in_chans: int = 1
    ch: int = 32
    """channels at full resolution"""
    ch_mult: tuple[int, ...] = (1, 2, 2)
    """multiplier per resolution; len - 1 downsamplings (28 -> 14 -> 7 for three entries)"""
    num_res_blocks: int = 2
    attn_lowest: bool = True
    """self-attention in the middle, at the lowest resolution"""
    attn_levels: tuple[int, ...] = ()
    """levels (indices into ch_mult) with self-attention after every residual block, down and up; the paper's
    CIFAR-10 net has it at 16x16, its second level"""
    linear_attn_levels: tuple[int, ...] = ()
    """levels with linear attention after every residual block instead (not in the paper; see LinearAttnBlock)"""
    norm: str = "group"
    """normalization in the residual blocks and the output: "group" (GroupNorm, the paper's) or "rms" (each pixel's
    channel vector scaled to unit RMS, as denoising-diffusion-pytorch does; not in the paper)"""
    scale_shift: bool = False
    """time embedding as a scale and shift of the second GroupNorm (Nichol & Dhariwal 2021's adaptive group norm)
    instead of the paper's sum"""
    dropout: float = 0.0


def timestep_embedding(t, dim):
    """Transformer sinusoidal embedding of the (integer) timestep, as in Vaswani et al. 2017 Section 3.5."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / (half - 1))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=1)  # (B, dim)


NORMS = ("group", "rms")


def norm(ch, kind="group"):
    assert kind in NORMS, f"norm must be one of {NORMS}, not {kind!r}"
    return nn.GroupNorm(min(32, ch // 4), ch) if kind == "group" else PixelRMSNorm(ch)


class PixelRMSNorm(nn.Module):
    """x / RMS over the channels, per pixel, times a learned gain: no statistics over the image, unlike GroupNorm."""

    def __init__(self, ch):
        super().__init__()
        self.g = nn.Parameter(torch.ones(1, ch, 1, 1))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + 1e-6) * self.g


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions."""

    def __init__(self, ch):
        super().__init__()
        self.norm, self.qkv, self.proj = norm(ch), nn.Conv2d(ch, 3 * ch, 1), nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).view(B, 3, C, H * W).transpose(-1, -2).unbind(1)  # each (B, HW, C)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, HW, C)
        return x + self.proj(h.transpose(1, 2).reshape(B, C, H, W))


class LinearAttnBlock(nn.Module):
    """Efficient attention (Shen et al. 2018, Eq. 2): softmax over the features of each query and over the positions
    of each key, then out = (K^T V)^T Q in O(HW d^2) instead of O((HW)^2 d): global context at full resolution."""

    def __init__(self, ch, heads=4, dim_head=32):
        super().__init__()
        self.heads, hidden = heads, heads * dim_head
        self.norm, self.qkv, self.proj = norm(ch), nn.Conv2d(ch, 3 * hidden, 1), nn.Conv2d(hidden, ch, 1)
        nn.init.zeros_(self.proj.weight)

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).view(B, 3, self.heads, -1, H * W).unbind(1)  # each (B, heads, d, HW)
        q, k = q.softmax(dim=-2), k.softmax(dim=-1)
        context = k @ v.transpose(-1, -2)  # (B, heads, d_k, d_v): sum over positions of k_n v_n^T
        h = context.transpose(-1, -2) @ q  # (B, heads, d_v, HW)
        return x + self.proj(h.reshape(B, -1, H, W))


class ResBlock(nn.Module):
    """Residual block; with `attn` ("full" or "linear"), attention follows it (the pair is one unit of the U-Net's
    skip list)."""

    def __init__(self, c_in, c_out, t_dim, dropout, attn=None, scale_shift=False, norm_kind="group"):
        super().__init__()
        self.norm1, self.conv1 = norm(c_in, norm_kind), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.scale_shift = scale_shift
        self.t_proj = nn.Linear(t_dim, 2 * c_out if scale_shift else c_out)
        self.norm2, self.conv2 = norm(c_out, norm_kind), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        self.attn = {"full": AttnBlock, "linear": LinearAttnBlock}[attn](c_out) if attn else nn.Identity()
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        t = self.t_proj(F.silu(temb))[:, :, None, None]  # time embedding into every block
        if self.scale_shift:
            scale, shift = t.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + t)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.attn(self.skip(x) + h)


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        ch, t_dim = cfg.ch, 4 * cfg.ch
        self.t_mlp = nn.Sequential(nn.Linear(ch, t_dim), nn.SiLU(), nn.Linear(t_dim, t_dim))
        self.inp = nn.Conv2d(cfg.in_chans, ch, 3, padding=1)
        self.down, chans, c = nn.ModuleList(), [ch], ch
        block = partial(ResBlock, t_dim=t_dim, dropout=cfg.dropout, scale_shift=cfg.scale_shift, norm_kind=cfg.norm)
        attn = {**{i: "linear" for i in cfg.linear_attn_levels}, **{i: "full" for i in cfg.attn_levels}}.get
        for i, m in enumerate(cfg.ch_mult):
            for _ in range(cfg.num_res_blocks):
                self.down.append(block(c, ch * m, attn=attn(i)))
                c = ch * m
                chans.append(c)
            if i < len(cfg.ch_mult) - 1:
                self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))  # downsample
                chans.append(c)
        self.mid = nn.ModuleList([block(c, c), AttnBlock(c) if cfg.attn_lowest else nn.Identity(), block(c, c)])
        self.up = nn.ModuleList()
        for i, m in reversed(list(enumerate(cfg.ch_mult))):
            for _ in range(cfg.num_res_blocks + 1):
                self.up.append(block(c + chans.pop(), ch * m, attn=attn(i)))
                c = ch * m
            if i > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, c, 3, padding=1)))
        self.out = nn.Sequential(norm(c, cfg.norm), nn.SiLU(), nn.Conv2d(c, cfg.in_chans, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x, t):
        """x: (B, C, H, W), t: (B,) integer timesteps in [0, T) -> predicted noise, (B, C, H, W)."""
        temb = self.t_mlp(timestep_embedding(t, self.cfg.ch))
        h = self.inp(x)
        skips = [h]
        for layer in self.down:
            h = layer(h, temb) if isinstance(layer, ResBlock) else layer(h)
            skips.append(h)
        for layer in self.mid:
            h = layer(h, temb) if isinstance(layer, ResBlock) else layer(h)
        for layer in self.up:
            if isinstance(layer, ResBlock):
                skip = skips.pop()
                if skip.shape[-1] != h.shape[-1]:  # odd sizes (7 -> 14 is fine; 7 -> 3 -> 6 would not be)
                    h = F.interpolate(h, size=skip.shape[-2:], mode="nearest")
                h = layer(torch.cat([h, skip], dim=1), temb)
            else:
                h = layer(h)
        return self.out(h)
