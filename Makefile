# Everything a developer or CI needs starts from a plain `python3` (3.11+).
PYTHON ?= python3
UV_VERSION := 0.13.9
TOOLS := .tools
UV := $(TOOLS)/bin/uv
VENV := .venv
export UV_PYTHON_DOWNLOADS := never
export UV_PROJECT_ENVIRONMENT := $(VENV)

.PHONY: install run migrate test lint fmt bench soak clean example-mcp

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

$(VENV)/.synced: pyproject.toml uv.lock | $(UV)
	$(UV) sync --frozen --python $(shell command -v $(PYTHON))
	@touch $@

install: $(VENV)/.synced

run: install  ## migrate (embedded PostgreSQL unless DATABASE_URL is set) and serve
	$(VENV)/bin/python -m app serve

example-mcp: install  ## the task-manager MCP example (examples/mcp_tasks), next to `make run`
	$(VENV)/bin/python -m examples.mcp_tasks

migrate: install
	$(VENV)/bin/python -m app migrate

test: install  ## the whole suite against a real PostgreSQL
	$(VENV)/bin/pytest

lint: install
	$(VENV)/bin/ruff check app tests bench migrations examples
	$(VENV)/bin/ruff format --check app tests bench migrations examples
	$(VENV)/bin/mypy

fmt: install
	$(VENV)/bin/ruff check --fix app tests bench migrations examples
	$(VENV)/bin/ruff format app tests bench migrations examples

bench: install  ## benchmarks against baselines measured in the same run
	$(VENV)/bin/python -m bench

soak: install  ## 500 concurrent SSE streams for 60 s through one worker, every event checked
	$(VENV)/bin/python -m bench.soak

clean:
	rm -rf $(VENV) $(TOOLS) .pytest_cache .mypy_cache .ruff_cache
