"""Train a GNN classifier on image graphs (graph property prediction).

    python gnns/train.py --layer mpnn                       # Fashion-MNIST superpixels
    python gnns/train.py --layer attn --dataset cifar10
    python gnns/train.py --layer conv --graph grid          # the seed's pixel-grid graphs
"""
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from gnns.graphs import load_graphs
from gnns.model import BUDGET_HIDDEN, GNN, GNNConfig, num_params
from utils import data as D
from utils import run as R


@dataclass
class Config(R.ImageRunConfig):
    out_dir: str = "out/gnns"
    preset: str = "default"
    """quick | default | paper"""
    layer: str = "mpnn"
    """conv | attn | mpnn"""
    graph: str = "superpixel"
    """superpixel | grid"""
    hidden: int | None = None
    """None: the ~100k-parameter budget size of the chosen layer"""
    num_layers: int = 4
    heads: int = 4
    aggr: str = "sum"
    readout: str = "mean"
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    patience: int = 2
    """reduce-on-plateau: epochs without test-loss improvement before lr halves"""
    train_limit: int | None = None
    """use only the first N training graphs (quick runs, tests)"""
    test_limit: int | None = None


PRESETS = {
    "quick": dict(epochs=2, train_limit=3_000, test_limit=1_000),  # a look at the pipeline (~2 min on 2 cores)
    "default": {},
    "paper": dict(epochs=100, patience=5),  # Benchmarking GNNs trains until the lr falls below 1e-5
}


def loaders(cfg):
    from torch_geometric.loader import DataLoader
    tr = load_graphs(cfg.dataset, "train", cfg.graph, cfg.data_dir, cfg.train_limit)
    te = load_graphs(cfg.dataset, "test", cfg.graph, cfg.data_dir, cfg.test_limit)
    g = torch.Generator().manual_seed(cfg.seed)
    return DataLoader(tr, cfg.batch_size, shuffle=True, generator=g), DataLoader(te, 500), tr[0]


@torch.no_grad()
def evaluate(model, loader, device):
    model.eval()
    correct, loss, n = 0, 0.0, 0
    for b in loader:
        b = b.to(device)
        logits = model(b.x, b.edge_index, b.edge_attr, b.batch, b.num_graphs)
        loss += F.cross_entropy(logits, b.y, reduction="sum").item()
        correct += (logits.argmax(-1) == b.y).sum().item()
        n += b.num_graphs
    model.train()
    return correct / n, loss / n


def main(cfg: Config) -> dict:
    cfg = R.apply_preset(cfg, PRESETS)
    R.check(cfg.layer in BUDGET_HIDDEN, f"unknown layer '{cfg.layer}'; choose conv, attn or mpnn")
    R.check(cfg.graph in ("superpixel", "grid"), "--graph must be superpixel or grid")
    R.check(cfg.aggr in ("sum", "mean", "max") and cfg.readout in ("sum", "mean", "max"),
            "--aggr and --readout must be sum, mean or max")
    R.check(cfg.epochs > 0 and cfg.batch_size > 0, "--epochs and --batch-size must be positive")
    device = R.pick_device(cfg.device)
    R.seed_everything(cfg.seed)
    D.dataset_info(cfg.dataset)  # unknown dataset: clear error before any work
    train_loader, test_loader, g0 = loaders(cfg)
    _, _, classes = D.dataset_info(cfg.dataset)
    mcfg = GNNConfig(layer=cfg.layer, node_dim=g0.x.shape[1], edge_dim=g0.edge_attr.shape[1], num_classes=len(classes),
                     hidden=cfg.hidden or BUDGET_HIDDEN[cfg.layer], num_layers=cfg.num_layers, heads=cfg.heads,
                     aggr=cfg.aggr, readout=cfg.readout)
    model = GNN(mcfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.5, patience=cfg.patience)
    out = Path(cfg.out_dir)
    epoch, best = 0, 0.0
    if cfg.resume:
        ckpt = R.load_checkpoint(out / "ckpt.pt", "gnns", device)
        R.check(ckpt["model_config"]["layer"] == cfg.layer, f"--resume: checkpoint has layer {ckpt['model_config']['layer']}")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        epoch, best = ckpt["epoch"], ckpt["best_test_acc"]
    log = R.Logger(out, cfg, "papers-gnns", cfg.wandb, cfg.resume)
    print(f"{cfg.layer} GNN {num_params(model):,} params | {cfg.dataset} {cfg.graph} graphs "
          f"{len(train_loader.dataset)}/{len(test_loader.dataset)} | {device}")

    def checkpoint():
        R.save_checkpoint({"kind": "gnns", "model": model.state_dict(), "model_config": asdict(mcfg),
                           "config": asdict(cfg), "epoch": epoch, "optimizer": opt.state_dict(),
                           "scheduler": sched.state_dict(), "best_test_acc": best, "test_acc": acc}, out / "ckpt.pt")

    t_start, t_train, seen, acc = time.time(), 0.0, 0, 0.0
    try:
        while epoch < cfg.epochs:
            t0, loss_sum, n = time.perf_counter(), 0.0, 0
            for b in train_loader:
                b = b.to(device)
                loss = F.cross_entropy(model(b.x, b.edge_index, b.edge_attr, b.batch, b.num_graphs), b.y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum, n = loss_sum + loss.item() * b.num_graphs, n + b.num_graphs
            dt = time.perf_counter() - t0
            t_train, seen, epoch = t_train + dt, seen + n, epoch + 1
            acc, test_loss = evaluate(model, test_loader, device)
            sched.step(test_loss)
            best = max(best, acc)
            log.log({"epoch": epoch, "train_loss": loss_sum / n, "test_loss": test_loss, "test_acc": acc,
                     "lr": opt.param_groups[0]["lr"], "graphs_per_s": n / dt}, step=epoch,
                    echo=f"epoch {epoch} | train loss {loss_sum / n:.4f} | test acc {acc:.4f} | {n / dt:.0f} graphs/s")
            checkpoint()
    except KeyboardInterrupt:
        print(f"interrupted in epoch {epoch + 1}: saving {out / 'ckpt.pt'} (continue with --resume)")
        checkpoint()
    summary = {"layer": cfg.layer, "test_acc": acc, "best_test_acc": best, "params": num_params(model),
               "epochs": epoch, "wall_s": round(time.time() - t_start, 1),
               "graphs_per_s": round(seen / max(t_train, 1e-9), 1), "dataset": cfg.dataset, "graph": cfg.graph}
    R.write_json(out / "summary.json", summary)
    log.close()
    print(f"done: {cfg.layer} test acc {acc:.4f} (best {best:.4f}), {summary['params']:,} params, "
          f"{summary['wall_s']} s -> {out}")
    return summary


if __name__ == "__main__":
    main(R.parse(Config, PRESETS))
