"""Run helpers every train.py/sample.py uses: CLI parsing with presets, clean errors, device, seeding,
atomic checkpoints, metrics logging (jsonl + optional wandb), and torch.distributed setup."""
import contextlib
import dataclasses
import json
import math
import os
import signal
import random
import sys
import warnings
from pathlib import Path

import numpy as np
import torch


@dataclasses.dataclass
class RunConfig:
    """The flags every train.py takes; each package's Config adds its own (and its own out_dir and presets).
    `check()` validates the fields; a subclass extends it and calls super().check()."""
    out_dir: str = "out"
    """checkpoint, metrics.jsonl, summary.json and figures go here"""
    preset: str = "default"
    """the PRESETS entry this config starts from (CLI: flags given explicitly override it; in Python use
    R.preset(PRESETS, name, **overrides): main(cfg) runs exactly the config it is given)"""
    device: str = "auto"
    """auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps"""
    seed: int = 0
    resume: bool = False
    """continue from out_dir/ckpt.pt"""
    wandb: bool = False
    """also log to Weights & Biases (imported lazily; WANDB_MODE=offline works)"""

    def check(self):
        folder(self.out_dir, "--out-dir")
        nonnegative(self, "seed")
        check_device(self.device)


@dataclasses.dataclass
class ImageRunConfig(RunConfig):
    dataset: str = "fashion-mnist"
    """fashion-mnist | mnist | cifar10 | synthetic[-mnist|-cifar10]"""
    data_dir: str | None = None
    """looked at first; then $PAPERS_DATA_DIR, data/, Debian's dataset-fashion-mnist, a download"""

    def check(self):
        super().check()
        from utils.data import base_name  # exits with the list of names on an unknown one
        base_name(self.dataset)
        existing_folder(self.data_dir, "--data-dir")


def die(msg, code=2):
    """Bad input ends here: one line on stderr and exit code 2, never a traceback."""
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(code)


def parse(cls, presets=None, args=None):
    """The CLI of every script. `--preset NAME` picks the complete config PRESETS[NAME] (the dataclass defaults are
    the `default` preset); every flag given on the command line overrides that config's field. Then the config is
    validated (`validate`) before anything else runs. Bad types and unknown choices get tyro's usage message."""
    import tyro
    args = sys.argv[1:] if args is None else list(args)
    base = cls()
    if presets is not None:
        name = next((a.split("=", 1)[1] for a in args if a.startswith("--preset=")), None)
        if name is None and "--preset" in args:
            i = args.index("--preset")
            name = args[i + 1] if i + 1 < len(args) else None
            check(name is not None, "--preset needs a name; choose one of: " + ", ".join(presets))
        name = base.preset if name is None else name
        check(name in presets, f"unknown preset '{name}'; choose one of: {', '.join(presets)}")
        base = presets[name]
    return validate(tyro.cli(cls, default=base, args=args))


def preset(presets, name, **overrides):
    """In Python, what `--preset NAME --key value ...` is on the CLI: PRESETS[name] with some fields replaced."""
    check(name in presets, f"unknown preset '{name}'; choose one of: {', '.join(presets)}")
    return dataclasses.replace(presets[name], **overrides)


def check(cond, msg):
    if not cond:
        die(msg)


# ----------------------------------------------------------------------------- validation

INT_LIMIT = 2 ** 31  # no count, size or seed in this repo is near it; anything beyond is a typo or an overflow


def validate(cfg):
    """Every field of a config, before any data loads: floats finite, ints of sane size, then the config's own
    `check()` (ranges, choices, divisibility, files; see RunConfig.check). Returns cfg, or exits with one line."""
    for f in dataclasses.fields(cfg):
        v, flag = getattr(cfg, f.name), _flag(f.name)
        for x in (v if isinstance(v, (list, tuple)) else [v]):
            if isinstance(x, float):
                check(math.isfinite(x), f"{flag} must be a finite number, got {x}")
            elif isinstance(x, int) and not isinstance(x, bool):
                check(abs(x) < INT_LIMIT, f"{flag} {x} is out of range (|value| < 2**31)")
    if hasattr(cfg, "check"):
        cfg.check()
    return cfg


def _flag(name):
    return "--" + name.replace("_", "-")


def positive(cfg, *names):
    """Each named field is > 0."""
    for n in names:
        check(getattr(cfg, n) > 0, f"{_flag(n)} must be positive, got {getattr(cfg, n)}")


def nonnegative(cfg, *names):
    """Each named field is >= 0."""
    for n in names:
        check(getattr(cfg, n) >= 0, f"{_flag(n)} must be >= 0, got {getattr(cfg, n)}")


def between(cfg, name, lo, hi, lo_open=False, hi_open=False):
    """lo <= value <= hi, with either end open on request."""
    v = getattr(cfg, name)
    ok = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    check(ok, f"{_flag(name)} must be in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}, got {v}")


def one_of(cfg, name, choices):
    v = getattr(cfg, name)
    check(v in choices, f"{_flag(name)} must be one of {', '.join(map(str, choices))}, got {v!r}")


def file_exists(path, what):
    """A file the run must read; None means "not given" and passes."""
    check(path is None or Path(path).is_file(), f"{what} not found: {path}")


def existing_folder(path, flag):
    """A folder the run reads from; None means "not given" and passes."""
    check(path is None or Path(path).is_dir(), f"{flag} {path} is not a folder")


def folder(path, flag):
    """A folder the run writes into: named, not a file, and creatable (its nearest existing parent is a folder)."""
    check(path is not None and bool(str(path).strip()), f"{flag} must not be empty")
    p = Path(path).absolute()
    check(not p.is_file(), f"{flag} {path} is a file, not a folder")
    parent = next(q for q in [p, *p.parents] if q.exists())
    check(parent.is_dir() and os.access(parent, os.W_OK), f"{flag} {path} cannot be created: {parent} is not a "
          "writable folder")


def check_device(name):
    """The device flag, checked without touching data: known kind, and available here."""
    if name == "auto":
        return
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        die(f"unknown device '{name}' (use auto, cpu, cuda, cuda:N or mps)")
    check(dev.type in ("cpu", "cuda", "mps"), f"unknown device '{name}' (use auto, cpu, cuda, cuda:N or mps)")
    if dev.type == "cuda":
        check(torch.cuda.is_available(), f"--device {name} asked for, but CUDA is not available here")
        n = torch.cuda.device_count()
        check(dev.index is None or dev.index < n, f"--device {name} asked for, but this machine has {n} GPU(s)")
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        check(mps is not None and mps.is_available(), f"--device {name} asked for, but MPS is not available here")


def pick_device(name="auto"):
    """cuda, then mps, then cpu; `--device` overrides."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    check_device(name)
    return torch.device(name)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def cpu_has_fast_bf16(cpuinfo="/proc/cpuinfo"):
    """True on CPUs with native bf16 matmuls: AMX (Intel Sapphire Rapids and later) or AVX512-BF16 (AMD Zen 4 and
    later, Intel Cooper Lake). Measured on a 2-core AMD EPYC without AMX: bf16 autocast trains ddpm 1.61x, nf 1.63x
    and vit 1.32x faster than fp32 (see their READMEs). Other CPUs default to fp32."""
    try:
        flags = Path(cpuinfo).read_text().split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_cpu_bf16(flag, cpuinfo="/proc/cpuinfo"):
    """A `--cpu-bf16` flag left at None means: on when the CPU has native bf16 (AMX or AVX512-BF16). Asked for on a
    CPU without it, bf16 runs emulated: ddpm trained 17x slower than in fp32 on a 2-core AMD EPYC with AVX2 only
    (0.027 vs 0.452 steps/s), so the run goes on as asked but says so."""
    fast = cpu_has_fast_bf16(cpuinfo)
    if flag and not fast:
        print("warning: --cpu-bf16 True on a CPU without AMX or AVX512-BF16: bf16 is emulated here and can be >10x "
              "slower than fp32 (leave --cpu-bf16 unset to pick automatically)", file=sys.stderr)
    return fast if flag is None else flag


def autocast(device, cpu_bf16=False):
    """bf16 autocast on CUDA; on the CPU only when asked (fast with AMX / AVX512-BF16, slow on most laptops)."""
    if device.type == "cpu":
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=cpu_bf16)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


# ----------------------------------------------------------------------------- checkpoints

@contextlib.contextmanager
def stops_held():
    """Ctrl-C and SIGTERM wait for the block to finish (held meanwhile, raised again after it): for a checkpoint
    write, or an optimizer update and the step count that records it, which must not stop halfway. An exception
    from the block propagates as itself (a held stop does not replace it)."""
    held, old = [], {}
    try:
        try:  # a Python handler, not a signal mask: the OS may deliver a process-directed signal to any thread
            for s in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(s) is not None:  # None: a handler Python did not install; leave it
                    old[s] = signal.signal(s, lambda signum, frame: held.append(signum))
        except ValueError:  # not the main thread, where Python runs every handler: nothing to hold
            pass
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    if held:  # the block finished: now the stop takes its own path (Ctrl-C, sigterm_as_interrupt: KeyboardInterrupt)
        signal.raise_signal(held[0])


def save_checkpoint(obj, path):
    """Atomic: write a temp file beside the target, fsync, then rename over it. A crash mid-save leaves the
    previous checkpoint intact. Ctrl-C and SIGTERM wait until the save is done (`stops_held`), so a stop that lands
    mid-write still ends in the Ctrl-C path with a whole checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with stops_held():
        _write_atomically(obj, path, path.with_name(f".{path.name}.tmp{os.getpid()}"))


def _write_atomically(obj, path, tmp):
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)  # the rename lives in the folder: fsync it to survive power loss
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path, kind, map_location="cpu", keys=()):
    """Load a checkpoint written by package `kind` (or shipped weights: utils/weights.py); a missing, corrupt or
    foreign file, or one without the `keys` the caller needs, exits with code 2. weights_only=True: a pickle that
    would run code is refused, not run."""
    path = Path(path)
    if path.suffix == ".safetensors":  # shipped pretrained weights: a card and weights, no pickle
        from utils import weights
        return weights.load(path, kind, keys)
    if path.is_dir():
        path = path / "ckpt.pt"
    if not path.is_file():
        die(f"no checkpoint at {path} (train first, or pass the right --out-dir / --ckpt)")
    try:
        with warnings.catch_warnings():  # torch warns about some pickles before refusing them: one line only
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, random bytes, pickled objects we refuse to run
        die(f"{path} is not a readable checkpoint ({type(e).__name__}); delete it and train again")
    if not isinstance(ckpt, dict) or ckpt.get("kind") != kind:
        other = ckpt.get("kind", "unknown") if isinstance(ckpt, dict) else "unknown"
        die(f"{path} is a '{other}' checkpoint, not a '{kind}' one")
    missing = [k for k in keys if k not in ckpt]
    check(not missing, f"{path} lacks {', '.join(missing)}: an incomplete '{kind}' checkpoint; train again")
    return ckpt


def load_model(path, kind, build, device="cpu", keys=(), weights="model"):
    """The model a checkpoint holds, in eval mode: `build(ckpt)` makes it from the stored settings, then the
    `weights` state is loaded (a tuple of keys: the first one the checkpoint holds, e.g. the selected weights, else
    the last); settings this code cannot build or weights that do not fit exit with one line. Returns (model, ckpt)."""
    names = (weights,) if isinstance(weights, str) else tuple(weights)
    required = names if len(names) == 1 else ()  # one key: required, with load_checkpoint's message
    ckpt = load_checkpoint(path, kind, device, keys=("model_config", *keys, *required))
    weights = next((n for n in names if ckpt.get(n) is not None), None)
    check(weights is not None, f"{path} holds none of {', '.join(names)}: an incomplete '{kind}' checkpoint")
    try:
        model = build(ckpt).to(device)
    except (TypeError, ValueError, AssertionError, KeyError) as e:
        die(f"{path}: its model_config does not fit this code ({type(e).__name__}: {e})")
    load_state(model, ckpt[weights], weights)
    return model.eval(), ckpt


def check_resume(saved, cfg, ignore=()):
    """--resume continues the run the checkpoint holds: every field of the stored config but the run's own
    (where and how to run, how long) must equal the requested one, or exit naming those that differ."""
    free = {"out_dir", "resume", "wandb", "device", "preset", "compile", "cpu_bf16", "data_dir", *ignore}
    now = dataclasses.asdict(cfg)
    diff = [k for k in now if k not in free and k in saved and _plain(saved[k]) != _plain(now[k])]
    check(not diff, "--resume with other settings than the checkpoint's: " + ", ".join(
        f"{_flag(k)} {saved[k]!r} (checkpoint) vs {now[k]!r}" for k in diff))


def _plain(v):
    return list(v) if isinstance(v, tuple) else v


def load_state(module, state, what):
    """load_state_dict with one error line instead of a traceback on a shape or key mismatch."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        die(f"the checkpoint's {what} does not fit this model ({str(e).splitlines()[0][:200]})")


def rng_state():
    """Every RNG a run draws from, as tensors and plain values (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def sigterm_as_interrupt():
    """SIGTERM (a scheduler's stop, `kill`) takes the Ctrl-C path: the loop's KeyboardInterrupt handler saves."""
    def handler(signum, frame):
        raise KeyboardInterrupt
    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave the default
        pass


def progress(iterable, **kw):
    """tqdm bars only when stderr is a terminal: a log file gets the per-interval lines, not bar redraws."""
    from tqdm import tqdm
    return tqdm(iterable, **{**kw, "disable": kw.get("disable", False) or not sys.stderr.isatty()})


# ----------------------------------------------------------------------------- logging

def write_json(path, obj):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=2) + "\n")


def read_json(path):
    return json.loads(Path(path).read_text())


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class Logger:
    """Appends one JSON dict per call to out_dir/metrics.jsonl; mirrors to Weights & Biases with --wandb
    (imported lazily; WANDB_MODE=offline works without a network)."""

    def __init__(self, out_dir, config, project, use_wandb=False, resume=False, enabled=True):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self.wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a" if resume else "w", buffering=1)  # line-buffered: readable while running
        if use_wandb:
            try:
                import wandb
            except ImportError:
                die("--wandb needs the wandb package: pip install wandb")
            self.wandb = wandb.init(project=project, config=dataclasses.asdict(config), dir=str(out_dir))

    def log(self, row, step=None, echo=None):
        if not self.enabled:
            return
        row = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}
        self.file.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log(row, step=step)
        if echo:
            print(echo)

    def close(self):
        if self.enabled:
            self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


# ----------------------------------------------------------------------------- distributed

def launched_by_torchrun():
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def single_process(what):
    """For the packages without DDP: under torchrun every process would train the same run into one folder."""
    check(not launched_by_torchrun(), f"{what} runs in one process: start it with python, not torchrun")


def ddp_setup(device_name="auto"):
    """Under torchrun (even with one process): init the process group, NCCL on CUDA and gloo on CPU.
    Returns (rank, world, device); (0, 1, device) for a plain `python train.py`."""
    if not launched_by_torchrun():
        return 0, 1, pick_device(device_name)
    world = int(os.environ["WORLD_SIZE"])
    import torch.distributed as dist
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device


def wrap_ddp(model, device):
    """DistributedDataParallel when launched by torchrun; the model itself otherwise."""
    if not launched_by_torchrun():
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def ddp_cleanup():
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

