# Everything a developer or CI needs starts from a plain `python3` (3.11 to 3.14).
PYTHON ?= python3
UV_VERSION := 0.13.9
TOOLS := .tools
UV := $(TOOLS)/bin/uv
VENV := .venv
export UV_PYTHON_DOWNLOADS := never
export UV_PROJECT_ENVIRONMENT := $(VENV)

.PHONY: install run migrate test lint fmt bench soak soak-reconnect clean example-mcp

# One line saying what to install when the interpreter cannot bootstrap the tools.
define CHECK_PYTHON
command -v $(PYTHON) >/dev/null 2>&1 || { echo "chatkit-pg: $(PYTHON) not found: install Python 3.11 or newer (or run make PYTHON=/path/to/python3)" >&2; exit 1; }; \
$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "chatkit-pg: $$($(PYTHON) -V 2>&1) is too old: install Python 3.11 or newer (or run make PYTHON=/path/to/python3)" >&2; exit 1; }; \
$(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || { echo "chatkit-pg: $(PYTHON) cannot create a virtual environment: install its venv module (Debian/Ubuntu: apt install python3-venv)" >&2; exit 1; }
endef

$(UV):
	@$(CHECK_PYTHON)
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
	$(VENV)/bin/lint-imports

fmt: install
	$(VENV)/bin/ruff check --fix app tests bench migrations examples
	$(VENV)/bin/ruff format app tests bench migrations examples

bench: install  ## benchmarks against baselines measured in the same run
	$(VENV)/bin/python -m bench

soak: install  ## 500 concurrent SSE streams for 60 s through one worker, every event checked; plain, then resumable
	$(VENV)/bin/python -m bench.soak

soak-reconnect: install  ## 200 resumable replies cut 1-3 times and resumed through two processes, every event checked
	$(VENV)/bin/python -m bench.reconnect_soak

clean:
	rm -rf $(VENV) $(TOOLS) .pytest_cache .mypy_cache .ruff_cache
