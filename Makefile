# qlora-study: two commands on a fresh machine.
#   make study   set up, run the default sweep (parameters/default.yaml) on this machine into
#                reports/local/default/ (git ignores it), and write its report beside the published
#                reference reports/default/
#   make test    set up, run the test suite
# Everything is installed from this project's own files into .venv; the default model is fetched
# once into $(QLORA_STUDY_CACHE) (default ~/.cache/qlora-study).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed first and on its own, pinned for reproducible figures (any torch>=2.6 works);
# on a CPU-only machine a CPU build saves several GB:
#   make TORCH='torch --index-url https://download.pytorch.org/whl/cpu'
TORCH ?= torch==2.13.0
SWEEP ?= parameters/default.yaml
export QLORA_STUDY_CACHE ?= $(HOME)/.cache/qlora-study

.PHONY: setup model study test bench clean-venv

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (qlora-study)" >/dev/null
	touch $@

setup: $(VENV)/.installed

model: setup
	$(PY) -m helpers.training.models

study: model
	$(PY) -m helpers.sweep $(SWEEP)

test: model browser
	$(PY) -m pytest $(PYTEST_ARGS)

# A real headless browser for the HTML report test (tests/test_report_html.py): Debian's chromium.
.PHONY: browser
browser:
	@test -x /usr/bin/chromium || { echo "installing Debian's chromium (for the HTML report test)"; \
	  $$([ "$$(id -u)" = 0 ] || echo sudo) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$([ "$$(id -u)" = 0 ] || echo sudo) apt-get install -y -qq chromium; }

bench: model
	$(PY) benchmarks/cpu_step.py

clean-venv:
	rm -rf $(VENV)
