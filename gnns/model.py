"""Three flavours of GNN layer on edge lists, from least to most expressive (Velickovic 2023, "Everything is
Connected: Graph Neural Networks", arXiv 2301.08210, Section 4):

    h_i = phi(x_i, (+)_{j in N_i} c_ij psi(x_j))              convolutional   (GCN, Kipf & Welling 2017)
    h_i = phi(x_i, (+)_{j in N_i} a(x_i, x_j) psi(x_j))       attentional     (GAT, Velickovic et al. 2018)
    h_i = phi(x_i, (+)_{j in N_i} psi(x_i, x_j, e_ij))        message-passing (MPNN, Gilmer et al. 2017)

edge_index is (2, E) with edge_index[0] = source j and edge_index[1] = target i, as in PyG. No dense N x N adjacency:
per-edge messages are summed with index_add / scatter_reduce, and sums of per-node vectors weighted by per-edge
coefficients (c_ij, a_ij) are sparse CSR products built from the edge list.
"""
import warnings
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


def csr_rows(dst, src, n):
    """Sort edges into row-major order of the (N, N) matrix with entry (dst, src): returns (order, crow, col), the
    permutation of the edges and the CSR row pointers and column indices. Row i lists i's neighbours j."""
    order = torch.argsort(dst * n + src)
    crow = torch.zeros(n + 1, dtype=torch.int64, device=dst.device)
    crow[1:] = torch.bincount(dst, minlength=n).cumsum(0)
    return order, crow, src[order]


def sparse_matrix(crow, col, values, n):
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the products used here are long stable
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(crow, col, values, (n, n))


class NeighbourSum(torch.autograd.Function):
    """out[i, k] = sum_{j in N(i)} alpha_ijk h[j, k] for every head k, as sparse products instead of an (E, H, C)
    gather-multiply-scatter. Edges must be in row-major order (sorted by target, then source).
    Backward: dL/dh[:, k] = A_k^T dL/dout[:, k] and dL/dalpha_ijk = <dL/dout[i, k], h[j, k]> on the edges only
    (a sampled dense-dense product)."""

    @staticmethod
    def forward(ctx, alpha, h, crow, col, t_order, t_crow, t_col):
        n, H = h.shape[0], h.shape[1]
        ctx.save_for_backward(alpha, h, crow, col, t_order, t_crow, t_col)
        return torch.stack([sparse_matrix(crow, col, alpha[:, k], n) @ h[:, k] for k in range(H)], dim=1)

    @staticmethod
    def backward(ctx, g):
        alpha, h, crow, col, t_order, t_crow, t_col = ctx.saved_tensors
        n, H = h.shape[0], h.shape[1]
        g = g.contiguous()
        grad_h = torch.stack([sparse_matrix(t_crow, t_col, alpha[t_order, k], n) @ g[:, k] for k in range(H)], dim=1)
        pattern = sparse_matrix(crow, col, torch.zeros_like(alpha[:, 0]), n)
        grad_alpha = torch.stack([torch.sparse.sampled_addmm(pattern, g[:, k], h[:, k].T, beta=0.0).values()
                                  for k in range(H)], dim=1)
        return grad_alpha, grad_h, None, None, None, None, None


class ConvLayer(nn.Module):
    """GCN, Kipf & Welling Eq. (2): H' = D^-1/2 (A + I) D^-1/2 H W + b, i.e. c_ij = 1 / sqrt(d_i d_j) fixed by the
    graph structure (d counts the self-loop). The coefficients do not depend on the features, so the sum over each
    neighbourhood is one sparse-matrix product, and the matrix is built once per batch for all layers (`prepare`)."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.lin = nn.Linear(d_in, d_out, bias=False)
        self.bias = nn.Parameter(torch.zeros(d_out))

    @staticmethod
    def prepare(edge_index, edge_attr, n):
        """A_hat = D^-1/2 (A + I) D^-1/2 as a sparse (N, N) matrix with c_ij in row i, column j."""
        src, dst = add_self_loops(edge_index, n)[0]
        deg = torch.bincount(dst, minlength=n).float()
        c = deg.rsqrt()[src] * deg.rsqrt()[dst]  # c_ij
        order, crow, col = csr_rows(dst, src, n)
        return sparse_matrix(crow, col, c[order], n)

    def forward(self, x, edge_index, edge_attr=None, graph=None):
        a_hat = self.prepare(edge_index, edge_attr, x.shape[0]) if graph is None else graph
        return a_hat @ self.lin(x) + self.bias  # h_i' = sum_j c_ij W h_j + b


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

    @staticmethod
    def prepare(edge_index, edge_attr, n):
        """Self-loops (their edge feature: the mean of the node's incoming ones), edges in row-major order, and the
        sparse structure of A and A^T; once per batch for all layers."""
        edge_index, edge_attr = add_self_loops(edge_index, n, edge_attr)
        order, crow, col = csr_rows(edge_index[1], edge_index[0], n)
        edge_index = edge_index[:, order]
        t_order, t_crow, t_col = csr_rows(edge_index[0], edge_index[1], n)
        return edge_index, None if edge_attr is None else edge_attr[order], (crow, col, t_order, t_crow, t_col)

    def forward(self, x, edge_index, edge_attr=None, graph=None, return_attention=False):
        n, H, C = x.shape[0], self.heads, self.d_head
        if graph is None:
            graph = self.prepare(edge_index, edge_attr if self.lin_edge is not None else None, n)
        (src, dst), edge_attr, sparse = graph
        h = self.lin(x).view(n, H, C)  # W h: (N, H, C)
        score = ((h * self.att_src).sum(-1).index_select(0, src) +
                 (h * self.att_dst).sum(-1).index_select(0, dst))  # a^T [W h_i || W h_j], per node then per edge: (E, H)
        if self.lin_edge is not None:  # a_e^T W_e e_ij = e_ij^T (W_e^T a_e): fold a_e into W_e, no (E, H*C) tensor
            w_e = (self.lin_edge.weight.view(H, C, -1) * self.att_edge.view(H, C, 1)).sum(1)  # (H, edge_dim)
            score = score + edge_attr @ w_e.T
        alpha = segment_softmax(F.leaky_relu(score, self.slope), dst, n)  # (E, H), sums to 1 per neighbourhood
        alpha_d = F.dropout(alpha, self.dropout, self.training)
        out = NeighbourSum.apply(alpha_d, h, *sparse)  # h_i' = sum_j alpha_ij W h_j, per head: (N, H, C)
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

    @staticmethod
    def prepare(edge_index, edge_attr, n):
        return edge_index, edge_attr

    def forward(self, x, edge_index, edge_attr=None, graph=None):
        src, dst = edge_index
        # psi's first linear layer on [x_i || x_j || e_ij] = W_i x_i + W_j x_j + W_e e_ij + b: the node terms are
        # computed once per node and then gathered per edge (the same function, fewer multiplications)
        lin, d = self.psi[0], x.shape[1]
        pre = (F.linear(x, lin.weight[:, :d]).index_select(0, dst) + F.linear(x, lin.weight[:, d:2 * d]).index_select(0, src))
        pre = pre + (F.linear(edge_attr, lin.weight[:, 2 * d:], lin.bias) if edge_attr is not None else lin.bias)
        messages = self.psi[2](self.psi[1](pre))  # psi(x_i, x_j, e_ij): (E, d_out)
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
        graph = self.layers[0].prepare(edge_index, edge_attr, x.shape[0])  # the same for every layer: built once
        for layer, norm in zip(self.layers, self.norms):
            h = h + F.dropout(F.relu(norm(layer(h, edge_index, edge_attr, graph))), self.cfg.dropout, self.training)
        return h

    def forward(self, x, edge_index, edge_attr, batch, num_graphs):
        return self.head(readout(self.node_states(x, edge_index, edge_attr), batch, num_graphs, self.cfg.readout))


# hidden sizes that put each flavour at ~100k parameters with 4 layers (Benchmarking GNNs' budget)
BUDGET_HIDDEN = {"conv": 146, "attn": 144, "mpnn": 63}


def num_params(model):
    return sum(p.numel() for p in model.parameters())
