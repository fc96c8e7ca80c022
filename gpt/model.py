"""A decoder-only Transformer for characters.

Vaswani et al. 2017, "Attention Is All You Need" (arXiv 1706.03762), decoder stack only, with the GPT-2 changes
(pre-norm blocks, GELU, weight tying, residual projections initialised with std 0.02 / sqrt(2 L)).

Options, all off by default (the GPT-2-style model above): rotary position embeddings (Su et al. 2021, arXiv
2104.09864), RMSNorm (Zhang & Sennrich 2019, arXiv 1910.07467), QK-norm (Dehghani et al. 2023, arXiv 2302.05442),
and the MLP as SwiGLU (Shazeer 2020, arXiv 2002.05202) or squared ReLU (So et al. 2021, arXiv 2109.08668).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


class CharTokenizer:
    """Characters <-> ids; the vocabulary is built from the corpus and stored in the checkpoint."""

    def __init__(self, chars):
        self.chars = list(chars)
        self.stoi = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text):
        return cls(sorted(set(text)))

    def encode(self, s):
        return [self.stoi[c] for c in s]

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)

    def unknown(self, s):
        return sorted(set(s) - set(self.stoi))


@dataclass
class GPTConfig:
    vocab_size: int = 65
    block_size: int = 256
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.2
    bias: bool = False
    pos_emb: str = "learned"
    """learned (absolute, GPT-2) | rope (rotary on q and k; attention slides over the last block_size positions)"""
    norm: str = "layernorm"
    """layernorm | rmsnorm"""
    qk_norm: bool = False
    """normalize q and k per head (with `norm`) before the dot product"""
    mlp: str = "gelu"
    """gelu (4C hidden) | swiglu (round(8C/3) hidden, 3 matrices: the same parameters) | relu2 (4C hidden)"""

    def __post_init__(self):
        assert self.pos_emb in ("learned", "rope") and self.norm in ("layernorm", "rmsnorm")
        assert self.mlp in ("gelu", "swiglu", "relu2")
        assert self.pos_emb != "rope" or (self.n_embd // self.n_head) % 2 == 0, "RoPE needs an even head size"


class RMSNorm(nn.Module):
    """Zhang & Sennrich 2019, Eq. (4): x / sqrt(mean(x^2) + eps) * g: LayerNorm without centering or bias."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def make_norm(cfg, dim):
    return RMSNorm(dim) if cfg.norm == "rmsnorm" else nn.LayerNorm(dim, bias=cfg.bias)


def rope_angles(pos, head_size, base=10000.0):
    """RoPE, Su et al. 2021, Eq. (15): position m turns the pair (x_2i, x_2i+1) by the angle m theta_i, with
    theta_i = base^(-2i / d). pos: (T,) absolute positions. Returns (cos, sin), each (T, d / 2)."""
    theta = base ** (-torch.arange(0, head_size, 2, device=pos.device, dtype=torch.float32) / head_size)
    angle = pos.float()[:, None] * theta[None, :]  # (T, d/2)
    return angle.cos(), angle.sin()


def apply_rope(x, cos, sin):
    """Rotate each consecutive pair of x (..., T, d) by its position's angle, Eq. (34):
    (x_2i, x_2i+1) -> (x_2i cos - x_2i+1 sin, x_2i sin + x_2i+1 cos). Then q_m . k_n depends on m - n only."""
    x1, x2 = x[..., 0::2], x[..., 1::2]  # (..., T, d/2) each
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)  # (..., T, d/2, 2)
    return out.flatten(-2).type_as(x)  # (..., T, d)


def causal_mask(Tq, Tk, window, device):
    """(Tq, Tk) bool: the queries are the last Tq of Tk positions; query i (position Tk - Tq + i) sees keys
    Tk - Tq + i - window < j <= Tk - Tq + i (window None: all earlier keys)."""
    mask = torch.ones(Tq, Tk, dtype=torch.bool, device=device).tril(diagonal=Tk - Tq)
    return mask if window is None or window >= Tk else mask.triu(diagonal=Tk - Tq - window + 1)

def attention(q, k, v, causal=True, need_weights=False, dropout=0.0, window=None):
    """Scaled dot-product attention, Eq. (1): softmax(q k^T / sqrt(d_k)) v.

    q: (B, nh, Tq, hs), k/v: (B, nh, Tk, hs) with Tk >= Tq; the queries are the last Tq positions, so with a
    KV cache query i may see keys 0 .. Tk - Tq + i (only the last `window` of them if given: sliding-window
    attention). Returns (y, att) where att is None on the fused path."""
    Tq, Tk = q.size(-2), k.size(-2)
    banded = causal and window is not None and window < Tk
    if not need_weights:  # fused kernel (flash / memory-efficient where available)
        if causal and (banded or (Tq > 1 and Tq != Tk)):
            mask = causal_mask(Tq, Tk, window, q.device)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout), None
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal and Tq > 1, dropout_p=dropout), None
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, nh, Tq, Tk)
    if causal:
        att = att.masked_fill(~causal_mask(Tq, Tk, window, q.device), float("-inf"))
    att = F.softmax(att, dim=-1)
    y = F.dropout(att, dropout) @ v  # (B, nh, Tq, hs)
    return y, att


class CausalSelfAttention(nn.Module):
    """Multi-head attention, Section 3.2.2: heads computed in parallel from one q/k/v projection."""

    def __init__(self, cfg):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        # RoPE: keys carry relative positions, so attention may slide over the last block_size of them
        self.window = cfg.block_size if cfg.pos_emb == "rope" else None
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_drop = nn.Dropout(cfg.dropout)
        if cfg.qk_norm:  # Dehghani et al. 2023, Sec. 3.1: LN(q) LN(k)^T bounds the attention logits
            hs = cfg.n_embd // cfg.n_head
            self.q_norm, self.k_norm = make_norm(cfg, hs), make_norm(cfg, hs)

    def forward(self, x, cache=None, need_weights=False, rope=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:  # (cos, sin) of this step's positions
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:  # append this step's keys/values to the cached ones
            if cache[0] is not None:
                k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
            drop = 0 if self.window is None else max(0, k.size(2) - (self.window - 1))  # RoPE: the oldest go
            cache[0], cache[1] = k[:, :, drop:], v[:, :, drop:]  # keep at most window - 1: no re-fill
        y, att = attention(q, k, v, True, need_weights, self.dropout if self.training else 0.0, self.window)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads: (B, T, C)
        return self.resid_drop(self.c_proj(y)), att


class ReLUSquared(nn.Module):
    """So et al. 2021 (Primer), Sec. 4: relu(x)^2."""

    def forward(self, x):
        return F.relu(x).square()


class SwiGLU(nn.Module):
    """Shazeer 2020, Eq. (6): FFN(x) = (Swish(x W) * x V) W2. Hidden size round(2/3 * 4C), so the three matrices
    hold 3 C round(8C/3) ~ 8 C^2 parameters, those of the two 4C-wide GELU matrices (Sec. 2)."""

    def __init__(self, cfg):
        super().__init__()
        hidden = swiglu_hidden(cfg.n_embd)
        self.c_fc = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)  # W
        self.c_gate = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)  # V
        self.c_proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)  # W2
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.drop(self.c_proj(F.silu(self.c_fc(x)) * self.c_gate(x)))


def swiglu_hidden(n_embd):
    return round(2 * 4 * n_embd / 3)


def make_mlp(cfg):
    if cfg.mlp == "swiglu":
        return SwiGLU(cfg)
    act = ReLUSquared() if cfg.mlp == "relu2" else nn.GELU()
    return nn.Sequential(nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias), act,
                         nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias), nn.Dropout(cfg.dropout))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = make_norm(cfg, cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = make_norm(cfg, cfg.n_embd)
        self.mlp = make_mlp(cfg)

    def forward(self, x, cache=None, need_weights=False, rope=None):
        a, att = self.attn(self.ln_1(x), cache, need_weights, rope)
        x = x + a
        return x + self.mlp(self.ln_2(x)), att


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.pos_emb == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = make_norm(cfg, cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying (Press & Wolf 2017), as in Section 3.4
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by 1/sqrt(2 n_layer)
            if name.endswith("c_proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def num_params(self):
        """Parameters without the position embeddings (nanoGPT's count)."""
        return sum(p.numel() for p in self.parameters()) - (0 if self.wpe is None else self.wpe.weight.numel())

    def forward(self, idx, targets=None, caches=None, need_weights=False, start=None):
        """idx: (B, T) ids at positions start .. start + T - 1 (default: after the cached ones). Returns (logits
        (B, T, V), loss or None, attention maps per layer or None). With RoPE, T may exceed block_size: each layer
        then attends to the last block_size positions (sliding-window attention)."""
        B, T = idx.shape
        past = 0 if caches is None or caches[0][0] is None else caches[0][0].size(2)
        start = past if start is None else start
        pos = torch.arange(start, start + T, device=idx.device)
        if self.wpe is not None:
            assert start + T <= self.cfg.block_size, f"sequence of {start + T} > block size {self.cfg.block_size}"
            x, rope = self.drop(self.wte(idx) + self.wpe(pos)), None  # (B, T, C)
        else:
            x, rope = self.drop(self.wte(idx)), rope_angles(pos, self.cfg.n_embd // self.cfg.n_head)
        atts = []
        for i, block in enumerate(self.blocks):
            x, att = block(x, None if caches is None else caches[i], need_weights, rope)
            atts.append(att)
        x = self.ln_f(x)
        if targets is None:
            return self.lm_head(x), None, (atts if need_weights else None)
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss, (atts if need_weights else None)

    def flops_per_token(self):
        """Training FLOPs per token (forward + backward): 6 N + 12 L T C (PaLM appendix B / nanoGPT)."""
        c = self.cfg
        return 6 * self.num_params() + 12 * c.n_layer * c.block_size * c.n_embd

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, use_cache=True,
                 generator=None):
        """Autoregressive sampling. With the KV cache each step feeds one token. The cache is first filled from the
        last block_size tokens (the window the uncached path sees), so cached and uncached decoding agree while the
        text fits the block; once the cache is full it is rebuilt from the last block_size // 2 tokens (the
        absolute position embeddings must restart), where the uncached path slides a block_size window.

        With RoPE the model attends to the last block_size positions in every layer, so the cache just drops its
        oldest entry at each step (no re-fill) and decoding past the block size equals the uncached forward pass
        over the text; that pass needs only the last n_layer (block_size - 1) + 1 tokens (the receptive field)."""
        bs = self.cfg.block_size
        if self.wpe is None:
            return self._generate_sliding(idx, max_new_tokens, temperature, top_k, top_p, use_cache, generator)
        caches = None
        for _ in range(max_new_tokens):
            if not use_cache:
                logits, _, _ = self(idx[:, -bs:])
            elif caches is None or caches[0][0].size(2) >= bs:  # first fill, or a full cache: (re)fill from a window
                window = bs if caches is None else max(1, bs // 2)  # -0 would slice the whole text
                caches = [[None, None] for _ in self.blocks]
                logits, _, _ = self(idx[:, -window:], caches=caches)
            else:
                logits, _, _ = self(idx[:, -1:], caches=caches)
            idx_next = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)
            idx = torch.cat([idx, idx_next], dim=1)
        return idx

    def _generate_sliding(self, idx, max_new_tokens, temperature, top_k, top_p, use_cache, generator):
        reach = self.cfg.n_layer * (self.cfg.block_size - 1) + 1  # tokens the last position depends on
        caches, n = None, 0  # n: absolute position of the next token fed to the cache
        for _ in range(max_new_tokens):
            if not use_cache:
                logits, _, _ = self(idx[:, -reach:])
            elif caches is None:  # fill from the receptive field; each layer keeps its last block_size - 1 keys
                caches = [[None, None] for _ in self.blocks]
                logits, _, _ = self(idx[:, -reach:], caches=caches)
                n = min(idx.size(1), reach)
            else:
                logits, _, _ = self(idx[:, -1:], caches=caches, start=n)
                n += 1
            idx_next = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)
            idx = torch.cat([idx, idx_next], dim=1)
        return idx


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Pick the next token: greedy at temperature 0, else softmax(logits / T) restricted to the top-k
    tokens and to the smallest set whose probability reaches top-p (nucleus sampling)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep tokens until the mass before them exceeds p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
