"""Score trained GNNs on the test graphs: each flavour's selected checkpoint (out/gnns/<layer>/ckpt.pt), or the shipped
pretrained weights (gnns/pretrained/<layer>.safetensors) where there is no training run.

    python gnns/evaluate.py                            # conv, attn, mpnn on the 10,000 test graphs -> eval.json
    python gnns/evaluate.py --test-limit 1000          # the first 1,000 test graphs
    python gnns/evaluate.py --ckpt out/gnns/mpnn/ckpt.pt
"""
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from gnns.graphs import load_graphs
from gnns.model import GNN, GNNConfig
from gnns.train import evaluate
from utils import data as D
from utils import run as R
from utils import weights as W

LAYERS = ("conv", "attn", "mpnn")
# utils/weights.py: what a shipped file holds (the checkpoint train.py selected on validation), how it is scored
EXPORT = {"files": {layer: (f"{layer}/ckpt.pt",) for layer in LAYERS}, "weights": "best_model",
          "fallback": "model", "keys": ("config",)}  # fallback: the last weights of a run without a validation split
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
    """The checkpoint's selected weights (its last ones after a run without a validation split)."""
    ckpt = R.load_checkpoint(path, "gnns", device, keys=("model_config", "config"))
    weights = "best_model" if ckpt.get("best_model") is not None else "model"
    return R.load_model(path, "gnns", build, device, keys=("config",), weights=weights)


def test_graphs(ckpt, limit, data_dir=None):
    c = ckpt["config"]
    cache = None if c["dataset"].startswith("synthetic") else D.REPO / "data"
    return load_graphs(c["dataset"], "test", c["graph"], data_dir, limit, cache)


def score(model, ckpt, _graphs={}):
    """The card's metric (utils/weights.py): accuracy on the first 1,000 test graphs (built once per process)."""
    key = (ckpt["config"]["dataset"], ckpt["config"]["graph"])
    if key not in _graphs:
        _graphs[key] = test_graphs(ckpt, 1000)
    return {"test_acc_1000": evaluate(model, _graphs[key], next(model.parameters()).device)[0]}


def main(cfg: Config) -> dict:
    R.validate(cfg)
    device = R.pick_device(cfg.device)
    out = Path(cfg.out_dir)
    paths = {"--ckpt": W.pick(cfg.ckpt, [], "gnns")} if cfg.ckpt else {
        layer: W.pick(None, [out / layer / "ckpt.pt"], "gnns", layer) for layer in cfg.layers}
    rows, graphs = [], {}
    for name, path in paths.items():
        model, ckpt = load(path, device)
        key = (ckpt["config"]["dataset"], ckpt["config"]["graph"])
        if key not in graphs:  # built once per dataset, cached in data/
            graphs[key] = test_graphs(ckpt, cfg.test_limit, cfg.data_dir)
        with torch.no_grad():
            acc, loss = evaluate(model, graphs[key], device)
        rows.append({"layer": ckpt["model_config"]["layer"], "checkpoint": str(path), "dataset": key[0],
                     "graph": key[1], "test_graphs": len(graphs[key]), "test_acc": acc, "test_loss": loss})
        print(f"{rows[-1]['layer']:>4}: test accuracy {acc:.4f} (loss {loss:.4f}) on {len(graphs[key])} "
              f"{key[0]} {key[1]} graphs")
    R.write_json(out / "eval.json", {"results": rows})
    print(f"-> {out / 'eval.json'}")
    return {"results": rows}


if __name__ == "__main__":
    main(R.parse(Config))
