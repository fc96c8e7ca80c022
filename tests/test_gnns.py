import copy
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gnns import sample, train
from gnns.graphs import grid_graph, load_graphs, superpixel_graph
from gnns.bench import pyg_twin
from gnns.model import (BUDGET_HIDDEN, GNN, AttnLayer, ConvLayer, GNNConfig, MPNNLayer, NeighbourSum, num_params,
                        readout, segment_softmax)
from utils import run as R

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


# ----------------------------------------------------------------------------- training runs on synthetic graphs

_graphs = {}


def cached_load_graphs(*args, **kw):
    """load_graphs, built once per test session for each setting (SLIC takes seconds; the tests share the graphs)."""
    key = (args, tuple(sorted(kw.items())))
    if key not in _graphs:
        _graphs[key] = load_graphs(*args, **kw)
    return _graphs[key]


@pytest.fixture
def fast_graphs(monkeypatch):
    monkeypatch.setattr(train, "load_graphs", cached_load_graphs)


def tiny(out_dir, **kw):
    """A run of a second or two: 64 synthetic graphs (6 of them for validation), a 1-layer model."""
    base = dict(out_dir=str(out_dir), dataset="synthetic", device="cpu", train_limit=64, test_limit=32, epochs=2,
                batch_size=16, hidden=16, num_layers=1)
    return R.preset(train.PRESETS, "default", **{**base, **kw})


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    """Each flavour trained for 6 epochs on 256 synthetic graphs (no validation split: the last epoch is kept)."""
    runs = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "load_graphs", cached_load_graphs)
        for layer in ("conv", "attn", "mpnn"):
            cfg = R.preset(train.PRESETS, "default", out_dir=str(tmp_path_factory.mktemp(layer)), layer=layer,
                           dataset="synthetic", device="cpu", train_limit=256, test_limit=64, val_size=0, epochs=6,
                           batch_size=32, lr=5e-3, hidden=32)
            runs[layer] = (cfg, train.main(cfg))
    return runs


def accuracy(model, graphs, batch_size, batch_stats):
    """Accuracy with BatchNorm in eval mode (population statistics) or with each batch's own statistics."""
    model = copy.deepcopy(model).train(batch_stats)
    for bn in model.norms:
        bn.momentum = 0.0  # batch statistics without touching the stored ones
    correct = 0
    with torch.no_grad():
        for b in train.batches(graphs, batch_size, "cpu"):
            correct += (model(b.x, b.edge_index, b.edge_attr, b.batch, b.num_graphs).argmax(-1) == b.y).sum().item()
    return correct / len(graphs)


@pytest.mark.parametrize("layer", ["conv", "attn", "mpnn"])
def test_eval_mode_accuracy_equals_batch_statistics_accuracy(layer, learned, monkeypatch):
    """Issue 25: the checkpoint's BatchNorm statistics describe what the network saw in training. With PyTorch's
    running averages (bn_stats_graphs=0) eval mode lost 34-76 points here (conv 0.21 vs 0.86)."""
    monkeypatch.setattr(train, "load_graphs", cached_load_graphs)
    cfg, _ = learned[layer]
    ckpt = R.load_checkpoint(Path(cfg.out_dir) / "ckpt.pt", "gnns")
    model = GNN(GNNConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    graphs, _, _ = train.load_data(cfg)
    eval_acc = accuracy(model, graphs, cfg.batch_size, batch_stats=False)
    batch_acc = accuracy(model, graphs, cfg.batch_size, batch_stats=True)
    assert abs(eval_acc - batch_acc) <= 0.04, (eval_acc, batch_acc)


@pytest.mark.parametrize("layer", ["conv", "attn", "mpnn"])
def test_each_flavour_learns_well_above_chance(layer, learned):
    _, s = learned[layer]
    rows = R.read_jsonl(Path(learned[layer][0].out_dir) / "metrics.jsonl")
    assert rows[-2]["train_loss"] < 0.6 * rows[0]["train_loss"]
    assert s["test_acc"] >= 0.6, s  # chance: 0.1 (measured 0.89 / 0.97 / 0.98)


def test_compare_over_seeds_reports_each_seeds_run_and_their_mean(tmp_path, fast_graphs):
    """--seeds runs the comparison per seed in seed<S>/; the table's mean and s.d. are those of the per-seed test
    accuracies each run wrote, and a --resume of finished runs reproduces the table without training again."""
    import statistics
    cfg = R.preset(sample.PRESETS, "default", out_dir=str(tmp_path), dataset="synthetic", epochs=1, train_limit=64,
                   test_limit=32, batch_size=32, device="cpu", hidden=16, num_layers=1, layers=["conv"], seeds=[0, 1])
    res = sample.main(cfg)
    for row in res["table"]:
        per_seed = [R.read_json(tmp_path / f"seed{s}" / row["layer"] / "summary.json")["test_acc"] for s in (0, 1)]
        assert row["test_acc"] == per_seed and row["test_mean"] == pytest.approx(statistics.mean(per_seed))
        assert res["results"][0][0]["layer"] == row["layer"] == "conv"
        assert row["test_sd"] == pytest.approx(statistics.stdev(per_seed))
    table = (tmp_path / "compare.md").read_text()
    assert "2 seeds (0, 1)" in table and table.count("±") == 3  # the header; val and test
    assert (tmp_path / "curves.png").exists() and (tmp_path / "seed1" / "compare.md").exists()
    again = sample.main(dataclasses.replace(cfg, resume=True))
    assert again["table"] == res["table"] and (tmp_path / "compare.md").read_text() == table
    rows = R.read_jsonl(tmp_path / "seed0" / "conv" / "metrics.jsonl")
    assert sum("train_loss" in r for r in rows) == 1 and sum("test_acc" in r for r in rows) == 1  # read, not rerun
    with pytest.raises(SystemExit) as e:  # finished runs of other settings are not averaged in
        sample.main(dataclasses.replace(cfg, resume=True, hidden=8))
    assert e.value.code == 2


def test_smoke_train_and_compare(tmp_path, fast_graphs):
    cfg = R.preset(sample.PRESETS, "default", out_dir=str(tmp_path), dataset="synthetic", epochs=2, train_limit=128,
                   test_limit=32, batch_size=32, device="cpu", lr=3e-3, hidden=16)
    res = sample.main(cfg)
    table = (tmp_path / "compare.md").read_text()
    assert all(k in table for k in ("`conv`", "`attn`", "`mpnn`")) and "validation accuracy" in table
    assert (tmp_path / "curves.png").exists() and (tmp_path / "mpnn" / "ckpt.pt").exists()
    for s in res["results"]:
        assert {"test_acc", "val_acc", "selected_epoch", "params", "wall_s", "graphs_per_s"} <= set(s)
        rows = R.read_jsonl(tmp_path / s["layer"] / "metrics.jsonl")
        assert all("test_acc" not in r for r in rows[:-1]) and "test_acc" in rows[-1]  # the test set once, at the end
        assert rows[-2]["train_loss"] < rows[0]["train_loss"]


def test_compare_passes_every_train_field_through(tmp_path, monkeypatch):
    """Issue 22: `sample.py --preset quick --epochs 10` trained 2 epochs and `--preset paper --patience 2` 5."""
    seen = []

    def fake_main(cfg):
        seen.append(cfg)
        return {"interrupted": True}
    monkeypatch.setattr(train, "main", fake_main)
    for args, want in [(["--preset", "quick", "--epochs", "10"], dict(epochs=10, train_limit=5000, test_limit=1000)),
                       (["--preset", "paper", "--patience", "2"], dict(epochs=100, patience=2)),
                       (["--preset", "quick", "--epochs", "10", "--val-size", "0", "--lr", "0.001"],
                        dict(epochs=10, val_size=0, lr=1e-3, train_limit=5000))]:
        cfg = R.parse(sample.Config, sample.PRESETS, args=args + ["--out-dir", str(tmp_path)])
        seen.clear()
        sample.main(cfg)
        t = seen[0]
        assert {k: getattr(t, k) for k in want} == want
        same = {f.name for f in dataclasses.fields(train.Config)} - {"layer", "out_dir"}
        assert all(getattr(t, k) == getattr(cfg, k) for k in same)
        assert t.layer == "conv" and t.out_dir == str(tmp_path / "conv")


def test_resume_continues_exactly_and_a_finished_run_keeps_its_numbers(tmp_path, fast_graphs):
    """2 epochs in one go == 1 epoch + --resume to 2; resuming the finished run again reports the same test
    accuracy (it wrote test_acc 0.0 before)."""
    full = train.main(tiny(tmp_path / "full"))
    train.main(tiny(tmp_path / "split", epochs=1))
    half = train.main(tiny(tmp_path / "split", resume=True))
    a, b = (R.load_checkpoint(tmp_path / d / "ckpt.pt", "gnns") for d in ("full", "split"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert half["test_acc"] == full["test_acc"] and half["val_acc"] == full["val_acc"]
    again = train.main(tiny(tmp_path / "split", resume=True))
    assert again["test_acc"] == full["test_acc"] and again["epochs"] == 2
    assert R.read_json(tmp_path / "split" / "summary.json")["test_acc"] == full["test_acc"]


@pytest.mark.parametrize("where", ["loss", "update"])
def test_interrupt_mid_epoch_saves_and_resumes_exactly(where, tmp_path, fast_graphs, monkeypatch,
                                                       sigterm_after_update):
    """Ctrl-C (and SIGTERM, which takes the same path) in the middle of an epoch, in a batch's loss or at the end of
    its optimizer update, saves a checkpoint from which --resume ends with the same weights as an uninterrupted
    run."""
    full = train.main(tiny(tmp_path / "full"))
    steps, ce = [0], F.cross_entropy

    def interrupting_ce(*args, **kw):
        if torch.is_grad_enabled():
            steps[0] += 1
            if steps[0] == 6:  # the 2nd of 4 batches of epoch 2
                raise KeyboardInterrupt
        return ce(*args, **kw)
    if where == "loss":
        monkeypatch.setattr(train.F, "cross_entropy", interrupting_ce)
    disarm = sigterm_after_update(5) if where == "update" else (lambda: None)
    cut = train.main(tiny(tmp_path / "cut"))
    disarm()
    assert cut.get("interrupted") and "test_acc" not in cut
    monkeypatch.setattr(train.F, "cross_entropy", ce)
    resumed = train.main(tiny(tmp_path / "cut", resume=True))
    a, b = (R.load_checkpoint(tmp_path / d / "ckpt.pt", "gnns") for d in ("full", "cut"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert resumed["test_acc"] == full["test_acc"]


def test_a_stop_in_the_epoch_bookkeeping_waits_for_its_checkpoint(tmp_path, fast_graphs, monkeypatch):
    """A SIGTERM while epoch 1 steps the plateau schedule waits until the epoch's selection, count and checkpoint
    are done: the resumed run does not step the schedule twice for that epoch and ends like an uninterrupted one."""
    import signal
    full = train.main(tiny(tmp_path / "full"))
    real_step, calls = torch.optim.lr_scheduler.ReduceLROnPlateau.step, []

    def step_then_sigterm(self, *args, **kw):
        real_step(self, *args, **kw)
        calls.append(1)
        if len(calls) == 1:
            signal.raise_signal(signal.SIGTERM)
    monkeypatch.setattr(torch.optim.lr_scheduler.ReduceLROnPlateau, "step", step_then_sigterm)
    cut = train.main(tiny(tmp_path / "cut"))
    assert cut.get("interrupted")
    resumed = train.main(tiny(tmp_path / "cut", resume=True))
    a, b = (R.load_checkpoint(tmp_path / d / "ckpt.pt", "gnns") for d in ("full", "cut"))
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 2
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert resumed["test_acc"] == full["test_acc"]


def test_resume_with_other_architecture_names_the_field(tmp_path, fast_graphs, capsys):
    train.main(tiny(tmp_path, epochs=1))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train.main(tiny(tmp_path, resume=True, hidden=32))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error:") and "--hidden" in err and len(err.splitlines()) == 1


def test_graph_cache_key_holds_the_builder_settings_and_a_corrupt_cache_is_rebuilt(tmp_path, capsys):
    a = load_graphs("synthetic", "test", limit=4, cache_dir=tmp_path, max_nodes=20)
    (cache,) = tmp_path.glob("graphs_*.pt")
    b = load_graphs("synthetic", "test", limit=4, cache_dir=tmp_path, max_nodes=40)
    assert len(list(tmp_path.glob("graphs_*.pt"))) == 2  # another setting: another file, the first not read back
    assert max(g.num_nodes for g in a) <= 20 < max(g.num_nodes for g in b)
    for blob in (b"not a zip file", b"", cache.read_bytes()[:100]):
        cache.write_bytes(blob)
        c = load_graphs("synthetic", "test", limit=4, cache_dir=tmp_path, max_nodes=20)
        assert "rebuilding" in capsys.readouterr().out
        assert all(torch.equal(g.x, h.x) for g, h in zip(a, c))
    d = load_graphs("synthetic", "test", limit=4, cache_dir=tmp_path, max_nodes=20)  # the rebuilt cache is read
    assert "rebuilding" not in capsys.readouterr().out and all(torch.equal(g.x, h.x) for g, h in zip(a, d))


@pytest.mark.parametrize("args,flag", [(["--layer", "attn", "--heads", "5"], "--heads"),
                                       (["--num-layers", "0"], "--num-layers"),
                                       (["--train-limit", "0"], "--train-limit"),
                                       (["--train-limit", "64", "--val-size", "64"], "--val-size"),
                                       (["--hidden", "1"], "--hidden"),
                                       (["--test-limit", "-1"], "--test-limit")])
def test_bad_config_is_one_line_at_parse_time(args, flag, tmp_path, capsys):
    for mod in (train, sample):
        with pytest.raises(SystemExit) as e:
            R.parse(mod.Config, mod.PRESETS, args=args + ["--out-dir", str(tmp_path)])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.startswith("error:") and flag in err and len(err.splitlines()) == 1, err


def test_bad_input_exits_2(tmp_path):
    for args in [["--layer", "transformer"], ["--dataset", "nope"], ["--layer", "attn", "--heads", "5"]]:
        r = subprocess.run([sys.executable, "gnns/train.py", "--out-dir", str(tmp_path), *args], cwd=REPO,
                           capture_output=True, text=True)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    with pytest.raises(SystemExit):
        train.main(tiny(tmp_path, resume=True))


def test_comparison_resume_continues_the_flavours_with_a_checkpoint_and_starts_the_rest(tmp_path):
    """After an interrupt in the second flavour, `sample.py --resume` must resume conv and attn and start mpnn (it
    passed --resume to all three, and mpnn, never started, had no checkpoint to resume)."""
    for layer in ("conv", "attn"):
        (tmp_path / layer).mkdir()
        (tmp_path / layer / "ckpt.pt").write_bytes(b"")
    cfg = R.parse(sample.Config, sample.PRESETS, args=["--out-dir", str(tmp_path), "--resume", "--dataset",
                                                        "synthetic"])
    assert [sample.train_config(cfg, layer).resume for layer in cfg.layers] == [True, True, False]
