//! The `fleetctl` command, built as part of this package so the suite always runs the current source.

fn main() -> std::process::ExitCode {
    fleetctl::main()
}
