"""Pretrained weights shipped in the repo, so every sample/eval script works on a fresh clone before any training.

`<pkg>/pretrained/<name>.safetensors` holds the model's weights only (safetensors: no pickle, nothing runs on load),
its parameters in half precision; `<name>.json` beside it is the card: the model config, the checkpoint fields the
sample script reads (vocabulary, classes, env, ...), the command and commit that trained it, and the metrics of the
shipped file on a fixed small test subset next to those of the training checkpoint.

    python -m utils.weights export --pkg gpt --out-dir out/gpt        # refresh gpt/pretrained/ from a training run
    python -m utils.weights export --pkg gnns --out-dir out/gnns      # all three flavours: conv, attn, mpnn
    python -m utils.weights check                                     # every shipped file loads and scores as its card says

Each package's sample/eval script (SCRIPT below) says how: `EXPORT` (which files of a run, which weights, which
checkpoint fields), `build(ckpt)` (the model from its stored config) and `score(model, ckpt)` (the card's metrics).
"""
import hashlib
import importlib
import json
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


def pick(path, candidates, pkg, name="default"):
    """The checkpoint a sample script reads: `path` (--ckpt) if given, else the first training checkpoint among
    `candidates` that exists, else the shipped weights. Prints which, as the script's first line."""
    if path is not None:
        found, why = Path(path), "--ckpt"
    else:
        found, why = next((Path(c) for c in candidates if Path(c).is_file()), None), "training run"
        if found is None:
            found, why = shipped_path(pkg, name), f"shipped pretrained weights; no training run at {candidates[0]}"
            R.check(found.is_file(), f"no checkpoint at {candidates[0]} and no shipped weights at "
                                     f"{_short(found)} (train first, or pass the right --out-dir / --ckpt)")
    print(f"checkpoint: {_short(found)} ({why})")
    return found


def load(path, kind, keys=()):
    """A shipped file as the checkpoint dict its sample script reads (the card's fields, the weights in float32
    under the card's `weights` key). A corrupt file, a missing card or another package's file exit with one line."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    path = Path(path)
    card_path = path.with_suffix(".json")
    R.check(path.is_file(), f"no weights at {path}")
    try:
        card = json.loads(card_path.read_text())
    except (OSError, ValueError) as e:
        R.die(f"{path}: its card {card_path.name} is missing or unreadable ({type(e).__name__})")
    R.check(isinstance(card, dict) and card.get("pkg") == kind,
            f"{path} holds '{card.get('pkg', 'unknown') if isinstance(card, dict) else 'unknown'}' weights, "
            f"not '{kind}' ones")
    missing = [k for k in ("sha256", "weights", "exact", "model_config", "checkpoint") if k not in card]
    R.check(not missing, f"{card_path} lacks {', '.join(missing)}; restore it with git checkout or export it again")
    try:
        state = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        R.die(f"{path} is not a readable safetensors file ({type(e).__name__}); restore it with git checkout")
    R.check(sha256(path) == card.get("sha256"), f"{path} does not match its card's sha256 (a corrupt or replaced "
                                                f"file); restore it with git checkout or export it again")
    ckpt = {**card["checkpoint"], "kind": kind, "model_config": card["model_config"],
            card["weights"]: {k: v.float() if v.is_floating_point() and k not in card["exact"] else v
                              for k, v in state.items()}}
    missing = [k for k in keys if k not in ckpt]
    R.check(not missing, f"{path} holds only the model's {card['weights']} weights, not {', '.join(missing)}")
    return ckpt


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def export(pkg, out_dir, dtype="float16", command=None, commit=None, hardware=None, root=None):
    """Write <pkg>/pretrained/<name>.safetensors + .json (under `root`, default the repo) for each model of the run
    in `out_dir`; returns the cards."""
    from safetensors.torch import save_file
    script = importlib.import_module(SCRIPT[pkg])
    spec, cards = script.EXPORT, []
    for name, files in spec["files"].items():
        src = next((Path(out_dir) / f for f in files if (Path(out_dir) / f).is_file()), Path(out_dir) / files[-1])
        model, ckpt = R.load_model(src, pkg, script.build, weights=spec["weights"], keys=spec["keys"])
        params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
        state = model.state_dict()  # buffers (BatchNorm and observation statistics, ...) keep their dtype
        half = {k: (v.to(DTYPES[dtype]) if k in params else v).clone().contiguous() for k, v in state.items()}
        dest = shipped_path(pkg, name, root)
        dest.parent.mkdir(parents=True, exist_ok=True)
        save_file(half, dest, metadata={"pkg": pkg, "name": name})
        fields = {k: ckpt[k] for k in spec["keys"]}
        card = {"pkg": pkg, "name": name, "file": dest.name, "bytes": dest.stat().st_size, "sha256": sha256(dest),
                "dtype": dtype, "weights": spec["weights"], "exact": sorted(set(state) - params),
                "params": sum(p.numel() for p in model.parameters()), "model_config": ckpt["model_config"],
                "checkpoint": fields, "source": str(src), "command": command or _command(pkg, ckpt, out_dir),
                "commit": commit or _head(), "hardware": hardware}
        dest.with_suffix(".json").write_text(json.dumps(card, indent=1, default=str) + "\n")
        shipped, _ = R.load_model(dest, pkg, script.build, weights=spec["weights"], keys=spec["keys"])
        card["metrics"] = {"shipped": script.score(shipped, ckpt), "checkpoint": script.score(model, ckpt),
                           "subset": script.SCORE_SUBSET}
        dest.with_suffix(".json").write_text(json.dumps(card, indent=1, default=str) + "\n")
        print(f"{_short(dest)}: {card['bytes'] / 1e6:.2f} MB ({card['params']:,} params, {dtype}) | "
              f"shipped {card['metrics']['shipped']} vs checkpoint {card['metrics']['checkpoint']}")
        cards.append(card)
    return cards


def shipped():
    """[(pkg, path)] of every shipped file."""
    return [(pkg, p) for pkg in SCRIPT for p in sorted((REPO / pkg / "pretrained").glob("*.safetensors"))]


def check_shipped(pkgs=None):
    """Score every shipped file on its fixed subset; returns [(path, card metrics, measured now)]."""
    rows = []
    for pkg, path in shipped():
        if pkgs is None or pkg in pkgs:
            script = importlib.import_module(SCRIPT[pkg])
            model, ckpt = R.load_model(path, pkg, script.build, weights=script.EXPORT["weights"],
                                       keys=script.EXPORT["keys"])
            card = json.loads(path.with_suffix(".json").read_text())
            rows.append((path, card["metrics"]["shipped"], script.score(model, ckpt)))
            print(f"{_short(path)}: card {rows[-1][1]} | now {rows[-1][2]}")
    return rows


def _short(path):
    """A path inside the repo relative to it (as the READMEs write them), any other as given."""
    path = Path(path)
    try:
        return path.resolve().relative_to(REPO)
    except ValueError:
        return path


def _command(pkg, ckpt, out_dir):
    cfg = ckpt.get("config", {})
    return f"python {pkg}/train.py --preset {cfg.get('preset', 'default')} --seed {cfg.get('seed')} --out-dir " \
           f"{out_dir}" + (f" --layer {cfg['layer']}" if pkg == "gnns" else "")


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
    """the commit that trained the run, for the card (default: HEAD)"""
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


if __name__ == "__main__":
    import sys
    args = sys.argv[1:]
    action = args.pop(0) if args and not args[0].startswith("-") else "check"
    R.check(action in ("export", "check"), f"unknown action '{action}'; choose export or check")
    main(R.parse(Config, args=["--action", action, *args]))
