"""Shipped pretrained weights (utils/weights.py): each sample/eval script runs on them on a fresh clone, they load
into today's model code with strict key matching, they score what their card says, and a bad file exits with one
line. The export path is checked end to end on a tiny run of every package."""
import importlib
import json

import pytest
import torch

from test_bad_input import TINY, fill
from utils import run as R
from utils import weights as W

SHIPPED = {"gnns": ["attn", "conv", "mpnn"], "gpt": ["default"], "ppo": ["default"]}  # what the repo ships today; a loss fails here
TOLERANCE = {"test_acc_1000": 0.003, "return_5": 1.0, "val_loss_16": 2e-3, "test_bpd_100": 2e-3, "loss_128": 2e-3}
# the sample/eval script of each package on its shipped weights, with small counts: (module, args, expected file)
RUN = {"gnns": ("gnns.evaluate", ["--test-limit", "50", "--device", "cpu"], "eval.json"),
       "ppo": ("ppo.sample", ["--episodes", "1", "--render", "none"], "eval.json"),  # the GIF: test_bad_input
       "gpt": ("gpt.sample", ["--num-samples", "1", "--max-new-tokens", "20", "--device", "cpu"], "generated.txt"),
       "vit": ("vit.sample", ["--device", "cpu", "--num-show", "4"], "eval.json"),
       "nf": ("nf.sample", ["--device", "cpu", "--num-samples", "4", "--num-test", "8", "--u-draws", "0",
                            "--interp-steps", "2"], "samples_ranked.png"),
       "ddpm": ("ddpm.sample", ["--num-samples", "2", "--sampler", "ddim", "--steps", "2", "--gif-frames", "2",
                                "--device", "cpu"], "samples_ddim2.png")}


def run_script(module, args):
    mod = importlib.import_module(module)
    return mod.main(R.parse(mod.Config, getattr(mod, "PRESETS", None), args=args))


def test_the_repo_ships_what_it_says():
    found = {}
    for pkg, path in W.shipped():
        found.setdefault(pkg, []).append(path.stem)
    assert found == SHIPPED
    assert sum(p.stat().st_size for _, p in W.shipped()) <= 25e6  # the budget for all shipped weights


@pytest.mark.parametrize("pkg,path", W.shipped(), ids=[f"{k}-{p.stem}" for k, p in W.shipped()])
def test_shipped_file_loads_strictly_and_scores_as_its_card_says(pkg, path):
    card = json.loads(path.with_suffix(".json").read_text())
    assert card["pkg"] == pkg and card["sha256"] == W.sha256(path) and card["bytes"] == path.stat().st_size
    script = importlib.import_module(W.SCRIPT[pkg])
    model, ckpt = R.load_model(path, pkg, script.build, weights=script.EXPORT["weights"], keys=script.EXPORT["keys"])
    keys = set(model.state_dict())
    from safetensors.torch import load_file
    assert set(load_file(path)) == keys  # strict both ways: a renamed or added tensor fails here
    measured = script.score(model, ckpt)
    assert measured.keys() == card["metrics"]["shipped"].keys()
    for k, v in measured.items():
        assert v == pytest.approx(card["metrics"]["shipped"][k], abs=TOLERANCE[k]), k


@pytest.mark.parametrize("pkg", sorted(SHIPPED))
def test_sample_script_runs_on_shipped_weights_on_a_fresh_clone(pkg, tmp_path, capsys):
    module, args, expected = RUN[pkg]
    run_script(module, ["--out-dir", str(tmp_path / "out"), *args])
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(f"checkpoint: {pkg}/pretrained/") and "shipped pretrained weights" in first
    assert (tmp_path / "out" / expected).stat().st_size > 0


@pytest.fixture(scope="module")
def runs(trained, tmp_path_factory):
    """A tiny finished training run per package (gnns: the three flavours side by side, as sample.py makes them)."""
    gnns = tmp_path_factory.mktemp("gnns")
    run_script("gnns.sample", [*fill(TINY["gnns.sample"][:-2], trained), "--out-dir", str(gnns)])
    return {**{pkg: trained[pkg] for pkg in RUN if pkg != "gnns"}, "gnns": str(gnns)}


@pytest.mark.parametrize("pkg", sorted(RUN))
def test_export_then_the_script_runs_on_the_export(pkg, runs, tmp_path, monkeypatch, capsys):
    """`python -m utils.weights export` on a run: half-precision parameters that score like the checkpoint, a card,
    and the package's script reads them back when its out_dir has no run (the repo root moved to tmp_path)."""
    monkeypatch.setattr(W, "REPO", tmp_path / "repo")
    cards = W.main(W.Config(action="export", pkg=pkg, out_dir=runs[pkg], commit="abc1234", hardware="test"))
    assert sorted(c["name"] for c in cards) == (["attn", "conv", "mpnn"] if pkg == "gnns" else ["default"])
    for card in cards:
        path = W.shipped_path(pkg, card["name"])
        assert path.is_file() and card["dtype"] == "float16" and card["commit"] == "abc1234"
        assert json.loads(path.with_suffix(".json").read_text())["metrics"] == card["metrics"]
        for k, v in card["metrics"]["shipped"].items():
            assert v == pytest.approx(card["metrics"]["checkpoint"][k], abs=max(TOLERANCE[k], 0.02 * abs(v))), k
    capsys.readouterr()
    module, args, expected = RUN[pkg]
    run_script(module, ["--out-dir", str(tmp_path / "out"), *args])
    assert "shipped pretrained weights" in capsys.readouterr().out.splitlines()[0]
    assert (tmp_path / "out" / expected).stat().st_size > 0


def bad_files(tmp_path):
    """A shipped file made corrupt, unreadable, foreign, or without its card: each must exit with one line."""
    pkg, src = W.shipped()[-1]
    yield "truncated", pkg, src.read_bytes()[:100], src.with_suffix(".json").read_text()
    data = bytearray(src.read_bytes())
    data[-1] ^= 0xFF  # still a valid safetensors file, but not the one the card describes
    yield "one byte changed", pkg, bytes(data), src.with_suffix(".json").read_text()
    yield "no card", pkg, src.read_bytes(), None
    yield "random bytes", pkg, torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes(), \
        src.with_suffix(".json").read_text()
    other, osrc = W.shipped()[0]
    assert other != pkg
    yield "another package's file", pkg, osrc.read_bytes(), osrc.with_suffix(".json").read_text()


def test_a_bad_shipped_file_exits_with_one_line(tmp_path, capsys):
    for what, pkg, data, card in bad_files(tmp_path):
        path = tmp_path / what.replace(" ", "_") / "weights.safetensors"
        path.parent.mkdir()
        path.write_bytes(data)
        if card is not None:
            path.with_suffix(".json").write_text(card)
        module, args, _ = RUN[pkg]
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            run_script(module, ["--out-dir", str(tmp_path / "out"), "--ckpt", str(path), *args])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), (what, err)
