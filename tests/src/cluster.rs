//! Private PostgreSQL clusters, one per test, copied from an initialised template instead of each
//! running `initdb`: copying the template's files takes a fraction of the time initdb does, and every test
//! still gets a server of its own, which it may stop, pause or fill without touching another test.
//!
//! The template lives in cargo's scratch directory for tests (`target/tmp`), named after
//! a digest of the PostgreSQL version and of the launcher's code that creates clusters, so a new version
//! or a change to that code makes a new template (and removes the old ones). It is a stopped cluster
//! (shut down cleanly, so a copy starts without recovery) with its password file. A copy shares the
//! template's passwords; each copy is started by [`Postgres::start`], which brings its roles and
//! database up to date as it does for any kept cluster.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, PoisonError};

use anyhow::{ensure, Context};
use fleet_local::{Postgres, PostgresOptions};
use tempfile::TempDir;

/// The launcher's code that decides what a fresh cluster holds; a change to it makes a new template.
const CLUSTER_SOURCES: [&str; 3] = [
    include_str!("../../crates/fleet-local/src/postgres.rs"),
    include_str!("../../crates/fleet-local/src/postgres/setup.rs"),
    include_str!("../../crates/fleet-local/src/postgres/credentials.rs"),
];

/// Names of template directories (the key follows).
const TEMPLATE_PREFIX: &str = "postgres-template-";

/// A test's private cluster, copied from the template: the server, then its directory, go when it is
/// dropped. Derefs to the [`Postgres`] it runs.
#[derive(Debug)]
pub struct TestPostgres {
    // Field order is drop order: the server stops before its directory is removed.
    pg: Postgres,
    _dir: TempDir,
}

impl TestPostgres {
    /// A copy of the template started with `opts` (its `dir` is the copy's).
    pub fn start(opts: PostgresOptions) -> anyhow::Result<TestPostgres> {
        let dir = tempfile::Builder::new()
            .prefix("pgfleet-pg-")
            .tempdir()
            .context("cannot create a directory for a cluster")?;
        copy_tree(&template()?, dir.path())?;
        let pg = Postgres::start(PostgresOptions { dir: Some(dir.path().to_owned()), ..opts })?;
        Ok(TestPostgres { pg, _dir: dir })
    }
}

impl Deref for TestPostgres {
    type Target = Postgres;

    fn deref(&self) -> &Postgres {
        &self.pg
    }
}

impl DerefMut for TestPostgres {
    fn deref_mut(&mut self) -> &mut Postgres {
        &mut self.pg
    }
}

/// The template's directory, made on first use (by whichever test of the process gets there first).
fn template() -> anyhow::Result<PathBuf> {
    static TEMPLATE: Mutex<Option<PathBuf>> = Mutex::new(None);
    let mut template = TEMPLATE.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(dir) = template.as_ref() {
        return Ok(dir.clone());
    }
    let dir = make_template().context("cannot make the template cluster")?;
    *template = Some(dir.clone());
    Ok(dir)
}

fn make_template() -> anyhow::Result<PathBuf> {
    let root = &scratch_dir()?;
    let name = format!("{TEMPLATE_PREFIX}{}", template_key()?);
    let dir = root.join(&name);
    if dir.is_dir() {
        return Ok(dir);
    }
    // A fresh cluster in a temporary directory (where the `postgres` user may enter), stopped cleanly,
    // copied beside the template's place and renamed into it: a template directory is always whole.
    let mut pg = Postgres::start(PostgresOptions::default())?;
    pg.stop()?;
    let staging = tempfile::Builder::new().prefix(".staging-").tempdir_in(root)?;
    copy_tree(pg.dir(), staging.path())?;
    std::fs::remove_file(staging.path().join("server.log")).context("cannot drop the template's log")?;
    drop(pg);
    match std::fs::rename(staging.path(), &dir) {
        Ok(()) => {}
        // Another test process made it meanwhile; its copy is as good as ours.
        Err(_) if dir.is_dir() => {}
        Err(error) => return Err(error).with_context(|| format!("cannot create {}", dir.display())),
    }
    remove_other_templates(root, &name);
    Ok(dir)
}

/// Cargo's scratch directory for tests, `<target>/tmp` (what it calls `CARGO_TARGET_TMPDIR`), found
/// from the test executable's path, `<target>/<profile>/deps/<test>`.
fn scratch_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find the test executable")?;
    let target = exe.ancestors().nth(3).context("the test executable is not in a cargo target directory")?;
    let dir = target.join("tmp");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}

/// A digest of what `initdb --version` prints and of [`CLUSTER_SOURCES`].
fn template_key() -> anyhow::Result<String> {
    let initdb = fleet_local::postgres_bin("initdb")?;
    let version = Command::new(&initdb).arg("--version").output().context("cannot run initdb --version")?;
    ensure!(version.status.success(), "initdb --version failed");
    let mut digest = DefaultHasher::new();
    version.stdout.hash(&mut digest);
    CLUSTER_SOURCES.hash(&mut digest);
    Ok(format!("{:016x}", digest.finish()))
}

/// Removes templates of other versions or other code, which no test of this build uses.
fn remove_other_templates(root: &Path, keep: &str) {
    let Ok(entries) = std::fs::read_dir(root) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(TEMPLATE_PREFIX) && name != keep {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Copies the contents of `from` into the directory `to`, owners and modes kept (`cp -a`).
fn copy_tree(from: &Path, to: &Path) -> anyhow::Result<()> {
    let status = Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", from.display()))
        .arg(to)
        .status()
        .context("cannot run cp")?;
    ensure!(status.success(), "cp -a {} {} failed ({status})", from.display(), to.display());
    Ok(())
}
