//! The `fleet-app` command, built as part of this package so that the suite always runs the node built
//! from the current source (Cargo hands integration tests only their own package's binaries).

fn main() -> std::process::ExitCode {
    fleet_app::cli::main()
}
