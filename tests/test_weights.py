"""Shipped pretrained weights (utils/weights.py): each sample/eval script runs on them on a fresh clone, they load
into today's model code with strict key matching, they score what their card says, and a bad file exits with one
line. The export path is checked end to end on a tiny run of every package."""
import importlib
import json

import pytest
import torch
from safetensors.torch import load_file

from test_bad_input import TINY, fill
from utils import run as R
from utils import weights as W

# what the repo ships today: a file lost (or added without its line here) fails the test
SHIPPED = {"ddpm": ["default"], "gnns": ["attn", "conv", "mpnn"], "gpt": ["default"], "nf": ["default"],
           "ppo": ["default"], "vit": ["default"]}
TOLERANCE = W.TOLERANCE
# the sample/eval script of each package on its shipped weights, with small counts: (module, args, expected file)
RUN = {"gnns": ("gnns.evaluate", ["--test-limit", "50", "--device", "cpu"], "eval.json"),
       "ppo": ("ppo.sample", ["--episodes", "1", "--render", "none"], "eval.json"),  # the GIF: test_bad_input
       "gpt": ("gpt.sample", ["--num-samples", "1", "--max-new-tokens", "20", "--device", "cpu"], "generated.txt"),
       "vit": ("vit.sample", ["--device", "cpu", "--num-show", "4"], "eval.json"),
       "nf": ("nf.sample", ["--device", "cpu", "--num-samples", "4", "--num-test", "8", "--u-draws", "0",
                            "--interp-steps", "2", "--test-images", "16"], "samples_ranked.png"),
       "ddpm": ("ddpm.sample", ["--num-samples", "2", "--sampler", "ddim", "--steps", "2", "--gif-frames", "2",
                                "--device", "cpu"], "samples_ddim2.png"),
       "ddpm.evaluate": ("ddpm.evaluate", ["--num-samples", "0", "--nll-images", "2", "--nll-t", "2", "--steps", "2",
                                           "--device", "cpu"], "summary.json")}


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
    state = model.state_dict()
    stored = load_file(path)
    assert set(stored) == set(state)  # strict both ways: a renamed or added tensor fails here
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    for k, v in stored.items():  # parameters in the card's half precision, buffers as the model keeps them
        assert v.dtype == (getattr(torch, card["dtype"]) if k in params else state[k].dtype), k
    assert set(card["exact"]) == set(state) - params
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
    args = fill(TINY["gnns.sample"], trained)
    i = args.index("--layers")
    run_script("gnns.sample", [*args[:i], *args[i + 2:], "--out-dir", str(gnns)])  # all three flavours
    return {**{pkg: trained[pkg] for pkg in ("ddpm", "gpt", "nf", "ppo", "vit")}, "gnns": str(gnns)}


@pytest.mark.parametrize("script", sorted(RUN))
def test_export_then_the_script_runs_on_the_export(script, runs, tmp_path, monkeypatch, capsys):
    """`python -m utils.weights export` on a run: half-precision parameters that score like the checkpoint, a card,
    and the package's script reads them back when its out_dir has no run (the repo root moved to tmp_path)."""
    pkg = script.split(".")[0]
    monkeypatch.setattr(W, "REPO", tmp_path / "repo")
    cards = W.main(W.Config(action="export", pkg=pkg, out_dir=runs[pkg], commit="abc1234", hardware="test"))
    assert W.check_shipped([pkg])  # the exports score as their cards say
    assert sorted(c["name"] for c in cards) == (["attn", "conv", "mpnn"] if pkg == "gnns" else ["default"])
    for card in cards:
        path = W.shipped_path(pkg, card["name"])
        assert card["commit"] == "abc1234"
        assert json.loads(path.with_suffix(".json").read_text()) == json.loads(json.dumps(card, default=str))
        params = {k for k, v in load_file(path).items() if k not in card["exact"]}
        assert params and all(load_file(path)[k].dtype == torch.float16 for k in params)
        for k, v in card["metrics"]["shipped"].items():
            assert v == pytest.approx(card["metrics"]["checkpoint"][k], abs=max(TOLERANCE[k], 0.02 * abs(v))), k
    capsys.readouterr()
    module, args, expected = RUN[script]
    run_script(module, ["--out-dir", str(tmp_path / "out"), *args])
    assert "shipped pretrained weights" in capsys.readouterr().out.splitlines()[0]
    assert (tmp_path / "out" / expected).stat().st_size > 0


def first_shipped(pkg):
    return next(path for p, path in W.shipped() if p == pkg)


def bad_files(pkg):
    """A shipped file made corrupt, unreadable, foreign, or without its card: each must exit with one line."""
    src = first_shipped(pkg)
    yield "truncated", src.read_bytes()[:100], src.with_suffix(".json").read_text()
    data = bytearray(src.read_bytes())
    data[-1] ^= 0xFF  # still a valid safetensors file, but not the one the card describes
    yield "one byte changed", bytes(data), src.with_suffix(".json").read_text()
    yield "no card", src.read_bytes(), None
    yield "random bytes", torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes(), \
        src.with_suffix(".json").read_text()
    osrc = next(path for p, path in W.shipped() if p != pkg)
    yield "another package's file", osrc.read_bytes(), osrc.with_suffix(".json").read_text()
    card = json.loads(src.with_suffix(".json").read_text())
    yield "card is a list", src.read_bytes(), "[1, 2]"
    for field, value in [("checkpoint", [1]), ("weights", ["model"]), ("exact", 5), ("exact", [5]),
                         ("model_config", None), ("sha256", None)]:
        yield f"card {field} {value}", src.read_bytes(), json.dumps({**card, field: value})
    yield "card without env", src.read_bytes(), json.dumps({**card, "checkpoint": {}})


@pytest.mark.parametrize("pkg", sorted(SHIPPED))
def test_a_bad_shipped_file_exits_with_one_line(pkg, tmp_path, capsys):
    for i, (what, data, card) in enumerate(bad_files(pkg)):
        path = tmp_path / str(i) / "weights.safetensors"
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


@pytest.mark.parametrize("pkg", sorted(SHIPPED))
def test_a_bad_file_in_place_of_the_shipped_one_exits_with_one_line(pkg, tmp_path, monkeypatch, capsys):
    """The fallback path (no --ckpt): a corrupted file where the shipped one should be."""
    src = first_shipped(pkg)
    monkeypatch.setattr(W, "REPO", tmp_path)
    dest = W.shipped_path(pkg, src.stem)
    dest.parent.mkdir(parents=True)
    dest.write_bytes(src.read_bytes()[:-10])
    dest.with_suffix(".json").write_text(src.with_suffix(".json").read_text())
    module, args, _ = RUN[pkg]
    with pytest.raises(SystemExit) as e:
        run_script(module, ["--out-dir", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err


def test_gnns_evaluate_names_its_checkpoint_first_with_ckpt(tmp_path, capsys):
    path = W.shipped_path("gnns", "conv")
    run_script("gnns.evaluate", ["--ckpt", str(path), "--out-dir", str(tmp_path), "--test-limit", "20"])
    assert capsys.readouterr().out.splitlines()[0].startswith("checkpoint: gnns/pretrained/conv.safetensors (--ckpt)")


@pytest.mark.parametrize("args,message", [(["export"], "export needs --pkg and --out-dir"),
                                          (["check", "--pkg", "vit"], "no shipped weights for vit"),
                                          (["publish"], "unknown action 'publish'; choose export or check")])
def test_weights_cli_bad_input(args, message, tmp_path, monkeypatch, capsys):
    """`python -m utils.weights ARGS` (W.cli is its __main__), in a repo that ships nothing."""
    monkeypatch.setattr(W, "REPO", tmp_path)
    with pytest.raises(SystemExit) as e:
        W.cli(args)
    assert e.value.code == 2 and capsys.readouterr().err.strip().splitlines() == [f"error: {message}"]
