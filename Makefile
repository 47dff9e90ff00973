# Two commands on a fresh clone: `make demo` (the main job) and `make test`.
# Each creates the virtual environment .venv and installs otarena into it when needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install clean ui

# torch's CUDA build and its libraries take about 6 GB in $(VENV); pip would fail midway without it.
NEED_GB ?= 7

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || { free_gb=$$(df -Pk . | awk 'NR==2 {print int($$4 / 1048576)}'); \
		[ "$$free_gb" -ge $(NEED_GB) ] || { echo "error: installing needs about $(NEED_GB) GB free here, only $$free_gb GB left (set NEED_GB to override)"; exit 1; }; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip 2>&1 | grep -v "is ignored" || true
	$(BIN)/python -m pip install --quiet -e ".[dev]" 2>&1 | grep -v "is ignored" || true
	@$(BIN)/python -c "import otarena.methods, otarena.search, otarena.leaderboard, torch, torchvision, ray, mlflow, optuna, pyautoattack" \
		|| { echo "installation failed"; exit 1; }
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/otarena search configs/demo.yaml configs/demo-l2.yaml --out site

# The HTML and LaTeX leaderboard tests drive Debian's chromium and pdflatex (apt, as root or through sudo).
test: $(STAMP)
	sh scripts/ensure-test-tools.sh
	$(BIN)/python -m pytest -q

ui: $(STAMP)
	$(BIN)/otarena ui

# What `make demo` writes (mlruns/: artifacts of stores made before they moved to mlartifacts/), and
# `otarena train`'s runs/.
clean:
	rm -rf site ray_results mlflow.db mlartifacts mlruns runs
