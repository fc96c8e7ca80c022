"""Compare the three flavours on the same graphs and parameter budget: a markdown table and training curves.

    python gnns/sample.py --epochs 10                  # trains conv, attn, mpnn in turn -> out/gnns/compare.md
"""
from dataclasses import dataclass, field, replace
from pathlib import Path

from gnns import train
from utils import plot as P
from utils import run as R


@dataclass
class Config(train.Config):
    out_dir: str = "out/gnns"
    """compare.md, curves.png, summary.json, and one sub-folder per flavour"""
    layers: list[str] = field(default_factory=lambda: ["conv", "attn", "mpnn"])


def main(cfg: Config) -> dict:
    cfg = R.apply_preset(cfg, train.PRESETS)
    out = Path(cfg.out_dir)
    results, curves = [], {}
    for layer in cfg.layers:
        tcfg = train.Config(**{k: v for k, v in vars(cfg).items() if k in train.Config.__dataclass_fields__})
        s = train.main(replace(tcfg, layer=layer, out_dir=str(out / layer)))
        results.append(s)
        rows = [r for r in R.read_jsonl(out / layer / "metrics.jsonl") if "test_acc" in r]
        curves[layer] = ([r["epoch"] for r in rows], [r["test_acc"] for r in rows])
    lines = [f"Dataset: {cfg.dataset} {cfg.graph} graphs, {cfg.epochs} epochs, batch {cfg.batch_size}.", "",
             "| flavour | layer | params | test acc | best test acc | train graphs/s | wall s |",
             "|---|---|---|---|---|---|---|"]
    names = {"conv": "convolutional (GCN)", "attn": "attentional (GAT)", "mpnn": "message-passing (MPNN)"}
    for s in results:
        lines.append(f"| {names[s['layer']]} | `{s['layer']}` | {s['params']:,} | {s['test_acc']:.4f} | "
                     f"{s['best_test_acc']:.4f} | {s['graphs_per_s']:.0f} | {s['wall_s']:.0f} |")
    (out / "compare.md").write_text("\n".join(lines) + "\n")
    P.plot_curves(curves, out / "curves.png", xlabel="epoch", ylabel="test accuracy",
                  title=f"{cfg.dataset} {cfg.graph} graphs")
    R.write_json(out / "summary.json", {"results": results})
    print("\n".join(lines))
    return {"results": results}


if __name__ == "__main__":
    main(R.parse(Config, train.PRESETS))
