# make test:      installs requests and pytest when missing, then runs the suite.
# make test-real: also installs the real claude CLI (pinned) into .claude-real/ and
#                 runs the tests marked real_claude with it (needs the npm registry).
# make test-compat: the suite against urllib3 1.26 (requests allows urllib3>=1.26,<3),
#                 in a throwaway venv in .venv-compat/ (needs PyPI).
PYTHON ?= python3
PIP_INSTALL = $(PYTHON) -m pip install --quiet --disable-pip-version-check
# No plugin autoload: the suite needs none, and a machine's installed plugins (e.g.
# pytest-benchmark) cost half a second of start-up each run and could change how it runs.
PYTEST = PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 $(PYTHON) -m pytest -q -rs -p no:cacheprovider \
	-o "markers=real_claude: runs the real claude CLI"
CLAUDE_CODE_VERSION = 2.1.197
REAL_CLAUDE = .claude-real/node_modules/.bin/claude

.PHONY: test test-real test-compat deps

test: deps
	$(PYTEST) test_omega.py

test-real: deps $(REAL_CLAUDE)
	OMEGA_REAL_CLAUDE="$(CURDIR)/$(REAL_CLAUDE)" $(PYTEST) -m real_claude test_omega.py

test-compat:
	rm -rf .venv-compat
	$(PYTHON) -m venv .venv-compat
	.venv-compat/bin/python -m pip install --quiet --disable-pip-version-check \
		"urllib3>=1.26,<2" requests pytest
	.venv-compat/bin/python -c "import urllib3; print('urllib3', urllib3.__version__)"
	$(MAKE) test PYTHON=.venv-compat/bin/python

deps:
	@$(PYTHON) -c "import requests, pytest" 2>/dev/null || $(PIP_INSTALL) requests pytest \
		|| $(PIP_INSTALL) --break-system-packages requests pytest

$(REAL_CLAUDE):
	npm install --prefix .claude-real --no-audit --no-fund @anthropic-ai/claude-code@$(CLAUDE_CODE_VERSION)
