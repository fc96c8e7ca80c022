# Two commands do everything on a fresh clone: `make demo` and `make test`.
PY      := .venv/bin/python
PIP     := $(PY) -m pip -q --disable-pip-version-check
STAMP   := .venv/.installed-stamp
OUT     := out/demo

.PHONY: install data test demo bench clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -r requirements.txt
	$(PIP) install --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

# Fashion-MNIST is the embedded default: Debian's dataset-fashion-mnist, else torchvision's download.
data: install
	-$(PY) -m utils.data fetch fashion-mnist

test: install data
	$(PY) -m pytest -q

demo: install data
	@echo "== gpt: char-level GPT on Shakespeare"
	$(PY) gpt/train.py --preset quick --out-dir $(OUT)/gpt
	$(PY) gpt/sample.py --out-dir $(OUT)/gpt --num-samples 3
	@echo "== vit: Vision Transformer on Fashion-MNIST"
	$(PY) vit/train.py --preset quick --out-dir $(OUT)/vit
	$(PY) vit/sample.py --out-dir $(OUT)/vit
	@echo "== ppo: PPO on CartPole-v1"
	$(PY) ppo/train.py --preset quick --out-dir $(OUT)/ppo
	$(PY) ppo/sample.py --out-dir $(OUT)/ppo
	@echo "== nf: Real NVP on Fashion-MNIST"
	$(PY) nf/train.py --preset quick --out-dir $(OUT)/nf
	$(PY) nf/sample.py --out-dir $(OUT)/nf
	@echo "== ddpm: DDPM on Fashion-MNIST"
	$(PY) ddpm/train.py --preset quick --out-dir $(OUT)/ddpm
	$(PY) ddpm/sample.py --out-dir $(OUT)/ddpm --sampler ddim --steps 50 --eta 1
	@echo "== gnns: GCN vs GAT vs MPNN on Fashion-MNIST superpixel graphs (a short run: 5,000 graphs, 4 epochs each)"
	$(PY) gnns/sample.py --preset quick --out-dir $(OUT)/gnns
	@echo
	@echo "Outputs under $(OUT)/:"
	@echo "  gpt/generated.txt                                      samples of the GPT"
	@echo "  vit/confusion.png, predictions.png, attention.png      ViT evaluation"
	@echo "  ppo/episode.gif, eval.json                             the trained CartPole policy"
	@echo "  nf/samples_ranked.png, interpolation.png               Real NVP samples ranked by likelihood"
	@echo "  ddpm/samples_ddim50_eta1.png, reverse_ddim50_eta1.gif  DDPM samples and the reverse process"
	@echo "  gnns/compare.md, curves.png                            the three GNN flavours side by side"
	@$(PY) -c "import json,glob; K=('val_loss','test_acc','eval_return_mean','test_bpd','final_loss'); [print(f'  {p}: {s}') for p in sorted(glob.glob('$(OUT)/*/summary.json')) + sorted(glob.glob('$(OUT)/gnns/*/summary.json')) for s in [', '.join(f'{k}={v:.4g}' for k, v in json.load(open(p)).items() if k in K)] if s]"

bench: install
	$(PIP) install -r requirements-bench.txt
	$(PY) gpt/bench.py
	$(PY) vit/bench.py
	$(PY) ppo/bench.py
	$(PY) gnns/bench.py
	$(PY) ddpm/bench.py

clean:
	rm -rf out .pytest_cache
