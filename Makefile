# vmshift: two commands on a fresh Debian 12 machine (as root): `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
LAB ?= demo

.PHONY: install system venv image demo demo-down test test-unit test-server test-lab test-debian lint clean \
	bench-system bench bench-quick bench-storage bench-encryption bench-concurrent bench-scale bench-drs soak

install: system venv image

system:
	./scripts/install-system.sh

$(BIN)/vmshift: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(BIN)/vmshift

venv: $(BIN)/vmshift

image: venv
	$(BIN)/vmshift image build

demo: install
	./scripts/demo.sh $(LAB)

demo-down: venv
	$(BIN)/vmshift lab down --name $(LAB)

lint: venv
	$(BIN)/ruff check src tests bench/suite bench/storage.py bench/storage_lab.py bench/storage_report.py \
		bench/encryption.py bench/encryption_records.py bench/concurrent_migrations.py bench/scale.py bench/raw_http.py \
		bench/drs_pass.py bench/iscsi_write.py
	$(BIN)/mypy
	$(BIN)/mypy --strict bench/suite
	$(BIN)/mypy --strict bench/storage.py
	$(BIN)/mypy --strict bench/encryption.py bench/encryption_records.py
	$(BIN)/mypy --strict bench/concurrent_migrations.py
	$(BIN)/mypy --strict bench/scale.py
	$(BIN)/mypy --strict bench/drs_pass.py
	$(BIN)/mypy --strict bench/iscsi_write.py

# Unit and server tests run on both cores. On SQLite each test has its own files; on PostgreSQL
# each xdist worker has its own database (vmshift_test_gw0, vmshift_test_gw1: tests/server/conftest.py),
# because every test empties its database's schema.
test-unit: venv
	$(BIN)/pytest -q -n 2 tests/unit

# on SQLite and on PostgreSQL at once (scripts/test-server.sh says why)
test-server: venv
	BIN=$(BIN) ./scripts/test-server.sh

test-lab: venv
	$(BIN)/pytest -q -m "not debian" tests/lab

# issue 10's debian-12 must-show: builds debian-12 (mmdebstrap, cached) and boots it under TCG (docs/images.md)
test-debian: venv
	$(BIN)/pytest -q -m debian tests/lab

test: install lint test-unit test-server test-lab

# Benchmarks and the soak (issue 7): never part of `make test`; docs/performance.md explains them.
N ?= 200
SEED ?=
BENCH_OUT ?= bench/results

bench-system:
	./scripts/install-bench.sh

bench: install bench-system
	$(BIN)/python -m bench.suite.run --out $(BENCH_OUT)

bench-quick: install bench-system
	$(BIN)/python -m bench.suite.run --quick --out $(BENCH_OUT)/quick

# issue 8's storage figures (mirror, pivot stall, sparse cold moves, suspend): docs/performance-storage.md
bench-storage: install
	$(BIN)/python -m bench.storage --out $(BENCH_OUT)

bench-encryption: install
	$(BIN)/python -m bench.encryption --out $(BENCH_OUT)

# issue 12: 8 concurrent live migrations out of one lab host against 8 one by one (docs/performance.md)
bench-concurrent: install
	$(BIN)/python bench/concurrent_migrations.py --json $(BENCH_OUT)/concurrent-latest.json

# issue 12's scale figures: 8-96 simulated hosts (vmshift-hostsim) against one server on PostgreSQL,
# no lab and no QEMU, <= 10 minutes: docs/scale.md
bench-scale: venv
	$(BIN)/python -m bench.scale --out $(BENCH_OUT)

# issue 11's DRS figures: one pass over 96 hosts x 10,000 VMs, growth 8-96 hosts, a simulated day
# against a greedy balancer; pure computation, no lab (docs/drs.md)
bench-drs: venv
	$(BIN)/python bench/drs_pass.py --out $(BENCH_OUT)

soak: install
	$(BIN)/python bench/soak.py --count $(N) $(if $(SEED),--seed $(SEED)) \
		--json $(BENCH_OUT)/soak-latest.json --markdown $(BENCH_OUT)/soak-latest.md

clean:
	rm -rf $(VENV) build src/*.egg-info
