"""Vision Transformer.

Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale"
(arXiv 2010.11929). Equation numbers refer to Section 3.1 of that paper.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ViTConfig:
    image_size: int = 28
    patch_size: int = 4
    in_chans: int = 1
    num_classes: int = 10
    dim: int = 128
    depth: int = 6
    heads: int = 4
    mlp_dim: int = 256
    dropout: float = 0.0
    drop_path: float = 0.1
    """stochastic depth rate of the last block (linearly increasing from 0)"""
    pool: str = "cls"
    """cls: read out the class token (Eq. 4); mean: average the patch tokens"""
    pos_emb: str = "learned"
    """learned (the paper) or sincos (fixed 2-D sine-cosine)"""
    stem: int = 0
    """hybrid (Section 3.1): channels of a small CNN whose full-resolution feature map is cut into the patches;
    0: patches of raw pixels (the pure ViT)"""


def sincos_2d(h, w, dim):
    """Fixed 2-D position embedding: half the channels encode the row, half the column (sin and cos)."""
    assert dim % 4 == 0, "sincos position embedding needs dim divisible by 4"
    y, x = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4) / (dim // 4 - 1 if dim > 4 else 1))
    y, x = y.flatten()[:, None] * omega, x.flatten()[:, None] * omega  # (h*w, dim/4)
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)  # (h*w, dim)


def conv_stem(in_chans, ch):
    """The hybrid's CNN (Section 3.1, "Hybrid Architecture"): two 3x3 conv-BN-ReLU layers at full resolution, a
    small stand-in for the paper's ResNet stages, so the patches are cut from a C' x H x W feature map."""
    return nn.Sequential(nn.Conv2d(in_chans, ch, 3, padding=1, bias=False), nn.BatchNorm2d(ch), nn.ReLU(),
                         nn.Conv2d(ch, ch, 3, padding=1, bias=False), nn.BatchNorm2d(ch), nn.ReLU())


class PatchEmbedding(nn.Module):
    """x_p^i E: cut the image (or the hybrid's CNN feature map) into N = HW / P^2 non-overlapping P x P patches,
    flatten, project linearly."""

    def __init__(self, cfg):
        super().__init__()
        self.p = cfg.patch_size
        self.stem = conv_stem(cfg.in_chans, cfg.stem) if cfg.stem else nn.Identity()
        self.proj = nn.Linear((cfg.stem or cfg.in_chans) * self.p ** 2, cfg.dim)

    def forward(self, x):
        x = self.stem(x)
        B, C, H, W = x.shape
        p = self.p
        x = x.view(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)  # (B, H/p, W/p, p, p, C)
        x = x.reshape(B, (H // p) * (W // p), p * p * C)  # (B, N, P^2 C)
        return self.proj(x)  # (B, N, D)


class Attention(nn.Module):
    """Multi-head self-attention (Appendix A, Eqs. 5-8): softmax(q k^T / sqrt(D_h)) v per head, concatenated."""

    def __init__(self, dim, heads, dropout=0.0):
        super().__init__()
        self.heads, self.scale, self.dropout = heads, (dim // heads) ** -0.5, dropout
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x, need_weights=False, fused=None):
        """fused: F.scaled_dot_product_attention (True) or the written-out softmax(q k^T / sqrt(D_h)) v (False);
        None picks by device, the fused kernel on CUDA. need_weights always takes the written-out path."""
        B, N, D = x.shape
        qkv = self.to_qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # (3, B, h, N, D_h)
        q, k, v = qkv.unbind(0)  # unbind, not indexing: its backward is one stack, not three zero-filled copies
        p = self.dropout if self.training else 0.0
        if fused is None:  # on CPUs the written-out path is the faster one at these lengths
            fused = x.is_cuda
        if need_weights or not fused:
            att = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)  # A = softmax(q k^T / sqrt(D_h)): (B, h, N, N)
            out = F.dropout(att, p, self.training) @ v
        else:  # the same computation through the fused kernel
            att, out = None, F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        out = out.transpose(1, 2).reshape(B, N, D)  # concatenate heads: (B, N, D)
        return self.to_out(out), att


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016): drop a residual branch per sample, rescale the survivors."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        keep = torch.rand(x.shape[0], 1, 1, device=x.device) >= self.p
        return x * keep / (1 - self.p)


class Block(nn.Module):
    """Eqs. 2-3: z' = MSA(LN(z)) + z; z = MLP(LN(z')) + z', the MLP being two layers with a GELU."""

    def __init__(self, cfg, drop_path):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(cfg.dim), nn.LayerNorm(cfg.dim)
        self.attn = Attention(cfg.dim, cfg.heads, cfg.dropout)
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, cfg.mlp_dim), nn.GELU(), nn.Dropout(cfg.dropout),
                                 nn.Linear(cfg.mlp_dim, cfg.dim), nn.Dropout(cfg.dropout))
        self.drop_path = DropPath(drop_path)

    def forward(self, x, need_weights=False):
        a, att = self.attn(self.norm1(x), need_weights)
        x = x + self.drop_path(a)
        return x + self.drop_path(self.mlp(self.norm2(x))), att


class ViT(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        assert cfg.image_size % cfg.patch_size == 0, "image size must be a multiple of the patch size"
        assert cfg.pool in ("cls", "mean") and cfg.pos_emb in ("learned", "sincos")
        self.cfg = cfg
        g = cfg.image_size // cfg.patch_size
        self.num_patches = g * g
        self.patch_embed = PatchEmbedding(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim)) if cfg.pool == "cls" else None
        n_tokens = self.num_patches + (cfg.pool == "cls")
        if cfg.pos_emb == "learned":
            self.pos_embedding = nn.Parameter(torch.randn(1, n_tokens, cfg.dim) * 0.02)
        else:  # fixed; the class token gets position zero
            pe = torch.cat([torch.zeros(n_tokens - self.num_patches, cfg.dim), sincos_2d(g, g, cfg.dim)])
            self.register_buffer("pos_embedding", pe[None], persistent=False)
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, cfg.drop_path * i / max(1, cfg.depth - 1)) for i in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.num_classes)
        self.apply(self._init)
        nn.init.zeros_(self.head.weight)  # the paper zero-initialises the head (Section 3.2 / Appendix B)

    @staticmethod
    def _init(m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x, need_weights=False):
        """x: (B, C, H, W) normalised images -> logits (B, classes) [, attention maps per layer (B, h, N, N)]."""
        z = self.patch_embed(x)  # (B, N, D)
        if self.cls_token is not None:  # Eq. 1: z_0 = [x_class; x_p^1 E; ...; x_p^N E] + E_pos
            z = torch.cat([self.cls_token.expand(z.shape[0], -1, -1), z], dim=1)  # (B, N+1, D)
        z = self.dropout(z + self.pos_embedding)
        atts = []
        for block in self.blocks:
            z, att = block(z, need_weights)
            atts.append(att)
        z = self.norm(z)
        y = self.head(z[:, 0] if self.cls_token is not None else z.mean(dim=1))  # Eq. 4: y = LN(z_L^0)
        return (y, atts) if need_weights else y


def attention_rollout(atts, has_cls=True):
    """Abnar & Zuidema 2020: multiply head-averaged attention (plus identity for the residual) through the
    layers; returns the relevance of each patch for the read-out, (B, N)."""
    n = atts[0].shape[-1]
    rollout = torch.eye(n, device=atts[0].device).expand(atts[0].shape[0], n, n)
    for att in atts:
        a = att.mean(dim=1) + torch.eye(n, device=att.device)  # (B, N, N)
        rollout = (a / a.sum(dim=-1, keepdim=True)) @ rollout
    return rollout[:, 0, 1:] if has_cls else rollout.mean(dim=1)


def param_count(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

