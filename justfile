# pgfleet tasks. `just --list` shows them.

# Start a local fleet (PostgreSQL, nodes, nginx, Prometheus) and run it until Ctrl-C: the README's first command.
up *ARGS:
    scripts/up {{ARGS}}

# Benchmark the standard set into bench/latest/ (about 10 minutes on 2 cores): every workload at
# 4 nodes × pool 5 beside pgbench and COPY (and the HTTP ceiling), each with its probes at 1 and 8
# connections, pool and node sweeps, nodes with one transaction per increment as a baseline. ARGS go to `fleetctl bench` (see `--help`), e.g. `just bench --duration 5`.
bench *ARGS:
    cargo build --release -q -p fleet-app -p fleetctl
    target/release/fleetctl bench --baseline-env INCREMENT_MODE=transaction {{ARGS}}

# The whole test suite: unit tests and the integration suite against real processes (the README's second command).
test *ARGS:
    scripts/test {{ARGS}}

# Formatting and lints, warnings as errors.
lint:
    scripts/lint
