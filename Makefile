# The project's verbs. Each target is one command you could also type yourself.
#   make install   build and install the package (what the README documents)
#   make develop   build the extension in place, for working on the sources
#   make test      run the test suite (needs a Hopper GPU for the kernel tests)
#   make bench     run the decode benchmark
#   make sass      registers / smem / HGMMA / spill summary of the built extension
#   make h100      build + sass + test + bench on an H100 (see scripts/h100.sh)
#   make clean     remove build outputs
PYTHON ?= python3
OUT    ?= bench_out/h100

.PHONY: install develop test bench sass h100 clean

install:
	$(PYTHON) -m pip install nvidia-cutlass ninja
	$(PYTHON) -m pip install --no-build-isolation -v .

develop:
	$(PYTHON) setup.py build_ext --inplace

test:
	$(PYTHON) -m pytest tests -q

# PYTHONPATH: the benchmark is a script in benchmarks/, so the checkout is not on sys.path.
bench:
	PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} $(PYTHON) benchmarks/bench_decode.py

sass:
	bash scripts/sass_report.sh

h100:
	bash scripts/h100.sh $(OUT)

clean:
	rm -rf build dist *.egg-info flash_gla/_C*.so .pytest_cache
	find . -name __pycache__ -type d -not -path './.git/*' -prune -exec rm -rf {} +
