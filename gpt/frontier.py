"""Val loss against wall time: the `cpu` baseline (nanoGPT's laptop recipe) and the `modern` preset (RoPE, RMSNorm,
QK-norm, ReLU^2, Muon) trained for the same wall-time budgets, plus each modern option alone on the baseline.

    python gpt/frontier.py                         # budgets 60, 300, 900 s; ablation at 300 s (~1 h 15 on 2 cores)
    python gpt/frontier.py --budgets 30 120 --ablation-budget 0 --text novel.txt

Each configuration is first timed on --calib-iters iterations: seconds per iteration and the fixed cost (the two
evaluations, setup). A budget of b seconds then gets max_iters = (b - fixed) / (seconds per iteration), with the
warmup and cosine schedule of gpt/train.py over exactly those iterations; each run's measured speed sizes that
arm's next run (a 20-iteration warm-up alone missed budgets by -18% to +27%; the ablation arms, run once, still
rely on it, so every run is also compared with the baseline at the wall time it took: `delta_same_wall`). The two
arms alternate budget by budget, so a machine that slows down slows both. Writes summary.json and frontier.png.
"""
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

from gpt import train
from utils import run as R
from utils.plot import plt  # matplotlib on the Agg backend

ABLATIONS = {"rope": dict(pos_emb="rope"), "rmsnorm": dict(norm="rmsnorm"), "qk_norm": dict(qk_norm=True),
             "swiglu": dict(mlp="swiglu"), "relu2": dict(mlp="relu2"), "muon": dict(optimizer="muon")}
SIZES = ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "eval_iters")


@dataclass
class Config:
    out_dir: str = "out/gpt-frontier"
    """summary.json, frontier.png, and one training folder per run"""
    budgets: tuple[float, ...] = (60.0, 300.0, 900.0)
    """wall-time budgets in seconds of the training loop (evaluations included), each trained by both arms"""
    ablation_budget: float = 300.0
    """the budget at which each option of --ablations is added alone to the baseline (0: no ablation)"""
    ablations: tuple[Literal["rope", "rmsnorm", "qk_norm", "swiglu", "relu2", "muon"], ...] = tuple(ABLATIONS)
    text: str | None = None
    """any UTF-8 file; default: the bundled Shakespeare"""
    calib_iters: int = 20
    """iterations of the timed warm-up run that sizes each configuration's schedule"""
    n_layer: int | None = None
    n_head: int | None = None
    n_embd: int | None = None
    block_size: int | None = None
    batch_size: int | None = None
    eval_iters: int | None = None
    """sizes that override both arms' (None: the `cpu` preset's); for a quick check on a small model"""
    device: str = "auto"
    seed: int = 1337

    def check(self):
        R.folder(self.out_dir, "--out-dir")
        R.check(len(self.budgets) > 0 and all(0 < b <= 86400 for b in self.budgets),
                f"--budgets must be seconds in (0, 86400], got {self.budgets}")
        R.between(self, "ablation_budget", 0, 86400)
        R.check(all(a in ABLATIONS for a in self.ablations),
                f"--ablations must be among {', '.join(ABLATIONS)}, got {', '.join(map(str, self.ablations))}")
        R.positive(self, "calib_iters")
        R.check(self.calib_iters <= 10000, f"--calib-iters must be <= 10000, got {self.calib_iters}")
        for name in SIZES:
            R.check(getattr(self, name) is None or getattr(self, name) > 0,
                    f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        R.file_exists(self.text, "--text file")
        R.nonnegative(self, "seed")
        R.check_device(self.device)
        for arm in ("baseline", "modern"):  # the sizes must make a valid training config for both arms
            R.validate(arm_config(self, arm, {}))


def arm_config(cfg, arm, extra):
    """The training config of an arm: the `cpu` (baseline) or `modern` preset, with the given sizes and options."""
    sizes = {k: getattr(cfg, k) for k in SIZES if getattr(cfg, k) is not None}
    base = train.PRESETS["modern" if arm == "modern" else "cpu"]
    return replace(base, text=cfg.text, device=cfg.device, seed=cfg.seed, **sizes, **extra)


def baseline_at(points, wall):
    """The baseline frontier's val loss at `wall` seconds: linear in log(wall) between the two budget runs around
    it; None outside them. Runs miss their budget as the machine's speed drifts (here -18% to +27%), so an arm is
    compared with the baseline at the wall time it actually took, not with the baseline run of the same budget."""
    pts = sorted((w, l) for w, l in points if w > 0)
    for w, l in pts:
        if w == wall:
            return l
    for (w0, l0), (w1, l1) in zip(pts, pts[1:]):
        if w0 < wall < w1:
            return l0 + (l1 - l0) * math.log(wall / w0) / math.log(w1 / w0)
    return None


def main(cfg: Config) -> dict:
    R.validate(cfg)
    out = Path(cfg.out_dir)
    arms = {"baseline": arm_config(cfg, "baseline", {}), "modern": arm_config(cfg, "modern", {})}
    arms.update({f"+{a}": arm_config(cfg, "baseline", ABLATIONS[a]) for a in cfg.ablations})
    timing, runs = {}, []

    def run(arm, budget):
        tcfg = arms[arm]
        if arm not in timing:  # timed warm-up: the cost of an iteration and of everything else
            n = cfg.calib_iters
            s = train.main(replace(tcfg, out_dir=str(out / "calibration" / arm), max_iters=n, eval_interval=n,
                                   log_interval=n, warmup_iters=min(tcfg.warmup_iters, n // 10)))
            per_iter = tcfg.batch_size * tcfg.block_size * tcfg.grad_accum / s["tokens_per_s"]
            timing[arm] = (per_iter, max(0.0, s["wall_s"] - n * per_iter))
        per_iter, fixed = timing[arm]
        iters = max(1, int((budget - fixed) / per_iter))  # the schedule spans exactly the iterations that fit
        s = train.main(replace(tcfg, out_dir=str(out / f"{arm}-{budget:g}s"), max_iters=iters, eval_interval=iters,
                               log_interval=max(1, iters // 10), warmup_iters=min(tcfg.warmup_iters, iters // 10)))
        planned, per_iter = per_iter, tcfg.batch_size * tcfg.block_size * tcfg.grad_accum / s["tokens_per_s"]
        timing[arm] = (per_iter, max(0.0, s["wall_s"] - iters * per_iter))  # the arm's next run: this run's speed
        row = {"arm": arm, "budget_s": budget, "iters": iters, "wall_s": s["wall_s"], "val_loss": s["val_loss"],
               "ms_per_iter": round(1000 * per_iter, 2), "planned_ms_per_iter": round(1000 * planned, 2),
               "params": s["params"]}
        runs.append(row)
        return row

    frontier = {b: {arm: run(arm, b) for arm in ("baseline", "modern")} for b in cfg.budgets}  # alternating
    ablation = {}
    if cfg.ablation_budget > 0:
        b = cfg.ablation_budget
        ablation = dict(frontier.get(b, {}))
        for arm in ("baseline", *[f"+{a}" for a in cfg.ablations], "modern"):
            if arm not in ablation:
                ablation[arm] = run(arm, b)

    base_points = [(frontier[b]["baseline"]["wall_s"], frontier[b]["baseline"]["val_loss"]) for b in cfg.budgets]
    for r in runs:  # each run against the baseline at the wall time it took ("same wall" below)
        at = baseline_at(base_points, r["wall_s"])
        r["delta_same_wall"] = None if at is None else r["val_loss"] - at

    def same(r):
        return "n/a" if r["delta_same_wall"] is None else f"{r['delta_same_wall']:+.4f}"
    print(f"\n{'budget':>8} | {'baseline':>14} | {'modern':>14} | {'delta':>7} | same wall | iters base / modern")
    for b, r in frontier.items():
        base, mod = r["baseline"], r["modern"]
        print(f"{b:>7g}s | {base['val_loss']:.4f} {base['wall_s']:>5.0f} s | {mod['val_loss']:.4f} "
              f"{mod['wall_s']:>5.0f} s | {mod['val_loss'] - base['val_loss']:+7.4f} | {same(mod):>9} | "
              f"{base['iters']} / {mod['iters']}")
    if ablation:
        print(f"\nablation at {cfg.ablation_budget:g} s: each option alone on the baseline")
        for arm, r in ablation.items():
            delta = r["val_loss"] - ablation["baseline"]["val_loss"]
            print(f"{arm:>10} | val loss {r['val_loss']:.4f} | {delta:+.4f} | same wall {same(r):>7} | "
                  f"{r['wall_s']:.0f} s, {r['iters']} iters, {r['ms_per_iter']:.1f} ms/iter")
    fig, ax = plt.subplots(figsize=(6, 4))  # utils.plot.plot_curves draws no markers: one budget would be blank
    for arm, label in (("baseline", "baseline (cpu preset)"), ("modern", "modern preset")):
        ax.plot([frontier[b][arm]["wall_s"] for b in cfg.budgets], [frontier[b][arm]["val_loss"] for b in cfg.budgets],
                "o-", label=label)
    ax.set(xlabel="wall seconds of the training loop (evaluations included)", ylabel="val loss",
           title="gpt: val loss at fixed wall-time budgets")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "frontier.png", dpi=90)
    plt.close(fig)
    summary = {"frontier": [frontier[b][arm] for b in cfg.budgets for arm in ("baseline", "modern")],
               "ablation": list(ablation.values()), "ablation_budget_s": cfg.ablation_budget, "runs": runs,
               "config": asdict(cfg), "arms": {k: asdict(v) for k, v in arms.items()}}
    R.write_json(out / "summary.json", summary)
    print(f"-> {out / 'summary.json'}, {out / 'frontier.png'}")
    return summary


if __name__ == "__main__":
    main(R.parse(Config))
