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
	@echo "== gpt: char-level GPT on Shakespeare (quick preset)"
	$(PY) gpt/train.py --preset quick --out-dir $(OUT)/gpt
	$(PY) gpt/sample.py --out-dir $(OUT)/gpt --num-samples 3
	@echo "== vit: Vision Transformer on Fashion-MNIST (quick preset)"
	$(PY) vit/train.py --preset quick --out-dir $(OUT)/vit
	$(PY) vit/sample.py --out-dir $(OUT)/vit
	@echo "== ppo: PPO on CartPole-v1 (quick preset)"
	$(PY) ppo/train.py --preset quick --out-dir $(OUT)/ppo
	$(PY) ppo/sample.py --out-dir $(OUT)/ppo
	@echo
	@echo "Outputs:"
	@echo "  $(OUT)/gpt/generated.txt                  samples of the GPT"
	@echo "  $(OUT)/vit/summary.json, confusion.png, attention.png"
	@echo "  $(OUT)/ppo/summary.json, episode.gif"
	@grep -h '"\(test_acc\|val_loss\|eval_return_mean\)"' $(OUT)/*/summary.json || true

clean:
	rm -rf out .pytest_cache
