# pgfleet tasks. `just --list` shows them.

# Start a local fleet (PostgreSQL, nodes, nginx, Prometheus) and run it until Ctrl-C.
up *ARGS:
    cargo build --release -q -p fleet-app
    cargo run --release -q -p fleetctl -- up {{ARGS}}

# The whole test suite: unit tests and the integration suite against real processes.
test *ARGS:
    cargo test --workspace {{ARGS}}

# Formatting and lints, warnings as errors.
lint:
    cargo fmt --all --check
    cargo clippy --workspace --all-targets -- -D warnings
