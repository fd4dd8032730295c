//! Finding the server binaries (PostgreSQL, nginx, Prometheus) a local fleet runs.
//!
//! Environment variables (each, when set, is the only place looked at, so a wrong value is an error
//! rather than a silent fallback):
//! - `PG_BIN`: a directory holding `postgres`, `initdb`, `pg_ctl`, `psql`, `pgbench`, `pg_isready`.
//! - `NGINX_BIN`: the path of the `nginx` binary.
//! - `PROMETHEUS_BIN`: the path of the `prometheus` binary; `promtool` is looked for next to it.
//! - `POSTGRES_EXPORTER_BIN`: the path of `prometheus-postgres-exporter`.
//! - `ETCD_BIN`: the path of the `etcd` binary.
//! - `PATRONI_BIN`: the path of the `patroni` program (its venv's `bin/`, where `patronictl` sits too).

use std::ffi::{OsStr, OsString};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

/// Where Debian and Ubuntu install each PostgreSQL major version's binaries: `<root>/<version>/bin`.
const POSTGRES_VERSIONS_ROOT: &str = "/usr/lib/postgresql";

/// Finds a PostgreSQL binary (`postgres`, `initdb`, `pg_ctl`, `pg_isready`, `psql`, `pgbench`):
/// `$PG_BIN/<name>`, else PATH, else `pg_config --bindir`, else `/usr/lib/postgresql/*/bin`
/// (highest version first).
pub fn postgres_bin(name: &str) -> anyhow::Result<PathBuf> {
    find_postgres_bin(
        name,
        std::env::var_os("PG_BIN").as_deref(),
        std::env::var_os("PATH").as_deref(),
        pg_config_bindir,
        Path::new(POSTGRES_VERSIONS_ROOT),
    )
}

/// [`postgres_bin`] with its inputs spelled out: the `PG_BIN` and `PATH` values, how to ask
/// `pg_config` (only called when PATH has no `name`), and the versioned directories' root.
fn find_postgres_bin(
    name: &str,
    pg_bin: Option<&OsStr>,
    path: Option<&OsStr>,
    pg_config_bindir: impl FnOnce() -> Option<PathBuf>,
    versions_root: &Path,
) -> anyhow::Result<PathBuf> {
    if let Some(dir) = pg_bin {
        return in_override_dir(name, Path::new(dir), "PG_BIN");
    }
    on_path(name, path)
        .or_else(|| pg_config_bindir().and_then(|dir| executable_in(&dir, name)))
        .or_else(|| in_versioned_dirs(name, versions_root))
        .with_context(|| not_found(name, "postgresql", "PG_BIN (a directory)"))
}

/// Finds nginx: `$NGINX_BIN`, else PATH, else `/usr/sbin/nginx` (not on a normal user's PATH).
pub fn nginx_bin() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("NGINX_BIN") {
        return override_file(Path::new(&path), "NGINX_BIN");
    }
    on_path("nginx", std::env::var_os("PATH").as_deref())
        .or_else(|| executable_in(Path::new("/usr/sbin"), "nginx"))
        .with_context(|| not_found("nginx", "nginx", "NGINX_BIN (the binary)"))
}

/// Finds `prometheus` or `promtool`: `$PROMETHEUS_BIN` (for `promtool`: the file next to it), else PATH.
pub fn prometheus_bin(name: &str) -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("PROMETHEUS_BIN") {
        let path = PathBuf::from(path);
        if name == "prometheus" {
            return override_file(&path, "PROMETHEUS_BIN");
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        return in_override_dir(name, dir, "PROMETHEUS_BIN's directory");
    }
    on_path(name, std::env::var_os("PATH").as_deref())
        .with_context(|| not_found(name, "prometheus", "PROMETHEUS_BIN (the prometheus binary)"))
}

/// Finds PostgreSQL's Prometheus exporter: `$POSTGRES_EXPORTER_BIN`, else `prometheus-postgres-exporter` on PATH.
pub fn exporter_bin() -> anyhow::Result<PathBuf> {
    const NAME: &str = "prometheus-postgres-exporter";
    if let Some(path) = std::env::var_os("POSTGRES_EXPORTER_BIN") {
        return override_file(Path::new(&path), "POSTGRES_EXPORTER_BIN");
    }
    on_path(NAME, std::env::var_os("PATH").as_deref())
        .or_else(|| executable_in(Path::new("/usr/bin"), NAME))
        .with_context(|| not_found(NAME, NAME, "POSTGRES_EXPORTER_BIN (the binary)"))
}

/// Finds etcd: `$ETCD_BIN`, else PATH.
pub fn etcd_bin() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("ETCD_BIN") {
        return override_file(Path::new(&path), "ETCD_BIN");
    }
    on_path("etcd", std::env::var_os("PATH").as_deref())
        .with_context(|| not_found("etcd", "etcd-server", "ETCD_BIN (the binary)"))
}

/// Where `scripts/install-patroni` builds Patroni's venv: outside any home directory, so that the
/// `postgres` user (who runs it) can read it.
pub const PATRONI_VENV: &str = "/opt/pgfleet/patroni";

/// Finds `patroni`: `$PATRONI_BIN`, else the venv [`PATRONI_VENV`], else PATH.
pub fn patroni_bin() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("PATRONI_BIN") {
        return override_file(Path::new(&path), "PATRONI_BIN");
    }
    executable_in(&Path::new(PATRONI_VENV).join("bin"), "patroni")
        .or_else(|| on_path("patroni", std::env::var_os("PATH").as_deref()))
        .with_context(|| {
            format!(
                "cannot find `patroni`; run scripts/install-patroni (it builds a venv in {PATRONI_VENV} \
                 from PyPI's `patroni`) or set PATRONI_BIN"
            )
        })
}

fn not_found(name: &str, package: &str, variable: &str) -> String {
    format!(
        "cannot find the `{name}` binary; install the Debian package `{package}` \
         (apt-get install {package}) or set {variable}"
    )
}

fn in_override_dir(name: &str, dir: &Path, variable: &str) -> anyhow::Result<PathBuf> {
    match executable_in(dir, name) {
        Some(path) => Ok(path),
        None => bail!("{variable} is {}, which has no executable `{name}`", dir.display()),
    }
}

fn override_file(path: &Path, variable: &str) -> anyhow::Result<PathBuf> {
    if is_executable(path) {
        Ok(path.to_owned())
    } else {
        bail!("{variable} is {}, which is not an executable file", path.display())
    }
}

/// The first directory of `path` (a PATH value) holding an executable `name`.
fn on_path(name: &str, path: Option<&OsStr>) -> Option<PathBuf> {
    std::env::split_paths(path?).find_map(|dir| executable_in(&dir, name))
}

/// `dir/name` if it is an executable file.
fn executable_in(dir: &Path, name: &str) -> Option<PathBuf> {
    let path = dir.join(name);
    is_executable(&path).then_some(path)
}

fn is_executable(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// What `pg_config --bindir` prints, if `pg_config` is on PATH and works.
fn pg_config_bindir() -> Option<PathBuf> {
    let pg_config = on_path("pg_config", std::env::var_os("PATH").as_deref())?;
    let output = Command::new(pg_config).arg("--bindir").output().ok()?;
    if !output.status.success() {
        return None;
    }
    let dir = String::from_utf8(output.stdout).ok()?;
    Some(PathBuf::from(dir.trim()))
}

/// `root/<version>/bin/name` for the highest version that has it (`16` > `15` > `9.6`).
fn in_versioned_dirs(name: &str, root: &Path) -> Option<PathBuf> {
    let mut versions: Vec<(Vec<u32>, PathBuf)> = fs::read_dir(root)
        .ok()?
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| Some((parse_version(&entry.file_name())?, entry.path())))
        .collect();
    versions.sort_by(|a, b| b.0.cmp(&a.0));
    versions.iter().find_map(|(_, dir)| executable_in(&dir.join("bin"), name))
}

/// `"15"` → `[15]`, `"9.6"` → `[9, 6]`; anything else is not a version directory.
fn parse_version(name: &OsString) -> Option<Vec<u32>> {
    name.to_str()?.split('.').map(|part| part.parse().ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_binary(dir: &Path, name: &str) -> PathBuf {
        fs::create_dir_all(dir).unwrap();
        let path = dir.join(name);
        fs::write(&path, "#!/bin/sh\n").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    #[test]
    fn the_first_path_entry_holding_the_binary_wins() {
        let tmp = tempfile::tempdir().unwrap();
        let (empty, first, second) = (tmp.path().join("a"), tmp.path().join("b"), tmp.path().join("c"));
        fs::create_dir_all(&empty).unwrap();
        let expected = fake_binary(&first, "initdb");
        fake_binary(&second, "initdb");
        let path = std::env::join_paths([&empty, &first, &second]).unwrap();
        assert_eq!(on_path("initdb", Some(&path)), Some(expected));
        assert_eq!(on_path("psql", Some(&path)), None);
    }

    #[test]
    fn a_file_that_is_not_executable_is_skipped() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join("postgres"), "").unwrap();
        assert_eq!(executable_in(tmp.path(), "postgres"), None);
    }

    #[test]
    fn the_highest_postgres_version_is_preferred() {
        let root = tempfile::tempdir().unwrap();
        fake_binary(&root.path().join("9.6/bin"), "pg_ctl");
        let fifteen = fake_binary(&root.path().join("15/bin"), "pg_ctl");
        fake_binary(&root.path().join("14/bin"), "pg_ctl");
        fake_binary(&root.path().join("16/bin"), "psql");
        fs::create_dir_all(root.path().join("not-a-version/bin")).unwrap();
        assert_eq!(in_versioned_dirs("pg_ctl", root.path()), Some(fifteen));
    }

    #[test]
    fn postgres_binaries_are_looked_for_in_pg_bin_then_path_then_pg_config_then_versioned_dirs() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = |name: &str| tmp.path().join(name);
        let override_bin = fake_binary(&dir("override"), "initdb");
        let path_bin = fake_binary(&dir("path"), "initdb");
        let pg_config_bin = fake_binary(&dir("pg_config"), "initdb");
        let versioned_bin = fake_binary(&dir("versions/15/bin"), "initdb");
        let path = dir("path").into_os_string();
        let pg_config = || Some(dir("pg_config"));
        let versions = dir("versions");
        let find = |pg_bin: Option<&OsStr>, path: Option<&OsStr>, pg_config: Option<PathBuf>| {
            find_postgres_bin("initdb", pg_bin, path, || pg_config, &versions).unwrap()
        };

        assert_eq!(find(Some(dir("override").as_os_str()), Some(&path), pg_config()), override_bin);
        assert_eq!(find(None, Some(&path), pg_config()), path_bin);
        assert_eq!(find(None, None, pg_config()), pg_config_bin);
        assert_eq!(find(None, None, None), versioned_bin);
    }

    #[test]
    fn a_pg_bin_without_the_binary_is_an_error_not_a_fallback() {
        let tmp = tempfile::tempdir().unwrap();
        let on_path = fake_binary(&tmp.path().join("path"), "psql");
        let path = on_path.parent().unwrap().as_os_str();
        let error = find_postgres_bin("psql", Some(tmp.path().as_os_str()), Some(path), || None, tmp.path())
            .unwrap_err();
        assert!(error.to_string().contains("PG_BIN"), "{error}");
    }

    #[test]
    fn a_missing_binary_names_the_package_to_install() {
        let tmp = tempfile::tempdir().unwrap();
        let error = find_postgres_bin("pgbench", None, None, || None, tmp.path()).unwrap_err();
        assert!(error.to_string().contains("apt-get install postgresql"), "{error}");
    }
}
