"""Bad input never ends in a traceback or a hang.

Every field of every script's config is fuzzed through the entry point the CLI uses (`R.parse`, in-process):
0, -1, NaN, inf, a huge number, a wrong type, an unknown choice, a missing path, an empty file. A value the
script refuses must exit with code 2 and one `error:` line (tyro's usage box for types and choices); a value it
accepts is run through the script's `main` on a tiny synthetic setup, which must return or exit with code 2,
nothing else, within a time limit. Then the corrupt inputs: truncated, foreign and code-executing checkpoints,
and a resume with other architecture flags. A few subprocess cases check the real exit code end to end.
"""
import dataclasses
import importlib
import os
import pickle
import signal
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest

from utils import run as R

REPO = Path(__file__).resolve().parent.parent
SYN = ["--dataset", "synthetic", "--device", "cpu"]
# A run of a few seconds on synthetic data per script. "{pkg}" is the folder of a finished tiny training run of
# that package (the `trained` fixture), for the scripts that read a checkpoint.
TINY = {
    "gpt.train": ["--text", "{text}", "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16",
                  "--batch-size", "4", "--max-iters", "4", "--eval-interval", "2", "--eval-iters", "1",
                  "--log-interval", "2", "--device", "cpu"],
    "gpt.sample": ["--out-dir", "{gpt}", "--num-samples", "1", "--max-new-tokens", "5", "--device", "cpu"],
    "vit.train": [*SYN, "--patch-size", "7", "--dim", "16", "--depth", "1", "--heads", "2", "--mlp-dim", "32",
                  "--stem", "0", "--epochs", "1", "--batch-size", "128", "--val-size", "128", "--cpu-bf16", "False"],
    "vit.sample": ["--out-dir", "{vit}", "--device", "cpu", "--num-show", "4"],
    "vit.bench": ["--steps", "1", "--batch-size", "4", "--dim", "16", "--depth", "1", "--heads", "2", "--mlp-dim", "32",
                  "--patch-size", "7", "--device", "cpu"],
    "gpt.bench": ["--new-tokens", "5", "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16",
                  "--device", "cpu"],
    "ppo.bench": ["--seeds", "1", "--total-timesteps", "256", "--eval-episodes", "1", "--no-sb3"],
    "ppo.train": ["--total-timesteps", "256", "--num-envs", "2", "--num-steps", "64", "--minibatch-size", "64",
                  "--update-epochs", "1", "--eval-episodes", "1"],
    "ppo.sample": ["--out-dir", "{ppo}", "--episodes", "1"],
    "ddpm.train": [*SYN, "--ch", "8", "--ch-mult", "1", "2", "--num-res-blocks", "1", "--T", "20", "--steps", "2",
                   "--batch-size", "8", "--grid-samples", "4", "--cpu-bf16", "False"],
    "ddpm.sample": ["--out-dir", "{ddpm}", "--num-samples", "2", "--steps", "2", "--gif-frames", "2", "--device", "cpu"],
    "ddpm.evaluate": ["--out-dir", "{ddpm}", "--num-samples", "0", "--nll-images", "4", "--nll-t", "2", "--device",
                      "cpu"],
    "nf.train": [*SYN, "--steps", "3", "--batch-size", "8", "--hidden", "8", "--num-blocks", "1",
                 "--eval-interval", "3", "--eval-batches", "1", "--log-interval", "1", "--val-size", "64"],
    "nf.sample": ["--out-dir", "{nf}", "--device", "cpu", "--num-samples", "4", "--num-test", "8", "--u-draws", "2",
                  "--u-images", "4", "--interp-steps", "2"],
    "gnns.train": [*SYN, "--epochs", "1", "--train-limit", "64", "--hidden", "16", "--num-layers", "1"],
    "gnns.evaluate": ["--ckpt", "{gnns}/ckpt.pt", "--test-limit", "16", "--device", "cpu"],
    "gnns.sample": [*SYN, "--epochs", "1", "--train-limit", "64", "--hidden", "16", "--num-layers", "1",
                    "--layers", "conv"],
}
PARSE_ONLY = {"gpt.bench", "vit.bench", "ppo.bench", "ddpm.bench", "gnns.bench", "gpt.frontier"}  # they time things
SKIP = {"wandb", "resume", "compile", "preset"}  # opt-in logging and compilation; tested apart
PATHS = {"text", "ckpt", "data_dir", "images"}
# What each script accepts of the values above: a value the script must refuse that appears here, or one that
# disappears, fails the test, so removing a check is caught even where the value would run. A new field adds its
# line here, decided on purpose.
ACCEPTED = {
    "ddpm.bench": ["--warmup 0", "--ema-decay 0", "--eta 0", "--seed 0"],
    "ddpm.evaluate": ["--ckpt <empty file>", "--num-samples 0", "--eta 0", "--seed 0"],
    "ddpm.sample": ["--ckpt <empty file>", "--eta 0", "--gif-frames 0", "--seed 0"],
    "ddpm.train": [
        "--seed 0", "--dropout 0", "--warmup 0", "--ema-decay 0", "--sample-interval 0", "--ckpt-interval 0"
    ],
    "gnns.bench": ["--seed 0"],
    "gnns.evaluate": ["--ckpt <empty file>"],
    "gnns.sample": [
        "--seed 0", "--weight-decay 0", "--patience 0", "--min-lr 0", "--val-size 0", "--bn-stats-graphs 0"
    ],
    "gnns.train": ["--seed 0", "--weight-decay 0", "--patience 0", "--min-lr 0", "--val-size 0", "--bn-stats-graphs 0"],
    "gpt.bench": ["--seed 0"],
    "gpt.frontier": ["--ablation-budget 0", "--text <empty file>", "--seed 0"],
    "gpt.sample": ["--ckpt <empty file>", "--prompt /dev/null/missing.file", "--temperature 0", "--seed 0"],
    "gpt.train": [
        "--seed 0", "--text <empty file>", "--dropout 0", "--min-lr 0", "--warmup-iters 0", "--weight-decay 0",
        "--beta1 0", "--beta2 0", "--grad-clip 0"
    ],
    "nf.sample": ["--ckpt <empty file>", "--u-draws 0", "--seed 0"],
    "nf.train": [
        "--seed 0", "--num-scales 0", "--final-couplings 0", "--num-blocks 0", "--single-scale 0", "--warmup 0",
        "--weight-decay 0", "--val-size 0"
    ],
    "ppo.bench": [],
    "ppo.sample": ["--ckpt <empty file>", "--seed 0"],
    "ppo.train": ["--seed 0", "--gae-lambda 0", "--clip-coef 0", "--vf-coef 0", "--ent-coef 0"],
    "vit.bench": [],
    "vit.sample": ["--ckpt <empty file>"],
    "vit.train": [
        "--seed 0", "--dropout 0", "--drop-path 0", "--stem 0", "--weight-decay 0", "--warmup-epochs 0",
        "--label-smoothing 0", "--crop-pad 0", "--erase-p 0", "--val-size 0"
    ],
}
TIME_LIMIT = 120
MISSING = "/dev/null/missing.file"  # not even root can create it


def bad_values(tp, name, empty_file):
    """Values that are wrong for almost any field of this type; a field where one is right accepts it."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return bad_values(next(a for a in args if a is not type(None)), name, empty_file)
    if origin is typing.Literal:
        return ["bogus-choice"]
    if origin in (list, tuple):
        return [["-1"], ["bogus"]]
    if tp is bool:
        return ["maybe"]
    if tp is int:
        return ["0", "-1", str(10 ** 12), "1.5", "x"]
    if tp is float:
        return ["0", "-1", "nan", "inf", "x"]
    if tp is str:
        return [MISSING, str(empty_file)] if name in PATHS else ["", MISSING]
    return []


def fill(args, paths):
    """TINY args with "{pkg}" replaced by that package's trained folder (trained on first use)."""
    return [a.format_map(paths) for a in args]


class Trained(dict):
    """The folder of one finished tiny training run per package, trained when first asked for; and a text file."""

    def __init__(self, root):
        text = root / "text.txt"
        text.write_text("to be, or not to be, that is the question: whether 'tis nobler in the mind to suffer\n" * 30)
        super().__init__(text=str(text))
        self.root = root

    def __missing__(self, pkg):
        mod = importlib.import_module(f"{pkg}.train")
        self[pkg] = str(self.root / pkg)
        mod.main(R.parse(mod.Config, mod.PRESETS, args=fill(TINY[f"{pkg}.train"], self) + ["--out-dir", self[pkg]]))
        return self[pkg]



class Hang(Exception):
    pass


def run_main(mod, cfg):
    """main(cfg): returns None if it returned or exited with code 2, else what went wrong."""
    def alarm(signum, frame):
        raise Hang(f"no result after {TIME_LIMIT} s")
    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(TIME_LIMIT)
    try:
        mod.main(cfg)
    except SystemExit as e:
        return None if e.code == 2 else f"exit code {e.code}"
    except BaseException as e:  # noqa: BLE001 - a traceback is exactly what this test looks for
        return f"{type(e).__name__}: {str(e)[:200]}"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    return None


def tyro_usage(err):
    """tyro's own message for a wrong type or an unknown choice (a box, drawn in ASCII without a terminal)."""
    return "Traceback" not in err and any(s in err for s in ("Error parsing", "Invalid choice", "Unrecognized",
                                                             "usage:"))


def fuzz_cases(mod):
    hints = typing.get_type_hints(mod.Config)
    for f in dataclasses.fields(mod.Config):
        if f.name not in SKIP:
            yield f.name, hints[f.name]


@pytest.mark.parametrize("script", sorted(set(TINY) | PARSE_ONLY))
def test_every_field_refuses_bad_values_with_one_line(script, trained, tmp_path, capsys):
    mod = importlib.import_module(script)
    presets = getattr(mod, "PRESETS", None)
    empty = tmp_path / "empty"
    empty.write_text("")
    base = fill(TINY.get(script, []), trained)
    capsys.readouterr()  # the tiny training's own output
    problems, n, accepted = [], 0, []
    writes_out = "out_dir" in {f.name for f in dataclasses.fields(mod.Config)} and "--out-dir" not in base
    for name, tp in fuzz_cases(mod):
        flag = "--" + name.replace("_", "-")
        for value in bad_values(tp, name, empty):
            n += 1
            args = base + (["--out-dir", str(tmp_path / f"run{n}")] if writes_out else []) + \
                [flag, *(value if isinstance(value, list) else [value])]
            try:
                cfg = R.parse(mod.Config, presets, args=args)
            except SystemExit as e:
                out = capsys.readouterr()
                err = (out.err + out.out).strip()
                if e.code != 2 or "Traceback" in err or not err:
                    problems.append(f"{flag} {value!r}: exit {e.code}, {err[-300:]!r}")
                elif not (err.startswith("error:") and len(err.splitlines()) == 1) and not tyro_usage(err):
                    problems.append(f"{flag} {value!r}: not one error line: {err[:300]!r}")
                continue
            capsys.readouterr()
            shown = " ".join(value) if isinstance(value, list) else value
            accepted.append(f"{flag} {'<empty file>' if shown == str(empty) else shown}")
            if script in PARSE_ONLY:
                continue
            wrong = run_main(mod, cfg)  # accepted: it must run
            capsys.readouterr()
            if wrong:
                problems.append(f"{flag} {value!r} accepted, then {wrong}")
    assert n > 0 and not problems, f"{script}: " + "\n".join(problems)
    assert accepted == ACCEPTED[script], f"{script} accepts {accepted}, expected {ACCEPTED[script]}"


@pytest.mark.parametrize("pkg", ["gpt", "vit", "ppo", "ddpm", "nf", "gnns"])
def test_presets_keep_explicit_values_equal_to_the_default(pkg):
    """One rule: a preset is a complete config and every flag given overrides it, even one equal to the
    dataclass default; the dataclass defaults are the `default` preset."""
    mod = importlib.import_module(f"{pkg}.train")
    assert mod.Config() == mod.PRESETS["default"]
    checked = 0
    for name, p in mod.PRESETS.items():
        for f in dataclasses.fields(mod.Config):
            default = getattr(mod.Config(), f.name)
            if f.name == "preset" or getattr(p, f.name) == default or not isinstance(default, (int, float, str)):
                continue
            assert getattr(R.preset(mod.PRESETS, name, **{f.name: default}), f.name) == default
            flag = "--" + f.name.replace("_", "-")
            args = [flag if default else "--no-" + f.name.replace("_", "-")] if isinstance(default, bool) else \
                [flag, str(default)]
            try:
                cli = R.parse(mod.Config, mod.PRESETS, args=["--preset", name, *args])
            except SystemExit:  # the default does not fit this preset's other fields (e.g. n_embd % n_head)
                continue
            assert getattr(cli, f.name) == default and cli.preset == name, (name, f.name)
            checked += 1
    assert checked > 0


class Boom:
    """Unpickling this would run code that leaves a marker file."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("pkg", ["gpt", "vit", "ppo", "ddpm", "nf"])
def test_corrupt_foreign_and_malicious_checkpoints_are_refused(pkg, trained, tmp_path, capsys):
    mod = importlib.import_module(f"{pkg}.sample")
    good = Path(trained[pkg]) / "ckpt.pt"
    other = Path(trained["gpt" if pkg != "gpt" else "vit"]) / "ckpt.pt"
    marker = tmp_path / "ran"
    cases = {"truncated": good.read_bytes()[:len(good.read_bytes()) // 2], "foreign": other.read_bytes(),
             "random": os.urandom(4096), "malicious": pickle.dumps({"kind": pkg, "model": Boom(marker)})}
    for what, blob in cases.items():
        d = tmp_path / what
        d.mkdir()
        (d / "ckpt.pt").write_bytes(blob)
        args = [a if a != trained[pkg] else str(d) for a in fill(TINY[f"{pkg}.sample"], trained)]
        with pytest.raises(SystemExit) as e:
            mod.main(R.parse(mod.Config, None, args=args))
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.startswith("error:") and len(err.splitlines()) == 1, (what, err)
    assert not marker.exists()  # nothing was executed


ARCH = {"gpt": ("--n-embd", "32"), "vit": ("--dim", "32"), "ppo": ("--hidden", "32"), "ddpm": ("--ch", "16"),
        "nf": ("--hidden", "16")}


@pytest.mark.parametrize("pkg", list(ARCH))
def test_resume_with_other_architecture_names_the_field(pkg, trained, tmp_path, capsys):
    import shutil
    mod = importlib.import_module(f"{pkg}.train")
    run = tmp_path / "run"
    shutil.copytree(trained[pkg], run)
    flag, value = ARCH[pkg]
    args = fill(TINY[f"{pkg}.train"], trained) + ["--out-dir", str(run), "--resume", flag, value]
    with pytest.raises(SystemExit) as e:
        mod.main(R.parse(mod.Config, mod.PRESETS, args=args))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error:") and flag in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("cmd", [
    ["gpt/train.py", "--eval-interval", "0"],
    ["vit/train.py", "--patch-size", "0"],
    ["ppo/train.py", "--threads", "0"],
    ["ddpm/evaluate.py", "--steps", "0"],
    ["nf/sample.py", "--num-test", "0"],
    ["gnns/train.py", "--layer", "attn", "--heads", "5"],
    ["ddpm/train.py", "--dataset", "synthetic", "--batch-size", "2048", "--device", "cpu"],
])
def test_cli_bad_input_exits_2_with_one_line(cmd, tmp_path):
    r = subprocess.run([sys.executable, *cmd, "--out-dir", str(tmp_path / "o")], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    err = r.stderr.strip()
    assert r.returncode == 2 and err.startswith("error:") and len(err.splitlines()) == 1, (r.returncode, err[-500:])
