import importlib
import os
from pathlib import Path

import pytest
import torch

from utils import data, run

DEBIAN = all((data.DEBIAN_DIR / f"{f}.gz").exists() for f in data.IDX_FILES)


def test_missing_dataset_names_every_place(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data, "REPO", tmp_path / "repo")
    monkeypatch.setattr(data, "DEBIAN_DIR", tmp_path / "no-debian")
    monkeypatch.setenv("PAPERS_DATA_DIR", str(tmp_path / "env"))
    with pytest.raises(SystemExit) as e:
        data.load_images("fashion-mnist", "train", data_dir=tmp_path / "flag", download=False)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    order = [str(tmp_path / "flag"), str(tmp_path / "env"), str(tmp_path / "repo" / "data"), str(tmp_path / "no-debian")]
    assert [err.index(p) for p in order] == sorted(err.index(p) for p in order)
    assert "apt-get install dataset-fashion-mnist" in err


def test_lookup_prefers_data_dir_over_env(tmp_path, monkeypatch):
    seen = []

    def fake(name, root, train, download):
        seen.append(Path(root))
        raise RuntimeError("not here")
    monkeypatch.setattr(data, "_torchvision", fake)
    monkeypatch.setattr(data, "DEBIAN_DIR", tmp_path / "none")
    monkeypatch.setenv("PAPERS_DATA_DIR", str(tmp_path / "env"))
    with pytest.raises(SystemExit):
        data.load_images("mnist", "test", data_dir=tmp_path / "flag", download=False)
    assert seen == [tmp_path / "flag", tmp_path / "env", data.REPO / "data"]


def test_unknown_dataset_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        data.load_images("imagenet")
    assert e.value.code == 2 and "unknown dataset" in capsys.readouterr().err


@pytest.mark.parametrize("name,shape", [("synthetic", (1, 28, 28)), ("synthetic-mnist", (1, 28, 28)),
                                        ("synthetic-cifar10", (3, 32, 32))])
def test_synthetic_matches_format(name, shape):
    x, y = data.load_images(name, "train")
    assert x.dtype == torch.uint8 and x.shape[1:] == shape and y.dtype == torch.long
    assert y.min() == 0 and y.max() == 9


@pytest.mark.skipif(not DEBIAN, reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_from_debian(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "REPO", tmp_path)  # force the Debian path into a fresh cache
    monkeypatch.delenv("PAPERS_DATA_DIR", raising=False)
    xtr, ytr = data.load_images("fashion-mnist", "train", download=False)
    xte, yte = data.load_images("fashion-mnist", "test", download=False)
    assert xtr.shape == (60000, 1, 28, 28) and xte.shape == (10000, 1, 28, 28)
    assert ytr.bincount().tolist() == [6000] * 10 and yte.bincount().tolist() == [1000] * 10


def test_default_corpus_offline_plain_text():
    text = data.load_text()
    assert len(text.encode()) > 1_000_000
    assert "**" not in text and "\n#" not in text and "HAMLET:" in text


def test_text_errors(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\xfa abc")
    for p in [tmp_path / "missing.txt", tmp_path / "empty.txt", tmp_path / "bin.txt"]:
        with pytest.raises(SystemExit) as e:
            data.load_text(p)
        assert e.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 3


def test_atomic_save_survives_crash_mid_write(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    run.save_checkpoint({"kind": "gpt", "w": torch.ones(3)}, path)

    def crash(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        run.save_checkpoint({"kind": "gpt", "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(run.load_checkpoint(path, "gpt")["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_checkpoint_errors(tmp_path, capsys):
    (tmp_path / "corrupt.pt").write_bytes(os.urandom(100))
    run.save_checkpoint({"kind": "vit"}, tmp_path / "vit.pt")
    for p in ["missing.pt", "corrupt.pt", "vit.pt"]:
        with pytest.raises(SystemExit) as e:
            run.load_checkpoint(tmp_path / p, "gpt")
        assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "no checkpoint" in err[0] and "not a readable" in err[1] and "'vit'" in err[2]


def test_logger_writes_jsonl(tmp_path):
    log = run.Logger(tmp_path, None, "t")
    log.log({"step": 1, "loss": 0.5})
    log.log({"step": 2, "loss": 0.25})
    assert [r["loss"] for r in run.read_jsonl(tmp_path / "metrics.jsonl")] == [0.5, 0.25]


@pytest.mark.parametrize("pkg", ["ddpm", "gnns", "gpt", "nf", "ppo", "vit", "utils"])
def test_every_package_imports(pkg):
    mods = sorted(p.stem for p in (data.REPO / pkg).glob("*.py") if p.stem != "__init__")
    assert mods, f"{pkg}/ has no modules"
    for mod in mods:
        importlib.import_module(f"{pkg}.{mod}")


def test_random_crop_is_a_shifted_window_with_black_padding():
    torch.manual_seed(0)
    x = torch.randint(1, 256, (16, 1, 6, 6), dtype=torch.uint8)  # no zeros inside the images
    out = data.random_crop(x, 2)
    assert out.shape == x.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(len(x)):  # each output is one of the 25 windows of the zero-padded image
        windows = [padded[i, :, dy:dy + 6, dx:dx + 6] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out[i], w) for w in windows)
    assert (out == 0).any()  # some crops show the black border


def test_fast_bf16_needs_amx_or_avx512_bf16_as_a_whole_flag(tmp_path):
    info = tmp_path / "cpuinfo"
    for flags, fast in [("fpu avx2 avx512f avx512bw", False), ("fpu avx512f avx512_bf16", True),
                        ("fpu amx_bf16 amx_tile", True), ("fpu avx512_bf16_extra", False)]:
        info.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        assert run.cpu_has_fast_bf16(info) is fast, flags
    assert run.cpu_has_fast_bf16(tmp_path / "absent") is False


def test_bf16_asked_for_on_a_cpu_without_it_warns_and_runs_as_asked(tmp_path, capsys):
    slow, fast = tmp_path / "avx2", tmp_path / "zen4"
    slow.write_text("flags\t\t: fpu avx avx2 fma\n")
    fast.write_text("flags\t\t: fpu avx2 avx512f avx512_bf16\n")
    assert run.resolve_cpu_bf16(True, slow) is True and "warning: --cpu-bf16 True" in capsys.readouterr().err
    for flag, info, want in [(None, slow, False), (False, slow, False), (None, fast, True), (True, fast, True),
                             (False, fast, False)]:
        assert run.resolve_cpu_bf16(flag, info) is want
        assert capsys.readouterr().err == "", (flag, info)


@pytest.mark.parametrize("n,batch,world", [(1025, 171, 2), (1000, 32, 3), (97, 8, 4), (64, 8, 8), (10, 3, 1)])
def test_every_rank_gets_the_same_number_of_full_batches(n, batch, world):
    ranks = [data.shuffled_batches(n, batch, epoch=3, seed=1, rank=r, world=world) for r in range(world)]
    assert len({len(b) for b in ranks}) == 1 and len(ranks[0]) == n // (batch * world)
    assert all(len(i) == batch for b in ranks for i in b)
    seen = torch.cat([i for b in ranks for i in b])
    assert len(seen.unique()) == len(seen)  # disjoint across ranks


def test_batch_larger_than_data_is_refused_not_a_hang(capsys):
    with pytest.raises(SystemExit) as e:
        data.shuffled_batches(100, 64, epoch=0, world=2)
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error:")


def test_val_split_is_fixed_disjoint_and_complete():
    tr, va = data.val_split(1000, 100)
    tr2, va2 = data.val_split(1000, 100)
    assert torch.equal(va, va2) and len(va) == 100 and len(tr) == 900
    assert len(torch.cat([tr, va]).unique()) == 1000
    assert len(data.val_split(1000, 0)[1]) == 0


def test_checkpoint_rename_is_fsynced_in_its_folder(tmp_path, monkeypatch):
    import stat
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(stat.S_ISDIR(os.fstat(fd).st_mode)), real(fd)))
    run.save_checkpoint({"kind": "x"}, tmp_path / "ckpt.pt")
    assert synced == [False, True]  # the file's data, then the folder holding the new name


def test_sigterm_during_a_save_lets_the_save_finish_then_interrupts(tmp_path, monkeypatch):
    """A SIGTERM that lands inside torch.save (a periodic checkpoint) raised KeyboardInterrupt mid-write: the zip
    writer's cleanup then failed ("unexpected pos") and the run died with a traceback, nothing saved. The signal
    must wait for the save to finish, then take the Ctrl-C path."""
    import signal
    old = signal.getsignal(signal.SIGTERM)
    run.sigterm_as_interrupt()
    real = torch.save

    def save_then_signal(obj, f):
        f.write(b"")  # the write has begun
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):  # the Python-level handler runs at the next bytecode boundaries
            pass
        real(obj, f)
    monkeypatch.setattr(run.torch, "save", save_then_signal)
    try:
        with pytest.raises(KeyboardInterrupt):
            run.save_checkpoint({"kind": "x", "step": 7}, tmp_path / "ckpt.pt")
    finally:
        signal.signal(signal.SIGTERM, old)
    assert run.load_checkpoint(tmp_path / "ckpt.pt", "x")["step"] == 7
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temp file left


def test_an_error_inside_a_held_block_is_not_hidden_by_a_held_stop():
    """A crash inside the held block (an optimizer update, a checkpoint write) while a SIGTERM waits must surface as
    itself, not as the KeyboardInterrupt of the held stop, which the loops would save as a clean interrupt; the
    handlers are restored either way."""
    import signal
    old = signal.getsignal(signal.SIGTERM)
    run.sigterm_as_interrupt()
    handler = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(BaseException) as e:  # BaseException: a KeyboardInterrupt must not end the test session
            with run.stops_held():
                signal.raise_signal(signal.SIGTERM)
                raise RuntimeError("disk full")
        assert e.type is RuntimeError, e.type
        assert signal.getsignal(signal.SIGTERM) is handler
        with pytest.raises(KeyboardInterrupt):  # a block that finishes delivers the held stop
            with run.stops_held():
                signal.raise_signal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, old)


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    import random
    import numpy as np
    run.seed_everything(3)
    run.save_checkpoint({"kind": "x", "rng": run.rng_state()}, tmp_path / "c.pt")
    a = (torch.rand(3), np.random.rand(3), random.random())
    run.set_rng_state(run.load_checkpoint(tmp_path / "c.pt", "x")["rng"])
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_resume_with_other_settings_names_the_fields(capsys):
    from ppo import train
    cfg = train.Config(hidden=32)
    run.check_resume(__import__("dataclasses").asdict(cfg), cfg)  # same: passes
    with pytest.raises(SystemExit) as e:
        run.check_resume({**__import__("dataclasses").asdict(cfg), "hidden": 64, "lr": 0.1}, cfg)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--hidden" in err and "--lr" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("device", ["mps", "cuda:7", "tpu", "cpu:x"])
def test_unavailable_or_unknown_device_is_refused_at_parse_time(device, capsys):
    from ppo import train
    with pytest.raises(SystemExit) as e:
        run.parse(train.Config, train.PRESETS, args=["--device", device])
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error:")


def test_truncated_idx_in_data_is_replaced_by_debians_copy(tmp_path, monkeypatch):
    if not DEBIAN:
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    monkeypatch.setattr(data, "REPO", tmp_path)
    monkeypatch.delenv("PAPERS_DATA_DIR", raising=False)
    raw = tmp_path / "data" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for f in data.IDX_FILES:
        (raw / f).write_bytes(b"\x00\x00\x08\x03truncated")
    x, y = data.load_images("fashion-mnist", "test")
    assert x.shape == (10000, 1, 28, 28)


@pytest.mark.parametrize("pkg", ["nf", "gnns", "ppo"])
def test_packages_without_ddp_refuse_torchrun(pkg, monkeypatch, tmp_path, capsys):
    """Under torchrun each process would train the same run into the same folder: one line, exit 2."""
    mod = importlib.import_module(f"{pkg}.train")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = {"nf": ["--dataset", "synthetic", "--steps", "1", "--val-size", "64"],
            "gnns": ["--dataset", "synthetic", "--epochs", "1", "--train-limit", "64"],
            "ppo": ["--total-timesteps", "128", "--num-envs", "2", "--num-steps", "64", "--minibatch-size", "64"]}[pkg]
    cfg = run.parse(mod.Config, mod.PRESETS, args=args + ["--out-dir", str(tmp_path), "--device", "cpu"])
    with pytest.raises(SystemExit) as e:
        mod.main(cfg)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "torchrun" in err and not (tmp_path / "ckpt.pt").exists()
