"""Training throughput of our layers next to the same models built from PyG's layers, on the same graphs.

    python gnns/bench.py                      # Fashion-MNIST superpixels, all three flavours -> out/gnns_bench/

The twins differ only in the layer: PyG's GCNConv, GATConv (with the edge feature) and a MessagePassing MPNN with
our psi/phi MLPs; encoder, norms, readout and head are the same modules, and the parameter counts are equal. Both see
the same pre-collated batches (collation is not timed) and take a full Adam step; rounds alternate between the two
so that drift in the machine's speed hits both alike. Prints graphs/s and the ratio ours / PyG; writes summary.json.
"""
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from gnns.graphs import load_graphs
from gnns.model import BUDGET_HIDDEN, GNN, GNNConfig, num_params
from utils import data as D
from utils import run as R


@dataclass
class Config:
    dataset: str = "fashion-mnist"
    """fashion-mnist | mnist | cifar10 | synthetic[-mnist|-cifar10]"""
    data_dir: str | None = None
    layers: list[Literal["conv", "attn", "mpnn"]] = field(default_factory=lambda: ["conv", "attn", "mpnn"])
    batch_size: int = 128
    batches: int = 20
    """distinct batches per round (the first batches x batch_size training graphs)"""
    rounds: int = 3
    """timed rounds per model, alternating ours / PyG (one more, untimed, warms up)"""
    device: str = "cpu"
    seed: int = 0
    out_dir: str = "out/gnns_bench"
    """summary.json goes here"""

    def check(self):
        R.check(bool(str(self.out_dir).strip()), "--out-dir must not be empty")
        R.folder(self.out_dir, "--out-dir")
        R.check(len(self.layers) > 0, "--layers needs at least one of conv, attn, mpnn")
        R.positive(self, "batch_size", "batches", "rounds")
        R.check(self.batch_size * self.batches <= 100_000 and self.rounds <= 1000,
                "--batches x --batch-size must be <= 100000 graphs and --rounds <= 1000")
        R.nonnegative(self, "seed")
        R.check_device(self.device)
        from utils.data import base_name
        base_name(self.dataset)
        R.existing_folder(self.data_dir, "--data-dir")


def pyg_layer(cfg: GNNConfig):
    """The PyG layer that does what ours does, behind our layer's call signature (x, edge_index, edge_attr)."""
    from torch_geometric.nn import GATConv, GCNConv, MessagePassing
    d = cfg.hidden

    class Conv(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = GCNConv(d, d)

        def forward(self, x, edge_index, edge_attr=None, graph=None):
            return self.conv(x, edge_index)  # edge weights ignored, as in ours and Benchmarking GNNs

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = GATConv(d, d // cfg.heads, heads=cfg.heads, edge_dim=cfg.edge_dim or None)

        def forward(self, x, edge_index, edge_attr=None, graph=None):
            return self.conv(x, edge_index, edge_attr)

    class MPNN(MessagePassing):
        def __init__(self):
            super().__init__(aggr=cfg.aggr)
            self.psi = nn.Sequential(nn.Linear(2 * d + cfg.edge_dim, d), nn.ReLU(), nn.Linear(d, d))
            self.phi = nn.Sequential(nn.Linear(2 * d, d), nn.ReLU(), nn.Linear(d, d))

        def forward(self, x, edge_index, edge_attr=None, graph=None):
            return self.phi(torch.cat([x, self.propagate(edge_index, x=x, edge_attr=edge_attr)], dim=1))

        def message(self, x_i, x_j, edge_attr):
            return self.psi(torch.cat([x_i, x_j, edge_attr], dim=1))

    return {"conv": Conv, "attn": Attn, "mpnn": MPNN}[cfg.layer]()


def pyg_twin(cfg: GNNConfig):
    model = GNN(cfg)
    model.layers = nn.ModuleList(pyg_layer(cfg) for _ in range(cfg.num_layers))
    model.layers[0].prepare = lambda edge_index, edge_attr, n: None  # PyG's layers redo their preprocessing each time
    return model


def time_rounds(models, batches, rounds):
    """Seconds each model spends on `rounds` passes over the batches (forward, backward, Adam step)."""
    opts = [torch.optim.Adam(m.parameters(), 1e-3) for m in models]
    spent = [0.0] * len(models)
    for r in range(rounds + 1):
        for i, (m, opt) in enumerate(zip(models, opts)):
            t0 = time.perf_counter()
            for b in batches:
                loss = F.cross_entropy(m(b.x, b.edge_index, b.edge_attr, b.batch, b.num_graphs), b.y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            if r:  # round 0 warms up
                spent[i] += time.perf_counter() - t0
    return spent


def main(cfg: Config) -> dict:
    R.validate(cfg)
    from torch_geometric.loader import DataLoader
    device = R.pick_device(cfg.device)
    cache = None if cfg.dataset.startswith("synthetic") else D.REPO / "data"
    graphs = load_graphs(cfg.dataset, "train", data_dir=cfg.data_dir, limit=cfg.batches * cfg.batch_size,
                         cache_dir=cache)
    batches = [b.to(device) for b in DataLoader(graphs, cfg.batch_size)]
    n_graphs = sum(b.num_graphs for b in batches) * cfg.rounds
    rows = []
    for layer in cfg.layers:
        mcfg = GNNConfig(layer=layer, node_dim=graphs[0].x.shape[1], edge_dim=graphs[0].edge_attr.shape[1],
                         hidden=BUDGET_HIDDEN[layer])
        torch.manual_seed(cfg.seed)
        ours = GNN(mcfg).to(device)
        torch.manual_seed(cfg.seed)
        ref = pyg_twin(mcfg).to(device)
        R.check(num_params(ours) == num_params(ref), f"{layer}: twin has {num_params(ref)} params, ours {num_params(ours)}")
        t_ours, t_ref = time_rounds([ours, ref], batches, cfg.rounds)
        row = {"layer": layer, "params": num_params(ours), "ours_graphs_per_s": round(n_graphs / t_ours, 1),
               "pyg_graphs_per_s": round(n_graphs / t_ref, 1), "ratio": round(t_ref / t_ours, 3)}
        rows.append(row)
        print(f"{layer:5s} {row['params']:,} params | ours {row['ours_graphs_per_s']:.0f} graphs/s | "
              f"PyG {row['pyg_graphs_per_s']:.0f} graphs/s | ratio {row['ratio']:.2f}", flush=True)
    summary = {"results": rows, "device": str(device), "threads": torch.get_num_threads(), "batch_size": cfg.batch_size,
               "graphs_timed_per_model": n_graphs, "dataset": cfg.dataset}
    R.write_json(Path(cfg.out_dir) / "summary.json", summary)
    return summary


if __name__ == "__main__":
    main(R.parse(Config))
