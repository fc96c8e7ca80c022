"""Compare the three flavours on the same graphs and parameter budget: a markdown table and validation curves.
Every train.py flag applies to all three runs, passed through unchanged; each run selects its checkpoint on the
validation split and evaluates the test set once, on that checkpoint.

    python gnns/sample.py                        # conv, attn, mpnn in turn -> out/gnns/compare.md, curves.png
    python gnns/sample.py --preset quick         # 5,000 graphs, 4 epochs each: a short run
    python gnns/sample.py --seeds 0 1 2          # the comparison per seed in out/gnns/seed<S>/ -> mean +- s.d.
"""
import statistics
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
    seeds: list[int] | None = None
    """run the whole comparison once per seed, in <out_dir>/seed<S>/, and report mean +- s.d. over the seeds
    (None: one comparison with --seed); with --resume a seed whose runs all finished is read, not run again"""

    def check(self):
        super().check()
        R.check(len(self.layers) > 0, "--layers needs at least one of conv, attn, mpnn")
        R.check(self.seeds is None or (len(self.seeds) > 0 and len(set(self.seeds)) == len(self.seeds)
                                       and min(self.seeds) >= 0),
                f"--seeds must be distinct and >= 0, got {self.seeds}")
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
    if cfg.seeds is not None:
        return over_seeds(cfg)
    out = Path(cfg.out_dir)
    results, curves = [], {}
    for layer in cfg.layers:  # with --resume a finished run is read, not evaluated again
        s = cfg.resume and finished_run(cfg, layer) or train.main(train_config(cfg, layer))
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


def finished_run(cfg: Config, layer: str):
    """The summary of `layer`'s run in cfg.out_dir if it finished the requested epochs with these settings (its
    checkpoint at that epoch), else None; finished runs of other settings exit with one line, as --resume would."""
    folder = Path(cfg.out_dir) / layer
    try:
        s = R.read_json(folder / "summary.json")
    except (OSError, ValueError):
        return None
    if not isinstance(s, dict) or "test_acc" not in s or not (s.get("epochs") == cfg.epochs or s.get("stopped_early")):
        return None
    ckpt = R.load_checkpoint(folder / "ckpt.pt", "gnns", keys=("config", "state"))
    R.check_resume(ckpt["config"], train_config(cfg, layer), ignore=("epochs",))
    return s if ckpt["state"].get("epoch") == s["epochs"] else None  # else a later run was cut off: resume it


def over_seeds(cfg: Config) -> dict:
    """The comparison once per seed; a table of mean +- sample s.d. over seeds and the mean validation curves with
    their min-max band."""
    out, runs = Path(cfg.out_dir), {}
    for seed in cfg.seeds:
        one = replace(cfg, seeds=None, seed=seed, out_dir=str(out / f"seed{seed}"))
        r = main(one)["results"]  # with --resume its finished runs are read
        if len(r) < len(cfg.layers):
            print(f"stopped at seed {seed} (continue with --resume)")
            return {"results": runs}
        runs[seed] = r

    def ms(xs):
        return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs) if len(xs) > 1 else 0:.4f}"
    lines = [f"{len(cfg.seeds)} seeds ({', '.join(map(str, cfg.seeds))}); per seed as in seed<S>/compare.md. "
             "Mean ± sample standard deviation over the seeds.", "",
             "| flavour | params | val acc | test acc | test acc per seed | selected epochs | wall s per run |",
             "|---|---|---|---|---|---|---|"]
    curves, table = {}, []
    for i, layer in enumerate(cfg.layers):
        rs = [runs[seed][i] for seed in cfg.seeds]
        val = [r["val_acc"] for r in rs if "val_acc" in r]
        test = [r["test_acc"] for r in rs]
        lines.append(f"| {NAMES[layer]} | {rs[0]['params']:,} | {ms(val) if val else '-'} | **{ms(test)}** | "
                     f"{' / '.join(f'{t:.4f}' for t in test)} | {', '.join(str(r['selected_epoch']) for r in rs)} | "
                     f"{statistics.mean(r['wall_s'] for r in rs):.0f} |")
        table.append({"layer": layer, "test_acc": test, "val_acc": val, "test_mean": statistics.mean(test),
                      "test_sd": statistics.stdev(test) if len(test) > 1 else 0.0})
        key = "val_acc" if cfg.val_size != 0 else "train_loss"
        per_seed = [{r["epoch"]: r[key] for r in R.read_jsonl(out / f"seed{s}" / layer / "metrics.jsonl")
                     if key in r and "train_loss" in r} for s in cfg.seeds]
        epochs = sorted(set.intersection(*(set(c) for c in per_seed)))  # the epochs every seed logged
        cols = [[c[e] for c in per_seed] for e in epochs]
        curves[NAMES[layer]] = (epochs, [statistics.mean(c) for c in cols], [min(c) for c in cols],
                                [max(c) for c in cols])
    (out / "compare.md").write_text("\n".join(lines) + "\n")
    P.plot_curves(curves, out / "curves.png", xlabel="epoch",
                  ylabel="validation accuracy" if cfg.val_size != 0 else "training loss",
                  title=f"{cfg.dataset} {cfg.graph}: mean of {len(cfg.seeds)} seeds, band min-max")
    R.write_json(out / "summary.json", {"seeds": cfg.seeds, "results": table})
    print("\n".join(lines))
    return {"results": runs, "table": table}


if __name__ == "__main__":
    main(R.parse(Config, PRESETS))
