"""Score trained GNNs on the test graphs: each flavour's selected checkpoint (out/gnns/<layer>/ckpt.pt), or the shipped
pretrained weights (gnns/pretrained/<layer>.safetensors) where there is no training run.

    python gnns/evaluate.py                            # conv, attn, mpnn on the 10,000 test graphs -> eval.json
    python gnns/evaluate.py --test-limit 1000          # the first 1,000 test graphs
    python gnns/evaluate.py --ckpt out/gnns/mpnn/ckpt.pt
"""
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from gnns.graphs import load_graphs
from gnns.model import GNN, GNNConfig
from gnns.train import evaluate
from utils import data as D
from utils import run as R
from utils import weights as W

LAYERS = ("conv", "attn", "mpnn")
# utils/weights.py: what a shipped file holds (the checkpoint train.py selected on validation), how it is scored
# weights: the selected ones, else (a run without a validation split) the last
EXPORT = {"files": {layer: (f"{layer}/ckpt.pt",) for layer in LAYERS}, "weights": ("best_model", "model"),
          "keys": ("config",)}
SCORE_SUBSET = "the first 1,000 test graphs"


@dataclass
class Config:
    out_dir: str = "out/gnns"
    """the comparison's folder (gnns/sample.py): <layer>/ckpt.pt is read from it, eval.json written to it"""
    layers: list[Literal["conv", "attn", "mpnn"]] = field(default_factory=lambda: list(LAYERS))
    ckpt: str | None = None
    """score this one checkpoint (or shipped file) instead"""
    test_limit: int | None = None
    """the first N test graphs (None: all)"""
    data_dir: str | None = None
    """where the images are (see utils/data.py)"""
    device: str = "auto"

    def check(self):
        R.folder(self.out_dir, "--out-dir")
        R.check(len(self.layers) > 0, "--layers needs at least one of conv, attn, mpnn")
        R.file_exists(self.ckpt, "--ckpt")
        R.check(self.test_limit is None or self.test_limit > 0, f"--test-limit must be positive, got {self.test_limit}")
        R.existing_folder(self.data_dir, "--data-dir")
        R.check_device(self.device)


def build(ckpt):
    return GNN(GNNConfig(**ckpt["model_config"]))


def load(path, device):
    return R.load_model(path, "gnns", build, device, keys=EXPORT["keys"], weights=EXPORT["weights"])


@functools.lru_cache(maxsize=None)  # built (or read from data/) once per process
def test_graphs(dataset, graph, limit, data_dir=None):
    cache = None if dataset.startswith("synthetic") else D.REPO / "data"
    return load_graphs(dataset, "test", graph, data_dir, limit, cache)


def score(model, ckpt):
    """The card's metric (utils/weights.py): accuracy on the first 1,000 test graphs."""
    graphs = test_graphs(ckpt["config"]["dataset"], ckpt["config"]["graph"], 1000)
    return {"test_acc_1000": evaluate(model, graphs, next(model.parameters()).device)[0]}


def main(cfg: Config) -> dict:
    R.validate(cfg)
    device = R.pick_device(cfg.device)
    out = Path(cfg.out_dir)
    paths = [W.pick(cfg.ckpt, out, "gnns")] if cfg.ckpt else [W.pick(None, out, "gnns", layer) for layer in cfg.layers]
    rows = []
    for path in paths:
        model, ckpt = load(path, device)
        dataset, graph = ckpt["config"]["dataset"], ckpt["config"]["graph"]
        graphs = test_graphs(dataset, graph, cfg.test_limit, cfg.data_dir)
        acc, loss = evaluate(model, graphs, device)
        rows.append({"layer": ckpt["model_config"]["layer"], "checkpoint": str(path), "dataset": dataset,
                     "graph": graph, "test_graphs": len(graphs), "test_acc": acc, "test_loss": loss})
        print(f"{rows[-1]['layer']:>4}: test accuracy {acc:.4f} (loss {loss:.4f}) on {len(graphs)} "
              f"{dataset} {graph} graphs")
    R.write_json(out / "eval.json", {"results": rows})
    print(f"-> {out / 'eval.json'}")
    return {"results": rows}


if __name__ == "__main__":
    main(R.parse(Config))
