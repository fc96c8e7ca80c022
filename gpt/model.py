"""A decoder-only Transformer for characters.

Vaswani et al. 2017, "Attention Is All You Need" (arXiv 1706.03762), decoder stack only, with the GPT-2 changes
(pre-norm blocks, GELU, weight tying, residual projections initialised with std 0.02 / sqrt(2 L)).
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


def attention(q, k, v, causal=True, need_weights=False, dropout=0.0):
    """Scaled dot-product attention, Eq. (1): softmax(q k^T / sqrt(d_k)) v.

    q: (B, nh, Tq, hs), k/v: (B, nh, Tk, hs) with Tk >= Tq; the queries are the last Tq positions, so with a
    KV cache query i may see keys 0 .. Tk - Tq + i. Returns (y, att) where att is None on the fused path."""
    Tq, Tk = q.size(-2), k.size(-2)
    if not need_weights:  # fused kernel (flash / memory-efficient where available)
        if causal and Tq > 1 and Tq != Tk:
            mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - Tq)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout), None
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal and Tq > 1, dropout_p=dropout), None
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, nh, Tq, Tk)
    if causal:
        mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - Tq)
        att = att.masked_fill(~mask, float("-inf"))
    att = F.softmax(att, dim=-1)
    y = F.dropout(att, dropout) @ v  # (B, nh, Tq, hs)
    return y, att


class CausalSelfAttention(nn.Module):
    """Multi-head attention, Section 3.2.2: heads computed in parallel from one q/k/v projection."""

    def __init__(self, cfg):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cache=None, need_weights=False):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if cache is not None:  # append this step's keys/values to the cached ones
            if cache[0] is not None:
                k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
            cache[0], cache[1] = k, v
        y, att = attention(q, k, v, True, need_weights, self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads: (B, T, C)
        return self.resid_drop(self.c_proj(y)), att


class Block(nn.Module):
    """Pre-norm residual block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias), nn.GELU(),
                                 nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias), nn.Dropout(cfg.dropout))

    def forward(self, x, cache=None, need_weights=False):
        a, att = self.attn(self.ln_1(x), cache, need_weights)
        x = x + a
        return x + self.mlp(self.ln_2(x)), att


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
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
        return sum(p.numel() for p in self.parameters()) - self.wpe.weight.numel()

    def forward(self, idx, targets=None, caches=None, need_weights=False):
        """idx: (B, T) ids. Returns (logits (B, T, V), loss or None, attention maps per layer or None)."""
        B, T = idx.shape
        past = 0 if caches is None or caches[0][0] is None else caches[0][0].size(2)
        assert past + T <= self.cfg.block_size, f"sequence of {past + T} > block size {self.cfg.block_size}"
        pos = torch.arange(past, past + T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        atts = []
        for i, block in enumerate(self.blocks):
            x, att = block(x, None if caches is None else caches[i], need_weights)
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
        absolute position embeddings must restart), where the uncached path slides a block_size window."""
        bs = self.cfg.block_size
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
