# make test: installs requests and pytest when they are missing, then runs the suite.
PYTHON ?= python3
PIP_INSTALL = $(PYTHON) -m pip install --quiet --disable-pip-version-check

.PHONY: test
test:
	@$(PYTHON) -c "import requests, pytest" 2>/dev/null || $(PIP_INSTALL) requests pytest \
		|| $(PIP_INSTALL) --break-system-packages requests pytest
	$(PYTHON) -m pytest -q -p no:cacheprovider test_omega.py
