//! The `fleet-app` command line: `serve` (default), `migrate`, `healthcheck`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;

use crate::config::Config;
use crate::startup::{self, Application};
use crate::telemetry;

const USAGE: &str = "usage: fleet-app [serve|migrate|healthcheck]
  serve        run the node (default)
  migrate      apply pending schema migrations and exit
  healthcheck  exit 0 if the node on 127.0.0.1:$PORT is ready (for container HEALTHCHECKs)
Configuration comes from the environment; see docs/configuration.md.";

/// Runs the command named by the first argument; errors are printed, and the exit code is non-zero.
pub fn main() -> ExitCode {
    let command = std::env::args().nth(1).unwrap_or_else(|| "serve".to_owned());
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("fleet-app: {e:#}");
            return ExitCode::from(2);
        }
    };
    let result = match command.as_str() {
        "serve" => {
            run_async(config, |config| async { Application::build(config).await?.run_until_stopped().await })
        }
        "migrate" => run_async(config, |config| async move { startup::migrate(&config).await }),
        "healthcheck" => healthcheck(config.port),
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            Ok(())
        }
        other => {
            eprintln!("fleet-app: unknown command {other:?}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "fatal");
            eprintln!("fleet-app: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_async<F, Fut>(config: Config, f: F) -> anyhow::Result<()>
where
    F: FnOnce(Config) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    telemetry::init(config.log_format);
    actix_web::rt::System::new().block_on(f(config))
}

/// `GET /health/ready` on the local node, with a plain HTTP/1.0 request (no curl in the image).
fn healthcheck(port: u16) -> anyhow::Result<()> {
    let timeout = Duration::from_secs(3);
    // A stopping node turns new connections away by not answering them (see `listener`): bounded too.
    let mut stream = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), timeout)
        .with_context(|| format!("no node on port {port}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(b"GET /health/ready HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response.lines().next().unwrap_or_default();
    anyhow::ensure!(status.split_whitespace().nth(1) == Some("200"), "not ready: {status}");
    Ok(())
}
