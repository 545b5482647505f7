# The project's verbs. Each target is one command you could also type yourself; a bare
# `make` only lists them (it must not start a five-minute build by accident).
PYTHON    ?= python3
OUT       ?= bench_out/gpu-check
BENCH_OUT ?= bench_out

.DEFAULT_GOAL := help
.PHONY: help install develop wheel test quickstart layer bench serving sass sanitize gpu-check clean

help:
	@echo "flash_gla: make VERB, where VERB is one of"
	@echo "  make install     install torch (if absent), the build and test tools, and build flash_gla"
	@echo "                   (the README's install command, with -v to show the compile)"
	@echo "  make develop     build the extension in place, for working on the sources"
	@echo "  make wheel       build dist/flash_gla-<version>-cp310-abi3-linux_x86_64.whl (any torch >= 2.10)"
	@echo "  make test        run the test suite (the kernel tests need an sm_90 GPU)"
	@echo "  make quickstart  run examples/quickstart.py (kernels vs. reference; reference only without a GPU)"
	@echo "  make layer       run examples/gla_decode_layer.py (an engine's GLA-2 decode step vs. a float32 model)"
	@echo "  make bench       run the decode benchmark (Hopper GPU); table on stdout, $(BENCH_OUT)/bench.json and .png"
	@echo "  make serving     60-layer decode steps of 64 requests (GLA-2 vs. MLA); $(BENCH_OUT)/serving.json and .png"
	@echo "  make sass        registers / smem / HGMMA / spill summary of the built extension"
	@echo "  make sanitize    compute-sanitizer memcheck, racecheck and synccheck over one small call per"
	@echo "                   compiled decode instance (scripts/sanitizer_check.sh; logs in $(BENCH_OUT)/sanitizer)"
	@echo "  make gpu-check   build + sass + test + bench on a Hopper GPU (H100 or H200), logs in $(OUT)"
	@echo "                   (scripts/gpu_check.sh; WHEEL=dist/flash_gla-...whl installs that wheel instead of building)"
	@echo "  make clean       remove build outputs"

install:
	$(PYTHON) -m pip install torch setuptools wheel ninja nvidia-cutlass
	$(PYTHON) -m pip install --no-build-isolation -v ".[test]"

develop:
	$(PYTHON) setup.py build_ext --inplace

wheel:
	$(PYTHON) -m pip wheel --no-build-isolation --no-deps -w dist .

test:
	$(PYTHON) -m pytest tests -q

# PYTHONPATH: these are scripts outside the package, so the checkout is not on sys.path.
quickstart:
	PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} $(PYTHON) examples/quickstart.py

layer:
	PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} $(PYTHON) examples/gla_decode_layer.py

bench:
	PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} $(PYTHON) benchmarks/bench_decode.py --out $(BENCH_OUT)

serving:
	PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} $(PYTHON) benchmarks/bench_serving.py --out $(BENCH_OUT)

sass:
	bash scripts/sass_report.sh

sanitize:
	bash scripts/sanitizer_check.sh $(BENCH_OUT)/sanitizer

gpu-check:
	bash scripts/gpu_check.sh $(OUT)

clean:
	rm -rf build dist *.egg-info flash_gla/_C*.so flash_gla/_build_info.py .pytest_cache
	find . -name __pycache__ -type d -not -path './.git/*' -not -path './.venv/*' -prune -exec rm -rf {} +
