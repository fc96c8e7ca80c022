"""Train a GNN classifier on image graphs (graph property prediction), with Benchmarking GNNs' protocol: the LR
schedule (reduce on plateau), early stopping and the reported checkpoint are all chosen on a validation split of
the training graphs; the test set is evaluated once, at the end, on the selected checkpoint.

    python gnns/train.py --layer mpnn                       # Fashion-MNIST superpixels
    python gnns/train.py --layer attn --dataset cifar10
    python gnns/train.py --layer conv --graph grid          # the seed's pixel-grid graphs
    python gnns/train.py --preset quick                     # 5,000 graphs, 4 epochs: a short run; the pipeline
"""
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from gnns.graphs import load_graphs
from gnns.model import BUDGET_HIDDEN, GNN, GNNConfig, num_params
from utils import data as D
from utils import run as R

TRAIN_IMAGES = {"fashion-mnist": 60_000, "mnist": 60_000, "cifar10": 50_000, "synthetic": 1024}


@dataclass
class Config(R.ImageRunConfig):
    out_dir: str = "out/gnns"
    """ckpt.pt (last epoch + the selected epoch's weights), metrics.jsonl, summary.json"""
    preset: str = "default"
    """quick | default | paper"""
    layer: Literal["conv", "attn", "mpnn"] = "mpnn"
    graph: Literal["superpixel", "grid"] = "superpixel"
    hidden: int | None = None
    """None: the ~100k-parameter budget size of the chosen layer"""
    num_layers: int = 4
    heads: int = 4
    """attention heads (attn only); must divide the hidden size"""
    aggr: Literal["sum", "mean", "max"] = "sum"
    """mpnn aggregation"""
    readout: Literal["sum", "mean", "max"] = "mean"
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    patience: int = 2
    """reduce-on-plateau: epochs without a lower validation loss before the LR halves"""
    min_lr: float = 1e-5
    """early stop once the plateau schedule takes the LR below this (Benchmarking GNNs' rule)"""
    val_size: int | None = None
    """training graphs held out for validation (None: 10%); 0: no split, so no schedule, no early stop, and the
    last epoch is reported"""
    bn_stats_graphs: int = 8192
    """before every evaluation, BatchNorm's population statistics are recomputed from the batch statistics of this
    many training graphs under the current weights (0: keep PyTorch's running averages, which lag the weights)"""
    train_limit: int | None = None
    """use only the first N training images (quick runs, tests); the validation split comes out of these"""
    test_limit: int | None = None

    def check(self):
        super().check()
        R.positive(self, "num_layers", "heads", "epochs", "batch_size", "lr")
        R.nonnegative(self, "weight_decay", "patience", "min_lr", "bn_stats_graphs")
        R.check(self.hidden is None or 2 <= self.hidden <= 4096, f"--hidden must be in [2, 4096], got {self.hidden}")
        R.check(self.num_layers <= 64 and self.heads <= 64, "--num-layers and --heads must be <= 64")
        R.check(self.epochs <= 100_000 and self.batch_size <= 65_536, "--epochs <= 100000 and --batch-size <= 65536")
        R.between(self, "lr", 0, 10, lo_open=True)
        hidden = self.hidden or BUDGET_HIDDEN[self.layer]
        R.check(self.layer != "attn" or hidden % self.heads == 0,
                f"--heads {self.heads} must divide the attention layer's hidden size {hidden} (heads are concatenated)")
        for name in ("train_limit", "test_limit"):
            v = getattr(self, name)
            R.check(v is None or v > 0, f"--{name.replace('_', '-')} must be positive (or None: all), got {v}")
        R.check(self.val_size is None or self.val_size >= 0, f"--val-size must be >= 0, got {self.val_size}")
        n = min(self.train_limit or 10 ** 9, TRAIN_IMAGES["synthetic" if self.dataset.startswith("synthetic")
                                                          else D.base_name(self.dataset)])
        R.check(n - (self.val_size if self.val_size is not None else n // 10) >= 1,
                f"--val-size {self.val_size} leaves nothing to train on ({n} training graphs)")


DEFAULT = Config()
PRESETS = {
    "default": DEFAULT,
    # a short run (~2 min for all three on 2 cores): each flavour clearly above chance, well short of converged
    "quick": replace(DEFAULT, preset="quick", epochs=4, train_limit=5_000, test_limit=1_000),
    "paper": replace(DEFAULT, preset="paper", epochs=100, patience=5),  # Benchmarking GNNs: until the LR < 1e-5
}


def load_data(cfg):
    """(train, val, test) lists of graphs; val is a fixed seeded slice of the training graphs (D.val_split)."""
    cache = None if cfg.dataset.startswith("synthetic") else D.REPO / "data"  # synthetic sets are quick to rebuild
    graphs = load_graphs(cfg.dataset, "train", cfg.graph, cfg.data_dir, cfg.train_limit, cache)
    test = load_graphs(cfg.dataset, "test", cfg.graph, cfg.data_dir, cfg.test_limit, cache)
    train_idx, val_idx = D.val_split(len(graphs), len(graphs) // 10 if cfg.val_size is None else cfg.val_size)
    return [graphs[i] for i in train_idx.tolist()], [graphs[i] for i in val_idx.tolist()], test


def batches(graphs, batch_size, device):
    from torch_geometric.loader import DataLoader
    for b in DataLoader(graphs, batch_size):
        yield b.to(device)


@torch.no_grad()
def evaluate(model, graphs, device, batch_size=500):
    """(accuracy, mean cross-entropy) in eval mode; the model is left in the mode it was given."""
    was = model.training
    model.eval()
    correct, loss = 0, 0.0
    for b in batches(graphs, batch_size, device):
        logits = model(b.x, b.edge_index, b.edge_attr, b.batch, b.num_graphs)
        loss += F.cross_entropy(logits, b.y, reduction="sum").item()
        correct += (logits.argmax(-1) == b.y).sum().item()
    model.train(was)
    return correct / len(graphs), loss / len(graphs)


@torch.no_grad()
def recompute_bn_stats(model, graphs, batch_size, device):
    """BatchNorm's population statistics for the current weights: the average of the batch statistics over fixed
    training batches ("precise BN", Wu & Johnson 2021, arXiv 2105.07576). The running averages PyTorch keeps
    (momentum 0.1) describe the weights of the last ~10 steps; at lr 1e-3 the pre-BN means move by several percent
    of a standard deviation per step, so in eval mode GCN and MPNN lost 10-25 points (see README)."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    was, momenta = model.training, [bn.momentum for bn in norms]
    model.eval()  # everything but the norms: no dropout
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the batches below
        bn.train()
    full = len(graphs) - len(graphs) % batch_size or len(graphs)  # whole batches, as in training
    for b in batches(graphs[:full], batch_size, device):
        model(b.x, b.edge_index, b.edge_attr, b.batch, b.num_graphs)
    for bn, m in zip(norms, momenta):
        bn.momentum = m
    model.train(was)


def main(cfg: Config) -> dict:
    R.validate(cfg)
    R.single_process("GNN training")
    from torch_geometric.loader import DataLoader
    device = R.pick_device(cfg.device)
    R.seed_everything(cfg.seed)
    out = Path(cfg.out_dir)
    ckpt = None
    if cfg.resume:  # checked before any graph is built
        ckpt = R.load_checkpoint(out / "ckpt.pt", "gnns", device, keys=(
            "model", "best_model", "optimizer", "scheduler", "config", "state", "rng", "loader_rng"))
        R.check_resume(ckpt["config"], cfg, ignore=("epochs",))
    train_set, val_set, test_set = load_data(cfg)
    g = torch.Generator().manual_seed(cfg.seed)
    train_loader = DataLoader(train_set, cfg.batch_size, shuffle=True, generator=g)
    bn_graphs = train_set[:cfg.bn_stats_graphs]
    _, _, classes = D.dataset_info(cfg.dataset)
    g0 = train_set[0]
    mcfg = GNNConfig(layer=cfg.layer, node_dim=g0.x.shape[1], edge_dim=g0.edge_attr.shape[1], num_classes=len(classes),
                     hidden=cfg.hidden or BUDGET_HIDDEN[cfg.layer], num_layers=cfg.num_layers, heads=cfg.heads,
                     aggr=cfg.aggr, readout=cfg.readout)
    model = GNN(mcfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.5, patience=cfg.patience)
    # st: where the run is; "batch" > 0 only in a checkpoint written by Ctrl-C / SIGTERM in the middle of an epoch
    st = {"epoch": 0, "batch": 0, "loss_sum": 0.0, "n": 0, "best_epoch": 0, "best_val_acc": -1.0, "stopped": False,
          "train_s": 0.0, "seen": 0}
    best_model = None
    if ckpt is not None:
        R.load_state(model, ckpt["model"], "model")
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        st, best_model = ckpt["state"], ckpt["best_model"]
        R.set_rng_state(ckpt["rng"])
        g.set_state(ckpt["loader_rng"])
    log = R.Logger(out, cfg, "papers-gnns", cfg.wandb, cfg.resume)
    print(f"{cfg.layer} GNN {num_params(model):,} params | {cfg.dataset} {cfg.graph} graphs train/val/test "
          f"{len(train_set)}/{len(val_set)}/{len(test_set)} | {device}")
    epoch_rng = g.get_state()  # the loader's RNG at the start of the epoch in progress: a resume replays its order

    def checkpoint():
        R.save_checkpoint({"kind": "gnns", "model": model.state_dict(), "model_config": asdict(mcfg),
                           "config": asdict(cfg), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                           "state": st, "best_model": best_model, "rng": R.rng_state(), "loader_rng": epoch_rng},
                          out / "ckpt.pt")

    R.sigterm_as_interrupt()
    t_start, interrupted = time.time(), False
    try:
        while st["epoch"] < cfg.epochs and not st["stopped"]:
            t0 = time.perf_counter()
            for i, b in enumerate(R.progress(train_loader, desc=f"epoch {st['epoch'] + 1}", leave=False)):
                if i < st["batch"]:  # resumed mid-epoch: these batches were trained on before the interrupt
                    continue
                b = b.to(device)
                loss = F.cross_entropy(model(b.x, b.edge_index, b.edge_attr, b.batch, b.num_graphs), b.y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                with R.stops_held():  # an update is never saved without the batch count that records it
                    opt.step()
                    st.update(batch=i + 1, loss_sum=st["loss_sum"] + loss.item() * b.num_graphs,
                              n=st["n"] + b.num_graphs)
            dt = time.perf_counter() - t0
            if cfg.bn_stats_graphs:
                recompute_bn_stats(model, bn_graphs, cfg.batch_size, device)
            epoch, row = st["epoch"] + 1, {"epoch": st["epoch"] + 1, "train_loss": st["loss_sum"] / st["n"]}
            echo = f"epoch {epoch} | train loss {row['train_loss']:.4f}"
            if val_set:  # every choice the run makes is made here, on the validation graphs
                row["val_acc"], row["val_loss"] = evaluate(model, val_set, device)
                echo += f" | val acc {row['val_acc']:.4f}"
            with R.stops_held():  # the epoch's bookkeeping as one: a stop before it only redoes the evaluation
                if val_set:
                    sched.step(row["val_loss"])
                    if row["val_acc"] > st["best_val_acc"]:
                        st.update(best_val_acc=row["val_acc"], best_epoch=epoch)
                        best_model = {k: v.detach().clone() for k, v in model.state_dict().items()}
                    st["stopped"] = opt.param_groups[0]["lr"] < cfg.min_lr
                st.update(epoch=epoch, batch=0, loss_sum=0.0, n=0, train_s=st["train_s"] + dt,
                          seen=st["seen"] + st["n"])
                epoch_rng = g.get_state()
                checkpoint()
                row.update(lr=opt.param_groups[0]["lr"], graphs_per_s=len(train_set) / dt)
                log.log(row, step=epoch, echo=echo + f" | lr {row['lr']:.1e} | {row['graphs_per_s']:.0f} graphs/s")
    except KeyboardInterrupt:
        interrupted = True
        print(f"interrupted in epoch {st['epoch'] + 1}: saving {out / 'ckpt.pt'} (continue with --resume)")
        checkpoint()
    summary = {"layer": cfg.layer, "params": num_params(model), "epochs": st["epoch"], "dataset": cfg.dataset,
               "graph": cfg.graph, "train_graphs": len(train_set), "val_graphs": len(val_set),
               "test_graphs": len(test_set), "wall_s": round(time.time() - t_start, 1),
               "graphs_per_s": round(st["seen"] / max(st["train_s"], 1e-9), 1),
               "bn_stats": f"recomputed on {len(bn_graphs)} training graphs" if cfg.bn_stats_graphs
               else "running averages"}
    if interrupted:  # the test set waits for the end of the run
        summary["interrupted"] = True
    else:
        if val_set:
            R.load_state(model, best_model, "selected weights")
            summary.update(selected_on=f"validation accuracy ({len(val_set)} graphs)", selected_epoch=st["best_epoch"],
                           val_acc=st["best_val_acc"], stopped_early=st["stopped"])
        else:
            summary.update(selected_on="nothing: last epoch (--val-size 0)", selected_epoch=st["epoch"])
        summary["test_acc"], summary["test_loss"] = evaluate(model, test_set, device)  # once, on the selected weights
        log.log({"epoch": st["epoch"], "selected_epoch": summary["selected_epoch"], "test_acc": summary["test_acc"],
                 "test_loss": summary["test_loss"]}, step=st["epoch"])
        print(f"done: {cfg.layer} test acc {summary['test_acc']:.4f} at epoch {summary['selected_epoch']} (selected on "
              f"{summary['selected_on']}), {summary['params']:,} params, {summary['wall_s']} s -> {out}")
    R.write_json(out / "summary.json", summary)
    log.close()
    return summary


if __name__ == "__main__":
    main(R.parse(Config, PRESETS))
