# Everything runs from a virtualenv built here from requirements*.txt.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export DATABASE_URL ?= sqlite:///data/dedup.db

.PHONY: venv run publish test lint bench bench-growth bench-cluster soak clean

$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

venv: $(STAMP)

## run: the aggregator on http://127.0.0.1:8080 (Ctrl-C stops it gracefully, as SIGTERM does)
run: venv
	$(BIN)/gunicorn --config app/gunicorn.conf.py "app:create_app()" --bind 127.0.0.1:8080

## publish: send 5,000 events with 20% duplicates to the running aggregator
publish: venv
	$(BIN)/python -m publisher --url http://127.0.0.1:8080 --events 5000 --duplicate-rate 0.2

## test: every test (unit, real gunicorn, real browser, real docker compose), in two
## processes: half the suite's time is spent waiting (for servers, timeouts, builds)
test: venv
	$(BIN)/python -m pytest -n 2 --dist loadgroup

lint: venv
	$(BIN)/ruff check .

## bench: ingest in batches of 500 and of 10 (against a reference SQLite loop and the in-process
## ceiling), latency against offered load, the publisher CLI's memory (~3 min; figures in
## bench/results, plots in bench/figures)
bench: venv
	$(BIN)/python -m bench.ingest --runs 3
	$(BIN)/python -m bench.ingest --runs 3 --batch-size 10 --events 40000 --skip-ceiling \
		--target 8000 --json bench/results/ingest-10.json
	$(BIN)/python -m bench.latency
	$(BIN)/python -m bench.publisher_rss

## bench-growth: fill the store to 10 million events, timing ingest and reads on the way (2-10 min, 3 GB disk)
bench-growth: venv
	$(BIN)/python -m bench.growth

## bench-cluster: 1 and 3 replicas on one PostgreSQL (started from the machine's binaries) vs SQLite (~2 min)
bench-cluster: venv
	$(BIN)/python -m bench.cluster --runs 3

## soak: 5 cycles of load + SIGKILL of the whole server + restart, then audit the database
soak: venv
	$(BIN)/python -m bench.crash_soak --cycles 5

clean:
	rm -rf $(VENV) .pytest_cache bench/results
