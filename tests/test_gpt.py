import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from gpt import sample, train
from gpt.model import GPT, GPTConfig, attention

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=8, dropout=0.0, eval_iters=2,
            eval_interval=20, log_interval=10)


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    return p


def tiny_model(**kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**dict(vocab_size=20, block_size=16, n_layer=2, n_head=2, n_embd=16, dropout=0.0), **kw}))


def test_causality():
    model = tiny_model().eval()
    idx = torch.randint(0, 20, (1, 16))
    idx2 = idx.clone()
    idx2[0, 9] = (idx[0, 9] + 1) % 20
    a, b = model(idx)[0], model(idx2)[0]
    assert torch.allclose(a[:, :9], b[:, :9], atol=1e-6)
    assert not torch.allclose(a[:, 9:], b[:, 9:], atol=1e-4)


def test_initial_loss_is_ln_vocab():
    model = tiny_model(vocab_size=65)
    idx, targets = torch.randint(0, 65, (8, 16)), torch.randint(0, 65, (8, 16))
    _, loss, _ = model(idx, targets)
    assert abs(loss.item() - math.log(65)) < 0.1


@pytest.mark.parametrize("tq", [7, 1, 3])
def test_own_attention_equals_sdpa(tq):
    q, k, v = torch.randn(2, 3, tq, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    ours, att = attention(q, k, v, causal=True, need_weights=True)
    mask = torch.ones(tq, 7, dtype=torch.bool).tril(diagonal=7 - tq)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.allclose(ours, ref, atol=1e-5)
    assert torch.allclose(att.sum(-1), torch.ones(2, 3, tq), atol=1e-6)
    fused, _ = attention(q, k, v, causal=True)
    assert torch.allclose(fused, ref, atol=1e-5)


def test_cached_equals_uncached_greedy():
    model = tiny_model(block_size=32).eval()
    prompt = torch.randint(0, 20, (1, 5))
    a = model.generate(prompt, 27, temperature=0, use_cache=True)
    b = model.generate(prompt, 27, temperature=0, use_cache=False)
    assert torch.equal(a, b)
    assert model.generate(prompt, 60, temperature=0).shape == (1, 65)  # past the block size too


@pytest.mark.parametrize("prompt_len", [15, 16, 21])  # block size 16: bs - 1, bs, bs + 5
def test_kv_cache_first_token_equals_uncached_for_long_prompts(prompt_len):
    """The cache is filled from the last block_size tokens, the window the uncached path sees."""
    model = tiny_model(block_size=16).eval()
    torch.manual_seed(1)
    prompt = torch.randint(0, 20, (2, prompt_len))
    ref = model(prompt[:, -16:])[0][:, -1]
    seen = []
    orig = model.forward

    def spy(idx, *a, **kw):  # record the logits of the first forward pass generate() makes
        out = orig(idx, *a, **kw)
        seen.append(out[0][:, -1])
        return out
    model.forward = spy
    model.generate(prompt, 1, temperature=0, use_cache=True)
    assert torch.allclose(seen[0], ref, atol=1e-6, rtol=0)
    a = model.generate(prompt, 1, temperature=0, use_cache=True)
    assert torch.equal(a, model.generate(prompt, 1, temperature=0, use_cache=False))


@pytest.mark.parametrize("prompt_len", [1, 5, 15])
def test_kv_cache_greedy_equals_uncached_within_block(prompt_len):
    model = tiny_model(block_size=16).eval()
    torch.manual_seed(2)
    prompt = torch.randint(0, 20, (3, prompt_len))
    n = 16 - prompt_len  # prompt + new tokens <= block size
    a = model.generate(prompt, n, temperature=0, use_cache=True)
    assert a.shape == (3, 16) and torch.equal(a, model.generate(prompt, n, temperature=0, use_cache=False))


def test_tiny_model_overfits_repeated_string():
    torch.manual_seed(0)
    model = tiny_model(vocab_size=5)
    data = torch.tensor([0, 1, 2, 3, 4] * 20)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        _, loss, _ = model(data[None, :16], data[None, 1:17])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05


def test_smoke_train_then_sample(tmp_path, text_file):
    out = tmp_path / "run"
    s = train.main(train.Config(out_dir=str(out), text=str(text_file), max_iters=60, device="cpu", **TINY))
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert math.isfinite(s["val_loss"]) and vals[-1] < vals[0] - 0.5
    assert {"val_loss", "val_bpc", "iters", "wall_s", "tokens_per_s", "mfu"} <= set(s)
    for f in ["ckpt.pt", "best.pt", "metrics.jsonl", "summary.json"]:
        assert (out / f).exists()
    sample.main(sample.Config(out_dir=str(out), num_samples=2, max_new_tokens=50, prompt="the ", device="cpu"))
    gen = (out / "generated.txt").read_text()
    assert gen.startswith("################ SAMPLE 0 ################\nthe ") and "SAMPLE 1" in gen
    # --resume continues from the saved iteration
    s2 = train.main(train.Config(out_dir=str(out), text=str(text_file), max_iters=70, resume=True, device="cpu",
                                 **TINY))
    assert s2["iters"] == 70


def test_bad_input_exits_2(tmp_path, text_file):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    short = tmp_path / "short.txt"
    short.write_text("abc" * 10)
    for cfg in [train.Config(text=str(empty)), train.Config(text=str(short), **TINY),
                train.Config(text=str(text_file), max_iters=0)]:
        with pytest.raises(SystemExit) as e:
            train.main(cfg)
        assert e.value.code == 2
    r = subprocess.run([sys.executable, "gpt/sample.py", "--ckpt", str(tmp_path / "none" / "ckpt.pt")], cwd=REPO,
                       capture_output=True, text=True)  # without --ckpt, a missing run falls back to shipped weights
    assert r.returncode == 2 and r.stderr.startswith("error: --ckpt") and len(r.stderr.splitlines()) == 1


def test_prompt_outside_vocab(tmp_path, text_file):
    out = tmp_path / "run"
    train.main(train.Config(out_dir=str(out), text=str(text_file), max_iters=2, device="cpu", **TINY))
    with pytest.raises(SystemExit) as e:
        sample.main(sample.Config(out_dir=str(out), prompt="QZ", device="cpu"))
    assert e.value.code == 2


def test_ddp_one_step_on_two_processes_equals_one_process(tmp_path, text_file):
    """One optimizer step with the same global batch of 8 windows: 1 process x batch 8, 1 process x batch 4 x
    grad-accum 2, and 2 gloo processes x batch 4 (torchrun, `--grad-accum 1` per process) give the same parameters
    up to float rounding. Without the gradient all-reduce each rank would step on its own half of the batch, which
    moves the parameters by ~lr differently (checked against the 1 x 4 run, rank 0's half)."""
    from utils import run as R
    kw = dict(TINY, text=str(text_file), device="cpu", max_iters=1, warmup_iters=0, lr=1e-2, eval_iters=1)

    def params(name, **over):
        train.main(R.preset(train.PRESETS, "default", out_dir=str(tmp_path / name), **{**kw, **over}))
        return torch.load(tmp_path / name / "ckpt.pt", weights_only=True)["model"]

    one, accum, half = params("one", batch_size=8), params("accum", batch_size=4, grad_accum=2), params(
        "half", batch_size=4)
    args = [f"--{k.replace('_', '-')}={v}" for k, v in {**kw, "batch_size": 4}.items()]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "gpt/train.py", "--out-dir", str(tmp_path / "two"), *args], cwd=REPO, capture_output=True,
                       text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    two = torch.load(tmp_path / "two" / "ckpt.pt", weights_only=True)
    assert two["world_size"] == 2 and two["step"] == 1
    gap = max((one[k] - half[k]).abs().max().item() for k in one)
    assert gap > 1e-3  # a rank stepping on its own half lands far from the full-batch step
    for k in one:
        assert torch.allclose(accum[k], one[k], rtol=0, atol=1e-6), k
        assert torch.allclose(two["model"][k], one[k], rtol=0, atol=1e-6), k


def test_sigterm_saves_like_ctrl_c_and_resume_continues(tmp_path, text_file):
    """A scheduler's stop (SIGTERM) takes the Ctrl-C path: ckpt.pt is saved, exit code 0."""
    import signal
    import time
    out = tmp_path / "run"
    args = [sys.executable, "gpt/train.py", "--out-dir", str(out), "--text", str(text_file), "--device", "cpu",
            "--max-iters", "100000", "--log-interval", "5", *[f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()
                                                                if k != "log_interval"]]
    p = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})

    def trained():  # a training record ("loss" at iter 5), not the eval record at iter 0 (which has "train_loss")
        text = (out / "metrics.jsonl").read_text() if (out / "metrics.jsonl").exists() else ""
        return any('"loss"' in line for line in text.split("\n")[:-1])  # whole lines only

    deadline = time.time() + 120
    while time.time() < deadline and not trained():
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    stdout, err = p.communicate(timeout=60)
    assert p.returncode == 0 and "Traceback" not in err and "interrupted at iter" in stdout, (p.returncode, err[-2000:])
    step = torch.load(out / "ckpt.pt", weights_only=True)["step"]
    assert step > 0
    s = train.main(train.Config(out_dir=str(out), text=str(text_file), max_iters=step + 5, resume=True, device="cpu",
                                **TINY))
    assert s["iters"] == step + 5


@pytest.mark.parametrize("script,args", [
    ("train", ["--eval-interval", "0"]), ("train", ["--log-interval", "0"]), ("train", ["--lr", "-1e-3"]),
    ("train", ["--weight-decay", "-0.1"]), ("train", ["--beta1", "1.0"]), ("train", ["--dropout", "1.5"]),
    ("train", ["--n-embd", "30", "--n-head", "4"]), ("train", ["--min-lr", "1e-2", "--lr", "1e-3"]),
    ("train", ["--text", "/nonexistent/corpus.txt"]), ("train", ["--grad-accum", "0"]), ("train", ["--resume"]),
    ("sample", ["--top-p", "0"]), ("sample", ["--top-k", "0"]), ("sample", ["--temperature", "-1"]),
    ("sample", ["--prompt", ""]), ("sample", ["--max-new-tokens", "0"]), ("sample", ["--output", ""]),
    ("sample", ["--output", "/nonexistent/dir/x.txt"]),
    ("bench", ["--new-tokens", "0"]), ("bench", ["--n-embd", "30", "--n-head", "4"]),
])
def test_bad_flags_are_one_line_errors_at_parse_time(script, args, tmp_path, capsys):
    """Refused by R.parse (before any data or checkpoint loads): exit 2 and one `error:` line."""
    import importlib
    from utils import run as R
    mod = importlib.import_module(f"gpt.{script}")
    with pytest.raises(SystemExit) as e:
        R.parse(mod.Config, getattr(mod, "PRESETS", None), args=args + ["--out-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error:") and len(err.splitlines()) == 1, err
    assert args[0] in err  # refused for this flag, not for something else (e.g. the missing checkpoint)


def test_presets_are_complete_configs():
    """The dataclass defaults are the `default` preset; a flag equal to the default survives another preset."""
    from utils import run as R
    assert train.Config() == train.PRESETS["default"]
    cfg = R.parse(train.Config, train.PRESETS, args=["--preset", "quick", "--n-layer", "6"])
    assert (cfg.n_layer, cfg.n_embd, cfg.preset) == (6, 128, "quick")  # n_layer 6 is the default; quick has 4
    assert R.preset(train.PRESETS, "quick", n_layer=6).n_layer == 6


def _final_state(out):
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    return ckpt["step"], ckpt["model"], ckpt["optimizer"]["state"]


@pytest.mark.parametrize("stop", ["interrupt", "update", "crash"])
def test_stopped_and_resumed_run_equals_uninterrupted(stop, tmp_path, text_file, stop_at, sigterm_after_update):
    """8 iterations straight == stopped at iteration 6 and resumed: Ctrl-C/SIGTERM saves ckpt.pt at 6 (also a
    SIGTERM at the end of iteration 6's optimizer update); a crash leaves the ckpt.pt of the evaluation at 4.
    Dropout and grad accumulation on, so every RNG must be restored."""
    from utils import run as R
    kw = dict(TINY, text=str(text_file), device="cpu", max_iters=8, eval_interval=4, log_interval=1, dropout=0.1,
              grad_accum=2, warmup_iters=2)
    train.main(R.preset(train.PRESETS, "default", out_dir=str(tmp_path / "full"), **kw))
    if stop == "update":
        resume = sigterm_after_update(5)
    else:
        resume = stop_at(train, 6, KeyboardInterrupt if stop == "interrupt" else RuntimeError("simulated crash"))
    part = R.preset(train.PRESETS, "default", out_dir=str(tmp_path / "part"), **kw)
    if stop != "crash":
        assert train.main(part)["iters"] == 6
    else:
        with pytest.raises(RuntimeError):
            train.main(part)
    assert _final_state(tmp_path / "part")[0] == (4 if stop == "crash" else 6)
    resume()
    train.main(R.preset(train.PRESETS, "default", out_dir=str(tmp_path / "part"), resume=True, **kw))
    (s1, m1, o1), (s2, m2, o2) = _final_state(tmp_path / "full"), _final_state(tmp_path / "part")
    assert s1 == s2 == 8
    for k in m1:
        assert torch.equal(m1[k], m2[k]), k  # the same float operations in the same order
    for i in o1:
        for k in o1[i]:
            assert torch.allclose(o1[i][k].float(), o2[i][k].float(), rtol=0, atol=1e-6), (i, k)
    full, resumed = ({r["iter"]: r["loss"] for r in map(json.loads, open(d / "metrics.jsonl")) if "loss" in r}
                     for d in (tmp_path / "full", tmp_path / "part"))
    assert sorted(full) == sorted(resumed) == list(range(1, 9)) and full == pytest.approx(resumed, abs=1e-5)


def test_a_stop_at_an_evaluation_waits_for_its_row_and_selection(tmp_path, text_file, monkeypatch):
    """A SIGTERM as the evaluation at iteration 4 logs its losses waits for the row, best.pt and ckpt.pt: the
    resumed run neither skips that evaluation's selection nor its metrics row, and ends like an uninterrupted run."""
    import signal
    from utils import run as R
    kw = dict(TINY, text=str(text_file), device="cpu", max_iters=8, eval_interval=4, log_interval=1)
    train.main(R.preset(train.PRESETS, "default", out_dir=str(tmp_path / "full"), **kw))
    real_log, calls = R.Logger.log, []

    def log(self, row, *args, **kw):
        if "val_loss" in row and row["iter"] == 4 and not calls:
            calls.append(1)
            signal.raise_signal(signal.SIGTERM)
        return real_log(self, row, *args, **kw)
    monkeypatch.setattr(R.Logger, "log", log)
    assert train.main(R.preset(train.PRESETS, "default", out_dir=str(tmp_path / "part"), **kw))["iters"] == 4
    monkeypatch.setattr(R.Logger, "log", real_log)
    train.main(R.preset(train.PRESETS, "default", out_dir=str(tmp_path / "part"), resume=True, **kw))
    va, vb = ([(r["iter"], r["val_loss"]) for r in map(json.loads, open(d / "metrics.jsonl")) if "val_loss" in r]
              for d in (tmp_path / "full", tmp_path / "part"))
    assert [i for i, _ in va] == [0, 4, 8] and va == vb
    a, b = (torch.load(tmp_path / d / "best.pt", weights_only=True) for d in ("full", "part"))
    assert a["step"] == b["step"] and a["best_val_loss"] == b["best_val_loss"]


def test_resume_refuses_other_architecture_but_allows_more_iters(tmp_path, text_file, capsys):
    from utils import run as R
    out = tmp_path / "run"
    args = ["--out-dir", str(out), "--text", str(text_file), "--device", "cpu", "--max-iters", "2",
            *[f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]]
    train.main(R.parse(train.Config, train.PRESETS, args=args))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train.main(R.parse(train.Config, train.PRESETS, args=args + ["--resume", "--n-layer", "3"]))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error:") and "--n-layer" in err and len(err.splitlines()) == 1
    assert train.main(R.parse(train.Config, train.PRESETS, args=args + ["--resume", "--max-iters", "4"]))["iters"] == 4


# ----------------------------------------------------------------------------- issue 26: modern options

def test_rope_is_a_rotation_whose_scores_depend_only_on_the_offset():
    """Su et al. 2021, Eq. (12)-(16): each pair (x_2i, x_2i+1), read as the complex number x_2i + i x_2i+1, is
    multiplied by exp(i m theta_i) with theta_i = 10000^(-2i/d). Checked against that complex product, against
    torch.linalg.vector_norm (a rotation keeps norms), and q_m . k_n = q_(m+s) . k_(n+s) for every shift s."""
    from gpt.model import apply_rope, rope_angles
    torch.manual_seed(0)
    d, pos = 8, torch.arange(40)
    x = torch.randn(3, 40, d, dtype=torch.float64).float()
    cos, sin = rope_angles(pos, d)
    y = apply_rope(x, cos, sin)
    theta = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    z = torch.view_as_complex(x.double().reshape(3, 40, d // 2, 2).contiguous())
    ref = torch.view_as_real(z * torch.polar(torch.ones_like(theta), pos[:, None].double() * theta)).reshape(3, 40, d)
    assert torch.allclose(y.double(), ref, atol=1e-5)
    assert torch.allclose(torch.linalg.vector_norm(y, dim=-1), torch.linalg.vector_norm(x, dim=-1), atol=1e-5)
    q, k = torch.randn(d), torch.randn(d)

    def score(m, n):
        (cq, sq), (ck, sk) = rope_angles(torch.tensor([m]), d), rope_angles(torch.tensor([n]), d)
        return (apply_rope(q[None], cq, sq) @ apply_rope(k[None], ck, sk).T).item()
    for m, n in [(5, 2), (9, 9), (3, 11)]:
        for s in (1, 7, 100):
            assert score(m + s, n + s) == pytest.approx(score(m, n), abs=1e-4)
    assert abs(score(5, 2) - score(6, 2)) > 1e-3  # but it does depend on the offset


def test_sliding_window_attention_equals_sdpa_with_a_band_mask():
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 9, 8), torch.randn(2, 3, 9, 8)
    mask = torch.tensor([[9 - 5 + i - 3 < j <= 9 - 5 + i for j in range(9)] for i in range(5)])  # window 3
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    for need_weights in (False, True):
        assert torch.allclose(attention(q, k, v, need_weights=need_weights, window=3)[0], ref, atol=1e-5)


def test_rmsnorm_equals_torch():
    from gpt.model import RMSNorm
    x, ours, ref = torch.randn(4, 7, 16), RMSNorm(16), torch.nn.RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        ours.weight.normal_()
        ref.weight.copy_(ours.weight)
    assert torch.allclose(ours(x), ref(x), atol=1e-5)


@pytest.mark.parametrize("C", [64, 128, 192, 384])
def test_mlp_parameter_counts_match(C):
    """GELU and ReLU^2: two C x 4C matrices, 8 C^2; SwiGLU: three C x round(8C/3) matrices (Shazeer 2020, Sec. 2)."""
    counts = {}
    for mlp in ("gelu", "swiglu", "relu2"):
        block = GPT(GPTConfig(vocab_size=10, block_size=8, n_layer=1, n_head=4, n_embd=C, mlp=mlp)).blocks[0]
        counts[mlp] = sum(p.numel() for p in block.mlp.parameters())
    assert counts["gelu"] == counts["relu2"] == 8 * C * C
    assert counts["swiglu"] == 3 * C * round(8 * C / 3) and abs(counts["swiglu"] / (8 * C * C) - 1) < 0.01


def test_newton_schulz_singular_values_near_one():
    """The quintic iteration keeps the singular vectors (torch.linalg.svd of the input) and takes the singular
    values to a band around 1: measured 0.68 .. 1.13 here (the coefficients trade exactness for speed). Random
    rectangular matrices (smallest normalized singular value ~0.1); a square Gaussian's near-zero ones would need
    more than 5 steps."""
    from gpt.muon import newton_schulz
    torch.manual_seed(0)
    for shape in [(32, 128), (128, 32), (96, 64), (384, 128)]:
        G = torch.randn(*shape, dtype=torch.float64)
        U, _, Vh = torch.linalg.svd(G, full_matrices=False)
        D = U.T @ newton_schulz(G) @ Vh.T  # diagonal when the singular vectors are kept
        off = D - torch.diag(torch.diagonal(D))
        s = torch.diagonal(D)
        assert off.abs().max() < 1e-4 and 0.65 <= s.min() and s.max() <= 1.2, (shape, s.min(), s.max())
        assert torch.allclose(torch.linalg.svdvals(newton_schulz(G)).sort().values, s.sort().values, atol=1e-4)


def test_muon_step_is_an_orthogonalized_nesterov_update():
    """First step (empty momentum buffer): update = G + mu G, and Newton-Schulz ignores the scale, so
    W1 - W0 = -lr sqrt(max(1, rows/cols)) NS(G), which points along U V^T of G's SVD."""
    from gpt.muon import Muon
    torch.manual_seed(0)
    for rows, cols in [(64, 16), (16, 64)]:
        W = torch.nn.Parameter(torch.randn(rows, cols))
        W0 = W.detach().clone()
        W.grad = torch.randn(rows, cols)
        Muon([W], lr=0.1).step()
        step = (W0 - W.detach()) / (0.1 * max(1, rows / cols) ** 0.5)
        U, _, Vh = torch.linalg.svd(W.grad, full_matrices=False)
        polar = U @ Vh
        cos = (step * polar).sum() / (step.norm() * polar.norm())
        s = torch.linalg.svdvals(step)
        assert cos > 0.95 and 0.65 <= s.min() and s.max() <= 1.2


def test_rope_kv_cache_slides_past_the_block_size():
    """RoPE: the cache drops its oldest entry (no re-fill), which is sliding-window attention (each layer sees the
    last block_size positions). Cached greedy decoding far past the block equals uncached decoding, and the
    logits of every step equal one forward pass over the whole text with the band mask; with one layer, that pass
    at position t equals the model run on the window t - bs + 1 .. t alone (the reference for the band)."""
    for n_layer in (1, 3):
        model = tiny_model(block_size=8, n_layer=n_layer, pos_emb="rope", qk_norm=True, norm="rmsnorm").eval()
        torch.manual_seed(3)
        for prompt_len in (3, 40):  # shorter than the block; longer than the receptive field n_layer * 7 + 1
            prompt = torch.randint(0, 20, (2, prompt_len))
            seen, orig = [], model.forward

            def spy(idx, *a, **kw):
                out = orig(idx, *a, **kw)
                seen.append(out[0][:, -1])
                return out
            model.forward = spy
            a = model.generate(prompt, 30, temperature=0, use_cache=True)
            model.forward = orig
            assert torch.equal(a, model.generate(prompt, 30, temperature=0, use_cache=False))
            full = model(a[:, :-1])[0]  # (2, prompt_len + 29, V): one pass, sequence longer than the block
            assert torch.allclose(torch.stack(seen, 1), full[:, prompt_len - 1:], atol=1e-4)
            if n_layer == 1:
                for t in (7, 20, full.size(1) - 1):
                    assert torch.allclose(model(a[:, t - 7:t + 1])[0][:, -1], full[:, t], atol=1e-5)
        caches = [[None, None] for _ in model.blocks]
        model(torch.randint(0, 20, (1, 30)), caches=caches)
        assert all(c[0].size(2) == 7 for c in caches)  # memory stays at block_size - 1 entries


OPTIONS = {"rope": dict(pos_emb="rope"), "rmsnorm": dict(norm="rmsnorm"), "qk_norm": dict(qk_norm=True),
           "swiglu": dict(mlp="swiglu"), "relu2": dict(mlp="relu2"), "muon": dict(optimizer="muon"),
           "modern": {k: v for k, v in vars(train.PRESETS["modern"]).items()
                      if k in ("pos_emb", "norm", "qk_norm", "mlp", "optimizer")}}


@pytest.mark.parametrize("option", list(OPTIONS))
def test_option_trains_resumes_bitwise_and_samples(option, tmp_path, text_file, stop_at):
    """Each option: the loss falls over 30 steps; stopped at 12 and resumed equals the straight run (model and
    optimizer state, Muon's momentum included); sampling past the block size works, cached and uncached."""
    from utils import run as R
    kw = dict(TINY, **OPTIONS[option], text=str(text_file), device="cpu", max_iters=30, eval_interval=10,
              log_interval=1, warmup_iters=3, lr=3e-3)
    train.main(R.preset(train.PRESETS, "default", out_dir=str(tmp_path / "full"), **kw))
    losses = [r["loss"] for r in map(json.loads, open(tmp_path / "full" / "metrics.jsonl")) if "loss" in r]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3, losses
    resume = stop_at(train, 12)
    assert train.main(R.preset(train.PRESETS, "default", out_dir=str(tmp_path / "part"), **kw))["iters"] == 12
    resume()
    train.main(R.preset(train.PRESETS, "default", out_dir=str(tmp_path / "part"), resume=True, **kw))
    c1, c2 = (torch.load(d / "ckpt.pt", weights_only=True) for d in (tmp_path / "full", tmp_path / "part"))
    (m1, o1), (m2, o2) = (c1["model"], c1["optimizer"]), (c2["model"], c2["optimizer"])
    assert c1["step"] == c2["step"] == 30 and m1.keys() == m2.keys()
    for k in m1:
        assert torch.equal(m1[k], m2[k]), k

    def tensors(o, prefix=""):
        if isinstance(o, torch.Tensor):
            yield prefix, o
        elif isinstance(o, dict):
            for k, v in o.items():
                yield from tensors(v, f"{prefix}/{k}")
    t1, t2 = dict(tensors(o1)), dict(tensors(o2))
    assert t1.keys() == t2.keys() and len(t1) > 0
    assert any("momentum_buffer" in k for k in t1) == (option in ("muon", "modern"))
    for k in t1:
        assert torch.equal(t1[k], t2[k]), k
    for use_cache in (True, False):
        sample.main(sample.Config(out_dir=str(tmp_path / "part"), num_samples=1, max_new_tokens=45, prompt="the ",
                                  device="cpu", use_cache=use_cache, output=str(tmp_path / f"gen{use_cache}.txt")))
        assert len((tmp_path / f"gen{use_cache}.txt").read_text()) > 45


def test_modern_preset_and_defaults():
    """The `paper`, `default`, `cpu` and `quick` presets keep the GPT-2-style model and AdamW; `modern` is `cpu`
    with every option on."""
    for name in ("paper", "default", "cpu", "quick"):
        p = train.PRESETS[name]
        assert (p.pos_emb, p.norm, p.qk_norm, p.mlp, p.optimizer) == ("learned", "layernorm", False, "gelu", "adamw")
    m, c = train.PRESETS["modern"], train.PRESETS["cpu"]
    assert (m.pos_emb, m.norm, m.qk_norm, m.optimizer) == ("rope", "rmsnorm", True, "muon") and m.mlp != "gelu"
    assert (m.n_layer, m.n_embd, m.block_size, m.batch_size, m.max_iters, m.lr) == \
        (c.n_layer, c.n_embd, c.block_size, c.batch_size, c.max_iters, c.lr)


@pytest.mark.parametrize("args", [["--pos-emb", "rope", "--n-embd", "30", "--n-head", "10"], ["--muon-lr", "0"],
                                  ["--muon-lr", "-0.02"]])
def test_option_flags_refused_at_parse_time(args, tmp_path, capsys):
    from utils import run as R
    with pytest.raises(SystemExit) as e:
        R.parse(train.Config, train.PRESETS, args=args + ["--out-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error:") and len(err.splitlines()) == 1 and args[0] in err, err


def test_frontier_smoke(tmp_path):
    """gpt/frontier.py with 1-second budgets on a tiny model: both arms and one ablation run, table, figure and
    summary written; each run's schedule is sized from its timed warm-up."""
    from gpt import frontier
    text = tmp_path / "t.txt"
    text.write_text("to be, or not to be, that is the question: whether tis nobler in the mind to suffer\n" * 60)
    s = frontier.main(frontier.Config(out_dir=str(tmp_path / "f"), budgets=(1.0,), ablation_budget=1.0,
                                      ablations=("rope",), text=str(text), calib_iters=5, n_layer=1, n_head=2,
                                      n_embd=16, block_size=16, batch_size=4, eval_iters=1, device="cpu"))
    assert [r["arm"] for r in s["frontier"]] == ["baseline", "modern"]
    assert {r["arm"] for r in s["ablation"]} == {"baseline", "+rope", "modern"} and len(s["runs"]) == 3
    for r in s["runs"]:
        assert r["iters"] >= 1 and math.isfinite(r["val_loss"])
        ckpt = torch.load(tmp_path / "f" / f"{r['arm']}-1s" / "ckpt.pt", weights_only=True)
        assert ckpt["config"]["max_iters"] == r["iters"] == ckpt["step"]
    assert ckpt["config"]["pos_emb"] == "rope" and s["arms"]["modern"]["optimizer"] == "muon"
    assert (tmp_path / "f" / "frontier.png").stat().st_size > 0 and (tmp_path / "f" / "summary.json").exists()


def test_frontier_sizes_each_run_from_the_arms_last_measured_speed(tmp_path, monkeypatch):
    """The warm-up's speed sizes an arm's first budget only: when the machine turns out slower in a real run (here
    20 ms/iter against the warm-up's 10), the next budget is sized from that run and ends on time (a schedule sized
    from the warm-up alone overran the 100 s budget twice over)."""
    from gpt import frontier

    def fake_train(cfg):  # the training loop's summary, on a machine twice as slow outside the warm-up
        per_iter = 0.01 if "calibration" in cfg.out_dir else 0.02
        return {"tokens_per_s": cfg.batch_size * cfg.block_size * cfg.grad_accum / per_iter,
                "wall_s": 1.0 + cfg.max_iters * per_iter, "val_loss": 1.0, "params": 1}
    monkeypatch.setattr(frontier.train, "main", fake_train)
    (tmp_path / "f").mkdir()  # the real training loop makes it
    s = frontier.main(frontier.Config(out_dir=str(tmp_path / "f"), budgets=(10.0, 100.0), ablation_budget=0,
                                      device="cpu"))
    second = [r for r in s["frontier"] if r["budget_s"] == 100.0]
    assert len(second) == 2 and all(abs(r["wall_s"] - 100.0) <= 1.0 for r in second), second


def test_frontier_compares_at_the_wall_time_a_run_took():
    """baseline_at interpolates the baseline frontier linearly in log(wall): hand-computed points, the ends, and no
    extrapolation outside the measured budgets."""
    from gpt.frontier import baseline_at
    pts = [(400.0, 1.5), (100.0, 2.0)]  # any order
    assert baseline_at(pts, 100.0) == 2.0 and baseline_at(pts, 400.0) == 1.5
    assert baseline_at(pts, 200.0) == pytest.approx(1.75)  # halfway in log(wall)
    assert baseline_at(pts, 50.0) is None and baseline_at(pts, 800.0) is None
    assert baseline_at([(100.0, 2.0)], 100.0) == 2.0 and baseline_at([(100.0, 2.0)], 101.0) is None  # one budget
    assert baseline_at([(0.0, 3.0), (100.0, 2.0), (100.0, 2.0)], 100.0) == 2.0  # a 0-s run, a repeated point
