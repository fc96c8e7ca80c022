import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from gnns import sample, train
from gnns.graphs import grid_graph, superpixel_graph
from gnns.bench import pyg_twin
from gnns.model import (BUDGET_HIDDEN, GNN, AttnLayer, ConvLayer, GNNConfig, MPNNLayer, NeighbourSum, num_params,
                        readout, segment_softmax)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_graph(n=12, e=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    ei = torch.randint(0, n, (2, e), generator=g)
    ei = ei[:, ei[0] != ei[1]]  # no self-loops in the input (the layers add their own)
    ei = torch.unique(ei, dim=1)
    return torch.randn(n, 8, generator=g), ei, torch.rand(ei.shape[1], 1, generator=g)


LAYERS = {"conv": lambda: ConvLayer(8, 6), "attn": lambda: AttnLayer(8, 3, heads=2, edge_dim=1),
          "mpnn-sum": lambda: MPNNLayer(8, 6, 1, "sum"), "mpnn-max": lambda: MPNNLayer(8, 6, 1, "max")}


@pytest.mark.parametrize("name", list(LAYERS))
def test_permutation_equivariance(name):
    torch.manual_seed(0)
    layer = LAYERS[name]().eval()
    x, ei, ea = random_graph()
    perm = torch.randperm(x.shape[0])
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(len(perm))
    eperm = torch.randperm(ei.shape[1])
    out = layer(x, ei, ea)
    out_p = layer(x[perm], inv[ei][:, eperm], ea[eperm])  # relabel nodes, shuffle edges
    assert torch.allclose(out_p, out[perm], atol=1e-5)


def test_readout_invariance():
    h = torch.randn(10, 4)
    batch = torch.tensor([0] * 4 + [1] * 6)
    perm = torch.randperm(10)
    for how in ("sum", "mean", "max"):
        assert torch.allclose(readout(h[perm], batch[perm], 2, how), readout(h, batch, 2, how), atol=1e-6)


def test_conv_matches_pyg_gcnconv():
    from torch_geometric.nn import GCNConv
    torch.manual_seed(0)
    x, ei, _ = random_graph()
    ours, ref = ConvLayer(8, 6), GCNConv(8, 6)
    with torch.no_grad():
        ref.lin.weight.copy_(ours.lin.weight)
        ours.bias.normal_()
        ref.bias.copy_(ours.bias)
    assert torch.allclose(ours(x, ei), ref(x, ei), atol=1e-5)


@pytest.mark.parametrize("edge_dim,concat", [(None, True), (1, True), (1, False)])
def test_attn_matches_pyg_gatconv(edge_dim, concat):
    from torch_geometric.nn import GATConv
    torch.manual_seed(0)
    x, ei, ea = random_graph()
    ours = AttnLayer(8, 3, heads=2, concat=concat, edge_dim=edge_dim)
    ref = GATConv(8, 3, heads=2, concat=concat, edge_dim=edge_dim)
    with torch.no_grad():
        ours.bias.normal_()
        ref_params = dict(ref.named_parameters())
        for n, p in ours.named_parameters():
            ref_params[n].copy_(p)
    a = ours(x, ei, ea if edge_dim else None)
    b = ref(x, ei, ea if edge_dim else None)
    assert torch.allclose(a, b, atol=1e-5)


def test_neighbour_sum_gradients_match_gather_scatter():
    """The sparse-product head sum (and its hand-written backward) against index_add on gathered messages."""
    torch.manual_seed(0)
    x, ei, _ = random_graph()
    n = x.shape[0]
    (src, dst), _, sparse = AttnLayer.prepare(ei, None, n)
    alpha = torch.rand(src.shape[0], 2, dtype=torch.float64, requires_grad=True)
    h = torch.randn(n, 2, 3, dtype=torch.float64, requires_grad=True)
    ref = torch.zeros(n, 2, 3, dtype=torch.float64).index_add_(0, dst, alpha[..., None] * h[src])
    assert torch.allclose(NeighbourSum.apply(alpha, h, *sparse), ref)
    assert torch.autograd.gradcheck(lambda a, b: NeighbourSum.apply(a, b, *sparse), (alpha, h))


@pytest.mark.parametrize("layer", ["conv", "attn", "mpnn"])
def test_whole_model_matches_pyg_twin(layer):
    """The full GNN (shared per-batch preparation, sparse products, split psi) against the same model built from
    PyG's GCNConv / GATConv / a MessagePassing MPNN with the same weights: outputs and gradients."""
    torch.manual_seed(0)
    x, ei, ea = random_graph(n=20, e=80)
    cfg = GNNConfig(layer=layer, node_dim=8, hidden=16, num_layers=2, heads=2)
    ours, ref = GNN(cfg).eval(), pyg_twin(cfg).eval()

    def ref_name(name):  # PyG's conv layers sit one module deeper in the twin
        return name if layer == "mpnn" else name.replace("layers.0.", "layers.0.conv.").replace("layers.1.", "layers.1.conv.")
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.3)  # non-zero biases too
        ref_params = dict(ref.named_parameters())
        for name, p in ours.named_parameters():
            ref_params[ref_name(name)].copy_(p)
    batch = torch.tensor([0] * 12 + [1] * 8)
    a, b = ours(x, ei, ea, batch, 2), ref(x, ei, ea, batch, 2)
    assert torch.allclose(a, b, atol=1e-5)
    a.square().sum().backward()
    b.square().sum().backward()
    grads = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        assert torch.allclose(p.grad, grads[ref_name(name)].grad, atol=1e-4), name


def test_segment_softmax_sums_to_one():
    scores = torch.randn(30, 3)
    index = torch.randint(0, 7, (30,))
    a = segment_softmax(scores, index, 7)
    sums = torch.zeros(7, 3).index_add_(0, index, a)
    present = torch.bincount(index, minlength=7) > 0
    assert torch.allclose(sums[present], torch.ones(int(present.sum()), 3), atol=1e-6)


def test_superpixel_builder_on_synthetic_image():
    img = np.zeros((1, 28, 28), np.uint8)
    img[0, 7:21, 7:21] = 255  # a bright square on black
    x, ei, ea = superpixel_graph(img)
    n = x.shape[0]
    assert 10 <= n <= 75 and x.shape[1] == 3
    pairs = set(map(tuple, ei.T.tolist()))
    assert all((j, i) in pairs for i, j in pairs) and all(i != j for i, j in pairs)  # symmetric, no self-loops
    assert ((ea > 0) & (ea <= 1)).all() and (x[:, 1:] >= 0).all() and (x[:, 1:] <= 1).all()
    assert (np.bincount(ei[1], minlength=n) >= 8).all()  # every node keeps its 8 nearest neighbours
    rgb = np.random.default_rng(0).integers(0, 255, (3, 32, 32), dtype=np.uint8)
    assert superpixel_graph(rgb, max_nodes=150)[0].shape[0] <= 150
    gx, gei, _ = grid_graph(img)
    assert gx.shape == (784, 3) and gei.shape[1] == 2 * (2 * 27 * 28 + 2 * 27 * 27)


def test_budget_is_about_100k():
    for layer, h in BUDGET_HIDDEN.items():
        assert 85_000 <= num_params(GNN(GNNConfig(layer=layer, hidden=h))) <= 115_000


def test_smoke_train_and_compare(tmp_path):
    res = sample.main(sample.Config(out_dir=str(tmp_path), dataset="synthetic", epochs=3, train_limit=256,
                                    test_limit=128, batch_size=32, device="cpu", lr=3e-3))
    table = (tmp_path / "compare.md").read_text()
    assert all(k in table for k in ("`conv`", "`attn`", "`mpnn`"))
    assert (tmp_path / "curves.png").exists() and (tmp_path / "mpnn" / "ckpt.pt").exists()
    for s in res["results"]:
        assert {"test_acc", "params", "wall_s", "graphs_per_s"} <= set(s)
        rows = [r for r in train.R.read_jsonl(tmp_path / s["layer"] / "metrics.jsonl")]
        assert rows[-1]["train_loss"] < rows[0]["train_loss"]


def test_bad_input_exits_2(tmp_path):
    for args in [["--layer", "transformer"], ["--dataset", "nope"]]:
        r = subprocess.run([sys.executable, "gnns/train.py", "--out-dir", str(tmp_path), *args], cwd=REPO,
                           capture_output=True, text=True)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    with pytest.raises(SystemExit):
        train.main(train.Config(out_dir=str(tmp_path), resume=True, dataset="synthetic", train_limit=64,
                                test_limit=64))
