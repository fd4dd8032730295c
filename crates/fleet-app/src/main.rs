//! `fleet-app`: see `fleet_app::cli`.

fn main() -> std::process::ExitCode {
    fleet_app::cli::main()
}
