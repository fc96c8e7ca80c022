import json
import os
import subprocess
import sys

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
            batch_size=64, device="cpu", crop_pad=0, cpu_bf16=False)


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


def test_own_attention_equals_sdpa():
    torch.manual_seed(0)
    attn = Attention(32, 4).eval()
    x = torch.randn(2, 17, 32)
    ours, att = attn(x, need_weights=True)
    fused, _ = attn(x)
    q, k, v = attn.to_qkv(x).view(2, 17, 3, 4, 8).permute(2, 0, 3, 1, 4)
    ref = attn.to_out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 17, 32))
    assert torch.allclose(ours, ref, atol=1e-5) and torch.allclose(fused, ref, atol=1e-5)
    assert torch.allclose(att.sum(-1), torch.ones(2, 4, 17), atol=1e-6)


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
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] and s["test_acc"] > 0.5
    assert {"test_acc", "best_test_acc", "epochs", "wall_s", "images_per_s"} <= set(s)
    ev = sample.main(sample.Config(out_dir=str(out), device="cpu"))
    for f in ["ckpt.pt", "best.pt", "metrics.jsonl", "summary.json", "confusion.png", "predictions.png",
              "attention.png", "eval.json"]:
        assert (out / f).exists(), f
    assert abs(ev["test_acc"] - s["best_test_acc"]) < 1e-6
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
    s2 = train.main(tiny(out_dir=str(out), epochs=11, resume=True))
    assert s2["epochs"] == 11


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
