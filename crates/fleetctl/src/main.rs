//! `fleetctl`: see the library.

fn main() -> std::process::ExitCode {
    fleetctl::main()
}
