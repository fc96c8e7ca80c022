import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from utils import run as R
from vit import sample, train
from vit.model import Attention, ViT, ViTConfig, attention_rollout

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The pure ViT with a class token, built explicitly (the dataclass defaults are the hybrid `default` preset).
# No crops: the synthetic templates are mid-grey, and black padding would only be noise for them.
TINY = dict(dataset="synthetic", patch_size=7, dim=32, depth=2, heads=2, mlp_dim=64, stem=0, pool="cls",
            batch_size=64, device="cpu", crop_pad=0, cpu_bf16=False, val_size=256)


def tiny(**kw):
    return R.preset(train.PRESETS, "default", **{**TINY, **kw})


@pytest.mark.parametrize("size,chans,patch", [(28, 1, 4), (32, 3, 4), (28, 1, 7)])
@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_shapes_and_token_count(size, chans, patch, pool):
    m = ViT(ViTConfig(image_size=size, in_chans=chans, patch_size=patch, dim=32, depth=2, heads=2, mlp_dim=64,
                      pool=pool, pos_emb="sincos" if pool == "mean" else "learned"))
    logits, atts = m(torch.randn(3, chans, size, size), need_weights=True)
    n = (size // patch) ** 2 + (pool == "cls")
    assert logits.shape == (3, 10) and atts[0].shape == (3, 2, n, n)
    assert attention_rollout(atts, pool == "cls").shape == (3, (size // patch) ** 2)


def test_hybrid_stem_feeds_the_patches():
    m = ViT(ViTConfig(patch_size=7, dim=32, depth=2, heads=2, mlp_dim=64, stem=8))
    assert m.patch_embed.proj.in_features == 8 * 7 * 7  # patches of the 8-channel feature map, not of pixels
    logits, atts = m(torch.randn(3, 1, 28, 28), need_weights=True)
    assert logits.shape == (3, 10) and atts[0].shape == (3, 2, 17, 17)
    m.head.weight.data.normal_()  # the zero-initialised head would block the gradient
    m(torch.randn(3, 1, 28, 28)).sum().backward()
    assert m.patch_embed.stem[0].weight.grad.abs().sum() > 0


def test_patch_embedding_equals_unfold():
    """x_p^i E against F.unfold's patches (ordered channel-major, ours pixel-major: the weight is permuted)."""
    torch.manual_seed(0)
    cfg = ViTConfig(image_size=32, in_chans=3, patch_size=4, dim=24)
    m = ViT(cfg).patch_embed
    x = torch.randn(2, 3, 32, 32)
    W = m.proj.weight.view(24, 4, 4, 3).permute(0, 3, 1, 2).reshape(24, 48)  # (D, P P C) -> (D, C P P)
    ref = F.linear(F.unfold(x, kernel_size=4, stride=4).transpose(1, 2), W, m.proj.bias)  # (B, N, D)
    assert torch.allclose(m(x), ref, atol=1e-5)


def test_both_attention_paths_equal_sdpa_and_the_softmax_formula():
    torch.manual_seed(0)
    attn = Attention(32, 4).eval()
    x = torch.randn(2, 17, 32)
    written, att = attn(x, fused=False, need_weights=True)
    fused, no_att = attn(x, fused=True)
    assert no_att is None  # the fused kernel really ran
    q, k, v = attn.to_qkv(x).view(2, 17, 3, 4, 8).permute(2, 0, 3, 1, 4)
    ref = attn.to_out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 17, 32))
    assert torch.allclose(written, ref, atol=1e-5) and torch.allclose(fused, ref, atol=1e-5)
    # A by the formula, head by head with explicit loops
    for b in range(2):
        for h in range(4):
            s = torch.stack([torch.stack([q[b, h, i] @ k[b, h, j] / 8 ** 0.5 for j in range(17)]) for i in range(17)])
            assert torch.allclose(att[b, h], torch.exp(s) / torch.exp(s).sum(-1, keepdim=True), atol=1e-5)
    assert torch.allclose(attn(x)[0], written)  # on the CPU the default is the written-out path


def test_attention_rollout_by_hand():
    """Two layers, three tokens. Layer 1: heads [[0,1,0],[0,1,0],[0,0,1]] and [[0,0,1],[1,0,0],[0,0,1]]; after the
    head mean, + I and row normalisation A1 = [[1/2,1/4,1/4],[1/4,3/4,0],[0,0,1]]. Layer 2: uniform heads, so
    A2 = (1/3 + I) / 2. Rollout A2 A1 has row 0 = [9, 7, 8] / 24 and column means [1/4, 1/3, 5/12]."""
    h1 = torch.tensor([[[0., 1, 0], [0, 1, 0], [0, 0, 1]], [[0, 0, 1], [1, 0, 0], [0, 0, 1]]])
    h2 = torch.full((2, 3, 3), 1 / 3)
    atts = [h1[None], h2[None]]  # (B=1, h=2, N=3, N=3) per layer
    assert torch.allclose(attention_rollout(atts, has_cls=True), torch.tensor([[7 / 24, 8 / 24]]))
    assert torch.allclose(attention_rollout(atts, has_cls=False), torch.tensor([[1 / 4, 1 / 3, 5 / 12]]))


def test_no_weight_decay_on_tokens_position_embeddings_norms_and_biases():
    m = ViT(ViTConfig(patch_size=7, dim=32, depth=2, heads=2, mlp_dim=64, pool="cls", stem=4))
    groups = train.param_groups(m, 0.05)
    names = {id(p): n for n, p in m.named_parameters()}
    decayed = [names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]]
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(id(p) for p in m.parameters())
    assert not [n for n in decayed if "token" in n or "pos_emb" in n or "norm" in n or n.endswith("bias")], decayed
    assert "blocks.0.attn.to_qkv.weight" in decayed and "patch_embed.stem.0.weight" in decayed


def test_evaluate_keeps_the_mode_and_batchnorm_statistics(tmp_path):
    torch.manual_seed(0)
    m = ViT(ViTConfig(patch_size=7, dim=32, depth=2, heads=2, mlp_dim=64, stem=4, drop_path=0.5, dropout=0.2))
    m.head.weight.data.normal_()  # a zero head would make every prediction the same
    x, y = torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8), torch.arange(16) % 10
    for mode in (True, False):
        m.train(mode)
        bn = {k: v.clone() for k, v in m.state_dict().items() if "running" in k or "num_batches" in k}
        train.evaluate(m, x, y, torch.device("cpu"))
        assert m.training == mode
        assert all(torch.equal(v, m.state_dict()[k]) for k, v in bn.items())
    # sample.py's order: evaluate, then the rollout figure, twice on the same images: the same maps
    with torch.no_grad():
        train.evaluate(m, x, y, torch.device("cpu"))
        r1 = sample.rollout_figure(m, x[:4], [str(i) for i in range(10)], tmp_path / "a.png", torch.device("cpu"))
        r2 = sample.rollout_figure(m, x[:4], [str(i) for i in range(10)], tmp_path / "b.png", torch.device("cpu"))
    assert torch.equal(r1, r2)


@pytest.mark.parametrize("where", ["before", "inside", "update"])
def test_resume_after_a_mid_epoch_interrupt_continues_exactly(where, tmp_path, monkeypatch, sigterm_after_update):
    """Ctrl-C inside epoch 2 (before a step; inside it, after the forward pass moved the stem's BatchNorm statistics;
    or a SIGTERM at the end of its optimizer update), then --resume: the LR sequence, the per-epoch metrics and the
    final weights and buffers equal those of the uninterrupted run (the hybrid, with BatchNorm, drop path, crops and
    flips drawing random numbers)."""
    kw = dict(epochs=2, stem=4, crop_pad=2, drop_path=0.2, lr=3e-3, warmup_epochs=0.5, val_size=768, batch_size=32)
    lrs = []
    real_lr_at = train.lr_at

    def recording(step, total, warmup, lr, stop_at=None):
        if step == stop_at:
            raise KeyboardInterrupt
        lrs.append(real_lr_at(step, total, warmup, lr))
        return lrs[-1]

    monkeypatch.setattr(train, "lr_at", recording)
    train.main(tiny(out_dir=str(tmp_path / "a"), **kw))
    full = list(lrs)
    lrs.clear()
    n = len(full)
    real_clip, clips = torch.nn.utils.clip_grad_norm_, []

    def clip_then_stop(*a, **k):  # step n * 3 // 4, after its forward and backward
        clips.append(1)
        if len(clips) == n * 3 // 4 + 1:
            raise KeyboardInterrupt
        return real_clip(*a, **k)
    disarm = lambda: None  # noqa: E731
    if where == "before":
        monkeypatch.setattr(train, "lr_at", lambda *a: recording(*a, stop_at=n * 3 // 4))
    elif where == "inside":
        monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_then_stop)
        disarm = lambda: monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", real_clip)  # noqa: E731
    else:
        disarm = sigterm_after_update(n * 3 // 4 - 1)
    train.main(tiny(out_dir=str(tmp_path / "b"), **kw))
    disarm()
    if where == "inside":
        lrs.pop()  # the interrupted step's LR: the resumed run redoes that step
    assert len(lrs) == n * 3 // 4
    monkeypatch.setattr(train, "lr_at", recording)
    train.main(tiny(out_dir=str(tmp_path / "b"), resume=True, **kw))
    assert lrs == full
    a, b = (torch.load(tmp_path / r / "ckpt.pt", weights_only=True)["model"] for r in "ab")
    differ = [k for k in a if not torch.allclose(a[k].float(), b[k].float(), atol=1e-6)]
    assert not differ, differ
    ra, rb = ([(r["train_loss"], r["val_acc"]) for r in R.read_jsonl(tmp_path / x / "metrics.jsonl")
               if "train_loss" in r] for x in "ab")
    assert len(ra) == 2 and ra == rb


def test_a_stop_in_the_epoch_bookkeeping_waits_for_its_row_and_checkpoint(tmp_path, monkeypatch):
    """A SIGTERM while epoch 1 writes best.pt waits for the epoch's log row and ckpt.pt: the resumed run's
    metrics.jsonl has every epoch's row, and its weights and selection equal the uninterrupted run's."""
    import signal
    kw = dict(epochs=2, val_size=768, batch_size=64)
    train.main(tiny(out_dir=str(tmp_path / "a"), **kw))
    real_save, calls = R.save_checkpoint, []

    def save(obj, path):
        if Path(path).name == "best.pt" and not calls:
            calls.append(1)
            signal.raise_signal(signal.SIGTERM)  # held by the save, delivered after it
        return real_save(obj, path)
    monkeypatch.setattr(R, "save_checkpoint", save)
    assert not train.main(tiny(out_dir=str(tmp_path / "b"), **kw))["finished"]
    monkeypatch.setattr(R, "save_checkpoint", real_save)
    train.main(tiny(out_dir=str(tmp_path / "b"), resume=True, **kw))
    ra, rb = ([(r["epoch"], r["train_loss"], r["val_acc"]) for r in R.read_jsonl(tmp_path / x / "metrics.jsonl")
               if "train_loss" in r] for x in "ab")
    assert len(ra) == 2 and ra == rb
    a, b = (torch.load(tmp_path / r / "best.pt", weights_only=True) for r in "ab")
    assert a["epoch"] == b["epoch"] and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_lr_schedule_ends_at_zero_and_never_rises_again():
    lrs = [train.lr_at(s, 100, 10, 1.0) for s in range(120)]
    assert lrs[9] == 1.0 and lrs[99] < 1e-3 and lrs[100:] == [0.0] * 20


def test_tiny_model_overfits_32_images():
    torch.manual_seed(0)
    m = ViT(ViTConfig(patch_size=7, dim=32, depth=2, heads=2, mlp_dim=64, drop_path=0.0))
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    for _ in range(150):
        loss = F.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (m(x).argmax(-1) == y).float().mean() == 1.0


def test_smoke_train_evaluate_and_classify_png(tmp_path):
    out = tmp_path / "run"
    s = train.main(tiny(out_dir=str(out), epochs=10, lr=3e-3))
    rows = [json.loads(line) for line in open(out / "metrics.jsonl") if "train_loss" in line]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] and s["test_acc"] > 0.5
    assert {"test_acc", "val_acc", "selected", "best_epoch", "epochs", "wall_s", "images_per_s"} <= set(s)
    ev = sample.main(sample.Config(out_dir=str(out), device="cpu"))
    for f in ["ckpt.pt", "best.pt", "metrics.jsonl", "summary.json", "confusion.png", "predictions.png",
              "attention.png", "eval.json"]:
        assert (out / f).exists(), f
    assert abs(ev["test_acc"] - s["test_acc"]) < 1e-6 and ev["epoch"] == s["best_epoch"]  # the selected checkpoint
    from PIL import Image
    Image.fromarray(np.random.randint(0, 255, (50, 40, 3), dtype=np.uint8)).save(tmp_path / "mine.png")
    r = subprocess.run([sys.executable, "vit/sample.py", "--out-dir", str(out), "--device", "cpu",
                        "--images", str(tmp_path / "mine.png")], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("%") == 3
    (tmp_path / "bad.png").write_bytes(b"not an image")
    r = subprocess.run([sys.executable, "vit/sample.py", "--out-dir", str(out), "--images", str(tmp_path / "bad.png")],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and "cannot decode" in r.stderr and "Traceback" not in r.stderr
    s2 = train.main(tiny(out_dir=str(out), epochs=11, lr=3e-3, resume=True))
    assert s2["epochs"] == 11


@pytest.mark.parametrize("val_size", [300, 0])
def test_checkpoint_selected_on_validation_and_the_test_set_used_once(tmp_path, monkeypatch, val_size):
    """best.pt is the epoch of the best validation accuracy; the test images go through the model exactly once, at
    the end, on that checkpoint (on the last epoch's model without a validation split, and then no best.pt)."""
    from utils import data as D
    test_sets, calls = [], []
    load, evaluate = D.load_images, train.evaluate
    monkeypatch.setattr(D, "load_images", lambda name, split, *a: test_sets.append(load(name, split, *a)) or
                        test_sets[-1] if split == "test" else load(name, split, *a))
    monkeypatch.setattr(train, "evaluate", lambda m, x, *a, **k: calls.append(x is test_sets[0][0]) or
                        evaluate(m, x, *a, **k))
    out = tmp_path / "run"
    s = train.main(tiny(out_dir=str(out), epochs=4, lr=3e-3, val_size=val_size, batch_size=32))
    assert calls == ([False] * 4 if val_size else []) + [True]
    rows = [r for r in R.read_jsonl(out / "metrics.jsonl") if "train_loss" in r]
    if val_size:
        best = max(range(4), key=lambda i: (rows[i]["val_acc"], -i))
        assert s["best_epoch"] == best + 1 and s["val_size"] == val_size
        assert abs(s["val_acc"] - rows[best]["val_acc"]) < 1e-6
        ckpt = torch.load(out / "best.pt", weights_only=True)
        assert ckpt["epoch"] == best + 1
    else:
        assert not (out / "best.pt").exists() and s["best_epoch"] == 4 and "val_acc" not in rows[0]
        ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    m = ViT(ViTConfig(**ckpt["model_config"]))
    m.load_state_dict(ckpt["model"])
    assert s["test_acc"] == evaluate(m, *test_sets[0], torch.device("cpu"))[0]


def test_bad_input_exits_2(tmp_path):
    from utils.run import save_checkpoint
    save_checkpoint({"kind": "gpt"}, tmp_path / "ckpt.pt")
    for cfg in [train.Config(dataset="imagenet"), tiny(patch_size=5), tiny(out_dir=str(tmp_path), resume=True)]:
        with pytest.raises(SystemExit) as e:
            train.main(cfg)
        assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        sample.main(sample.Config(out_dir=str(tmp_path)))
    assert e.value.code == 2


def test_ddp_two_processes(tmp_path):
    args = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        "29534", "vit/train.py", "--out-dir", str(tmp_path), "--epochs", "6", "--lr", "3e-3", *args], cwd=REPO,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.load(open(tmp_path / "summary.json"))
    assert s["world_size"] == 2 and s["epochs"] == 6 and s["test_acc"] > 0.2
