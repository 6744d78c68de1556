# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Pillow-SIMD is only fast when built for the CPU's vector units.
SIMD_CC := cc $(shell grep -q avx2 /proc/cpuinfo 2>/dev/null && echo -mavx2)

.PHONY: install run test test-loaded lint bench mutate clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	# ONNX Runtime's CPU wheel (the `cpu` extra): on an NVIDIA host, README's "GPU hosts".
	$(BIN)/pip install --quiet -e '.[cpu,dev]'
	# torchvision pulls in plain Pillow; Pillow-SIMD replaces it (same PIL package).
	$(BIN)/pip uninstall --quiet -y pillow
	CC="$(SIMD_CC)" $(BIN)/pip install --quiet --no-deps --force-reinstall pillow-simd==12.1.1.post0
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/imgpipe score samples

# Lint and types first (as CI runs it, on a clean machine), then the suite.
test: $(STAMP) lint
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check pipeline workers tests benchmarks
	$(BIN)/mypy

# The bench extra (Celery, for bench_command) is installed by name: `pip install
# .[bench]` would put plain Pillow back over Pillow-SIMD. Same pin as pyproject.toml.
bench: $(STAMP)
	$(BIN)/pip install --quiet 'celery[redis]>=5.5,<6'
	$(BIN)/python -m benchmarks.bench_optimize
	$(BIN)/python -m benchmarks.bench_cache
	$(BIN)/python -m benchmarks.bench_serve
	$(BIN)/python -m benchmarks.bench_startup
	$(BIN)/python -m benchmarks.bench_tta
	$(BIN)/python -m benchmarks.bench_handoff
	$(BIN)/python -m benchmarks.bench_command
	$(BIN)/python -m benchmarks.bench_capacity

# Mutation testing, not part of CI (docs/mutation.md): mutmut over the modules where a
# silent change loses jobs or serves wrong results ([tool.mutmut] in pyproject.toml),
# each mutant against only the tests that reach it; then the survivors and the counts
# per module. Installed by name, as celery above; same pin as pyproject.toml's `mutate`.
# Results stay in mutants/ and only changed functions run again; rm -rf mutants for all.
mutate: $(STAMP)
	$(BIN)/pip install --quiet 'mutmut==3.8.1'
	$(BIN)/mutmut run --max-children 2
	$(BIN)/mutmut results
	$(BIN)/python tools/mutation_counts.py

# The suite three times in a row with every core kept busy (tools/test_under_load.sh).
test-loaded: $(STAMP)
	bash tools/test_under_load.sh 3

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# On a machine with an NVIDIA GPU, offline: GPU tests, accuracy and speed of `imgpipe score`
# on cuda, model-only timings; results in OUT (summary.txt, report.json, logs.tar.gz).
# Uses .venv when it works, else the system python3 plus the wheels in .whl/.
.PHONY: gpu-check
gpu-check:
	bash tools/gpu_check/gpu_check.sh
