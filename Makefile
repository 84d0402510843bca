# fermoposta development tasks.  `make run` starts a local provider, `make test`
# runs lint, type checks and the test suite.  Needs python3 >= 3.11 and openssl.

PYTHON ?= python3
VENV = .venv
BIN = $(VENV)/bin
TLS = var/tls

.PHONY: all run test lint clean distclean

all: test

# The virtualenv, rebuilt when pyproject.toml changes.
$(VENV)/.stamp: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
		|| { echo "fermoposta needs Python >= 3.11 ($(PYTHON) is older)" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV) && $(BIN)/pip install -q -e '.[dev]' && touch $@

# A self-signed certificate for localhost, used by examples/provider.toml.
$(TLS)/provider.pem:
	mkdir -p $(TLS)
	openssl req -x509 -newkey rsa:2048 -nodes -days 365 -subj /CN=localhost \
		-addext subjectAltName=DNS:localhost,IP:127.0.0.1 \
		-keyout $(TLS)/provider.key -out $(TLS)/provider.pem
	chmod 600 $(TLS)/provider.key

# Run a provider in the foreground: MX on 127.0.0.1:2525, ODMR on 127.0.0.1:3366.
run: $(VENV)/.stamp $(TLS)/provider.pem
	$(BIN)/fermoposta -c examples/provider.toml provider run

# Lint, type-check, then the whole test suite.
test: $(VENV)/.stamp
	$(BIN)/ruff check src tests && $(BIN)/mypy && $(BIN)/pytest -q

lint: $(VENV)/.stamp
	$(BIN)/ruff check src tests
	$(BIN)/mypy

# Caches and build output.  `distclean` also removes the venv and var/ (the
# local queue database and the test certificate).
clean:
	rm -rf .mypy_cache .ruff_cache .pytest_cache .hypothesis build dist src/*.egg-info
	find src tests -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) var
