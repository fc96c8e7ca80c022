"""Compare the three flavours on the same graphs and parameter budget: a markdown table and validation curves.
Every train.py flag applies to all three runs, passed through unchanged; each run selects its checkpoint on the
validation split and evaluates the test set once, on that checkpoint.

    python gnns/sample.py                        # conv, attn, mpnn in turn -> out/gnns/compare.md, curves.png
    python gnns/sample.py --preset quick         # 5,000 graphs, 4 epochs each: a short run
"""
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Literal

from gnns import train
from utils import plot as P
from utils import run as R

NAMES = {"conv": "convolutional (GCN)", "attn": "attentional (GAT)", "mpnn": "message-passing (MPNN)"}


@dataclass
class Config(train.Config):
    out_dir: str = "out/gnns"
    """compare.md, curves.png, summary.json, and one sub-folder per flavour"""
    layers: list[Literal["conv", "attn", "mpnn"]] = field(default_factory=lambda: ["conv", "attn", "mpnn"])
    """the flavours to train (--layer is ignored here)"""

    def check(self):
        super().check()
        R.check(len(self.layers) > 0, "--layers needs at least one of conv, attn, mpnn")
        for layer in self.layers:
            train_config(self, layer).check()


PRESETS = {name: Config(**asdict(p)) for name, p in train.PRESETS.items()}  # train's presets, with all three layers


def train_config(cfg: Config, layer: str) -> train.Config:
    """The train.Config of one flavour's run: every train field of `cfg` unchanged but the layer, the folder, and
    --resume, which continues the flavours that have a checkpoint and starts the ones an interrupt never reached."""
    tcfg = train.Config(**{f.name: getattr(cfg, f.name) for f in fields(train.Config)})
    folder = Path(cfg.out_dir) / layer
    return replace(tcfg, layer=layer, out_dir=str(folder), resume=cfg.resume and (folder / "ckpt.pt").is_file())


def main(cfg: Config) -> dict:
    R.validate(cfg)
    out = Path(cfg.out_dir)
    results, curves = [], {}
    for layer in cfg.layers:
        s = train.main(train_config(cfg, layer))
        if s.get("interrupted"):
            print(f"comparison stopped: the {layer} run was interrupted (continue it with --resume)")
            break
        results.append(s)
        rows = [r for r in R.read_jsonl(out / layer / "metrics.jsonl") if "train_loss" in r]
        key = "val_acc" if cfg.val_size != 0 else "train_loss"
        curves[layer] = ([r["epoch"] for r in rows], [r[key] for r in rows])
    if not results:
        return {"results": results}
    selected = results[0]["selected_on"]
    lines = [f"Dataset: {cfg.dataset} {cfg.graph} graphs ({results[0]['train_graphs']} train / "
             f"{results[0]['val_graphs']} validation / {results[0]['test_graphs']} test), up to {cfg.epochs} epochs, "
             f"batch {cfg.batch_size}. Checkpoint selected on {selected}; test set evaluated once, on it.", "",
             "| flavour | layer | params | epochs | selected epoch | val acc | test acc | train graphs/s | wall s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in results:
        val = f"{s['val_acc']:.4f}" if "val_acc" in s else "-"
        lines.append(f"| {NAMES[s['layer']]} | `{s['layer']}` | {s['params']:,} | {s['epochs']} "
                     f"| {s['selected_epoch']} | {val} | {s['test_acc']:.4f} | {s['graphs_per_s']:.0f} | {s['wall_s']:.0f} |")
    (out / "compare.md").write_text("\n".join(lines) + "\n")
    P.plot_curves(curves, out / "curves.png", xlabel="epoch",
                  ylabel="validation accuracy" if cfg.val_size != 0 else "training loss",
                  title=f"{cfg.dataset} {cfg.graph} graphs")
    R.write_json(out / "summary.json", {"selected_on": selected, "test_set": "evaluated once per run, on the "
                                        "selected checkpoint", "results": results})
    print("\n".join(lines))
    return {"results": results}


if __name__ == "__main__":
    main(R.parse(Config, PRESETS))
