"""Three flavours of GNN layer on edge lists, from least to most expressive (Velickovic 2023, "Everything is
Connected: Graph Neural Networks", arXiv 2301.08210, Section 4):

    h_i = phi(x_i, (+)_{j in N_i} c_ij psi(x_j))              convolutional   (GCN, Kipf & Welling 2017)
    h_i = phi(x_i, (+)_{j in N_i} a(x_i, x_j) psi(x_j))       attentional     (GAT, Velickovic et al. 2018)
    h_i = phi(x_i, (+)_{j in N_i} psi(x_i, x_j, e_ij))        message-passing (MPNN, Gilmer et al. 2017)

edge_index is (2, E) with edge_index[0] = source j and edge_index[1] = target i, as in PyG. Aggregation is done
with index_add / scatter_reduce: no dense N x N adjacency.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


def add_self_loops(edge_index, num_nodes, edge_attr=None):
    """Append (i, i) for every node; self-loop edge features are the mean of the node's incoming ones."""
    loops = torch.arange(num_nodes, device=edge_index.device).repeat(2, 1)
    if edge_attr is not None:
        fill = torch.zeros(num_nodes, edge_attr.shape[1], device=edge_attr.device, dtype=edge_attr.dtype)
        cnt = torch.zeros(num_nodes, device=edge_attr.device, dtype=edge_attr.dtype)
        fill.index_add_(0, edge_index[1], edge_attr)
        cnt.index_add_(0, edge_index[1], torch.ones_like(edge_attr[:, 0]))
        edge_attr = torch.cat([edge_attr, fill / cnt.clamp(min=1)[:, None]])
    return torch.cat([edge_index, loops], dim=1), edge_attr


def segment_softmax(scores, index, num_nodes):
    """softmax of `scores` (E, ...) over the edges that share a target node index[e]."""
    shape = (num_nodes,) + scores.shape[1:]
    idx = index.view(-1, *([1] * (scores.dim() - 1))).expand_as(scores)
    m = torch.full(shape, float("-inf"), device=scores.device, dtype=scores.dtype)
    m = m.scatter_reduce(0, idx, scores, reduce="amax", include_self=True)
    e = (scores - m.gather(0, idx)).exp()  # subtract the per-neighbourhood max for stability
    s = torch.zeros(shape, device=scores.device, dtype=scores.dtype).index_add_(0, index, e)
    return e / s.gather(0, idx)


def aggregate(messages, index, num_nodes, how="sum"):
    """(+)_{j in N_i}: sum, mean or max of the messages arriving at each node."""
    out = torch.zeros(num_nodes, messages.shape[1], device=messages.device, dtype=messages.dtype)
    if how == "max":
        idx = index[:, None].expand_as(messages)
        return out.scatter_reduce(0, idx, messages, reduce="amax", include_self=False)
    out.index_add_(0, index, messages)
    if how == "mean":
        cnt = torch.zeros(num_nodes, device=messages.device, dtype=messages.dtype).index_add_(
            0, index, torch.ones_like(messages[:, 0]))
        out = out / cnt.clamp(min=1)[:, None]
    return out


class ConvLayer(nn.Module):
    """GCN, Kipf & Welling Eq. (2): H' = D^-1/2 (A + I) D^-1/2 H W + b, i.e. c_ij = 1 / sqrt(d_i d_j) fixed by the
    graph structure (d counts the self-loop)."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.lin = nn.Linear(d_in, d_out, bias=False)
        self.bias = nn.Parameter(torch.zeros(d_out))

    def forward(self, x, edge_index, edge_attr=None):
        n = x.shape[0]
        edge_index, _ = add_self_loops(edge_index, n)
        src, dst = edge_index
        deg = torch.zeros(n, device=x.device, dtype=x.dtype).index_add_(0, dst, torch.ones_like(dst, dtype=x.dtype))
        c = deg.rsqrt()[src] * deg.rsqrt()[dst]  # c_ij
        h = self.lin(x)
        return aggregate(c[:, None] * h[src], dst, n) + self.bias


class AttnLayer(nn.Module):
    """GAT, Velickovic et al. Eqs. (1)-(5): a_ij = softmax_j LeakyReLU(a^T [W h_i || W h_j (|| W_e e_ij)]), then
    h_i' = ||_k sum_j a_ij^k W^k h_j over K heads (concatenated, or averaged with concat=False)."""

    def __init__(self, d_in, d_out, heads=4, concat=True, edge_dim=None, negative_slope=0.2, dropout=0.0):
        super().__init__()
        self.heads, self.d_head, self.concat, self.slope, self.dropout = heads, d_out, concat, negative_slope, dropout
        self.lin = nn.Linear(d_in, heads * d_out, bias=False)
        self.att_src = nn.Parameter(torch.empty(1, heads, d_out))
        self.att_dst = nn.Parameter(torch.empty(1, heads, d_out))
        self.lin_edge = nn.Linear(edge_dim, heads * d_out, bias=False) if edge_dim else None
        self.att_edge = nn.Parameter(torch.empty(1, heads, d_out)) if edge_dim else None
        self.bias = nn.Parameter(torch.zeros(heads * d_out if concat else d_out))
        for p in (self.att_src, self.att_dst, self.att_edge):
            if p is not None:
                nn.init.xavier_uniform_(p)

    def forward(self, x, edge_index, edge_attr=None, return_attention=False):
        n, H, C = x.shape[0], self.heads, self.d_head
        edge_index, edge_attr = add_self_loops(edge_index, n, edge_attr if self.lin_edge is not None else None)
        src, dst = edge_index
        h = self.lin(x).view(n, H, C)  # W h: (N, H, C)
        score = (h * self.att_src).sum(-1)[src] + (h * self.att_dst).sum(-1)[dst]  # a^T [W h_j || W h_i]: (E, H)
        if self.lin_edge is not None:
            score = score + (self.lin_edge(edge_attr).view(-1, H, C) * self.att_edge).sum(-1)
        alpha = segment_softmax(F.leaky_relu(score, self.slope), dst, n)  # (E, H), sums to 1 per neighbourhood
        alpha_d = F.dropout(alpha, self.dropout, self.training)
        out = aggregate((alpha_d[..., None] * h[src]).view(-1, H * C), dst, n).view(n, H, C)
        out = out.reshape(n, H * C) if self.concat else out.mean(dim=1)
        out = out + self.bias
        return (out, (edge_index, alpha)) if return_attention else out


class MPNNLayer(nn.Module):
    """Gilmer et al. Eqs. (1)-(2): m_i = (+)_j psi(x_i, x_j, e_ij), x_i' = phi(x_i, m_i), psi and phi MLPs."""

    def __init__(self, d_in, d_out, edge_dim=0, aggr="sum"):
        super().__init__()
        self.aggr = aggr
        self.psi = nn.Sequential(nn.Linear(2 * d_in + edge_dim, d_out), nn.ReLU(), nn.Linear(d_out, d_out))
        self.phi = nn.Sequential(nn.Linear(d_in + d_out, d_out), nn.ReLU(), nn.Linear(d_out, d_out))

    def forward(self, x, edge_index, edge_attr=None):
        src, dst = edge_index
        parts = [x[dst], x[src]] + ([edge_attr] if edge_attr is not None else [])
        messages = self.psi(torch.cat(parts, dim=1))  # psi(x_i, x_j, e_ij): (E, d_out)
        m = aggregate(messages, dst, x.shape[0], self.aggr)
        return self.phi(torch.cat([x, m], dim=1))


def readout(h, batch, num_graphs, how="mean"):
    """Permutation-invariant pooling of node states into one vector per graph."""
    return aggregate(h, batch, num_graphs, how)


@dataclass
class GNNConfig:
    layer: str = "conv"
    """conv | attn | mpnn"""
    node_dim: int = 3
    edge_dim: int = 1
    num_classes: int = 10
    hidden: int = 128
    num_layers: int = 4
    heads: int = 4
    aggr: str = "sum"
    """mpnn aggregation: sum | mean | max"""
    readout: str = "mean"
    dropout: float = 0.0


class GNN(nn.Module):
    """Encoder -> L x (layer, BatchNorm, ReLU, residual) -> readout -> MLP classifier (Benchmarking GNNs' recipe)."""

    def __init__(self, cfg: GNNConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden
        self.encoder = nn.Linear(cfg.node_dim, d)

        def make():
            if cfg.layer == "conv":
                return ConvLayer(d, d)
            if cfg.layer == "attn":
                return AttnLayer(d, d // cfg.heads, heads=cfg.heads, edge_dim=cfg.edge_dim or None)
            return MPNNLayer(d, d, cfg.edge_dim, cfg.aggr)
        self.layers = nn.ModuleList(make() for _ in range(cfg.num_layers))
        self.norms = nn.ModuleList(nn.BatchNorm1d(d) for _ in range(cfg.num_layers))
        self.head = nn.Sequential(nn.Linear(d, d // 2), nn.ReLU(), nn.Linear(d // 2, cfg.num_classes))

    def node_states(self, x, edge_index, edge_attr=None):
        h = self.encoder(x)
        for layer, norm in zip(self.layers, self.norms):
            h = h + F.dropout(F.relu(norm(layer(h, edge_index, edge_attr))), self.cfg.dropout, self.training)
        return h

    def forward(self, x, edge_index, edge_attr, batch, num_graphs):
        return self.head(readout(self.node_states(x, edge_index, edge_attr), batch, num_graphs, self.cfg.readout))


# hidden sizes that put each flavour at ~100k parameters with 4 layers (Benchmarking GNNs' budget)
BUDGET_HIDDEN = {"conv": 146, "attn": 144, "mpnn": 63}


def num_params(model):
    return sum(p.numel() for p in model.parameters())
