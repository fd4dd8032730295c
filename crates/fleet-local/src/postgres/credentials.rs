//! A cluster's passwords: random per cluster, created with it, kept in `<dir>/pgpass` (mode 0600, in
//! libpq's password-file format) so that a kept cluster stays usable and a user can connect with
//! `PGPASSFILE=<dir>/pgpass psql -h 127.0.0.1 -p PORT -U appuser appdb`.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context};
use secrecy::{ExposeSecret, SecretString};

use super::{ADMIN_USER, APP_USER, MONITOR_USER};
use crate::files::{open_read, write_new};

/// The file's name in the cluster directory.
const FILE_NAME: &str = "pgpass";
/// Random bytes per password (shown as twice as many hex digits).
const PASSWORD_BYTES: usize = 16;

/// The superuser's, the application role's and the exporter's role's passwords. Hex digits only, so
/// they need no quoting in SQL, URLs or the password file.
#[derive(Debug, Clone)]
pub(super) struct Credentials {
    pub(super) admin: SecretString,
    pub(super) app: SecretString,
    pub(super) monitor: SecretString,
}

/// Where the passwords of the cluster in `dir` are kept.
pub(super) fn path(dir: &Path) -> PathBuf {
    dir.join(FILE_NAME)
}

impl Credentials {
    /// New random passwords for a new cluster in `dir`, written to its password file (replacing one
    /// left by an earlier cluster there).
    pub(super) fn create(dir: &Path) -> anyhow::Result<Credentials> {
        let credentials =
            Credentials { admin: random_password()?, app: random_password()?, monitor: random_password()? };
        credentials.write(dir)?;
        Ok(credentials)
    }

    /// The passwords of the existing cluster in `dir` (a new one for the exporter's role if the file has
    /// none: a cluster kept from before that role), written back.
    pub(super) fn read(dir: &Path) -> anyhow::Result<Credentials> {
        let passwords = read_password_file(&path(dir))?;
        let credentials = Credentials {
            admin: passwords.get(ADMIN_USER)?,
            app: passwords.get(APP_USER)?,
            monitor: passwords.get(MONITOR_USER).or_else(|_| random_password())?,
        };
        credentials.write(dir)?;
        Ok(credentials)
    }

    fn write(&self, dir: &Path) -> anyhow::Result<()> {
        write_password_file(
            &path(dir),
            &[(ADMIN_USER, &self.admin), (APP_USER, &self.app), (MONITOR_USER, &self.monitor)],
        )
    }
}

/// Writes a libpq password file at `path` (mode 0600, replacing one left there) with one line
/// `*:*:*:USER:PASSWORD` per entry: any host, port and database.
pub(crate) fn write_password_file(path: &Path, entries: &[(&str, &SecretString)]) -> anyhow::Result<()> {
    let line =
        |(user, password): &(&str, &SecretString)| format!("*:*:*:{user}:{}\n", password.expose_secret());
    let text: String = entries.iter().map(line).collect();
    write_new(path, text.as_bytes(), 0o600, None)
}

/// The passwords of a file [`write_password_file`] wrote, which must be ours and private.
pub(crate) fn read_password_file(path: &Path) -> anyhow::Result<PasswordFile> {
    let mut file = open_read(path).with_context(|| {
        format!("the cluster has no password file {}; start over with a fresh cluster", path.display())
    })?;
    let meta = file.metadata()?;
    ensure!(
        meta.mode() & 0o077 == 0 && meta.uid() == nix::unistd::geteuid().as_raw(),
        "{} must be ours and readable by us only (it is mode {:o}); refusing to use it",
        path.display(),
        meta.mode() & 0o777
    );
    let mut text = String::new();
    file.read_to_string(&mut text).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(PasswordFile { path: path.to_owned(), text })
}

/// A password file's contents, read by [`read_password_file`].
pub(crate) struct PasswordFile {
    path: PathBuf,
    text: String,
}

impl PasswordFile {
    /// `user`'s password, or an error naming the file.
    pub(crate) fn get(&self, user: &str) -> anyhow::Result<SecretString> {
        let prefix = format!("*:*:*:{user}:");
        match self.text.lines().find_map(|line| line.strip_prefix(&prefix)) {
            Some(password) if !password.is_empty() => Ok(password.into()),
            _ => bail!("{} has no password for {user}", self.path.display()),
        }
    }
}

/// 128 random bits (or however many `PASSWORD_BYTES` says), hex-encoded: safe in URLs, YAML, SQL
/// literals and libpq's password file.
pub(crate) fn random_password() -> anyhow::Result<SecretString> {
    let mut bytes = [0u8; PASSWORD_BYTES];
    File::open("/dev/urandom")
        .and_then(|mut random| random.read_exact(&mut bytes))
        .context("cannot read /dev/urandom")?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect::<String>().into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn each_cluster_gets_its_own_passwords_kept_in_a_private_file() {
        let (one, two) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let first = Credentials::create(one.path()).unwrap();
        let second = Credentials::create(two.path()).unwrap();
        let admin = first.admin.expose_secret();
        assert_ne!(admin, second.admin.expose_secret());
        assert_ne!(admin, first.app.expose_secret());
        assert_eq!(admin.len(), 2 * PASSWORD_BYTES);
        let mode = fs::metadata(path(one.path())).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = Credentials::read(one.path()).unwrap();
        assert_eq!(
            (again.admin.expose_secret(), again.app.expose_secret()),
            (admin, first.app.expose_secret())
        );
        assert!(!format!("{first:?}").contains(admin));
    }

    #[test]
    fn a_password_file_others_can_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        Credentials::create(dir.path()).unwrap();
        fs::set_permissions(path(dir.path()), fs::Permissions::from_mode(0o644)).unwrap();
        let error = Credentials::read(dir.path()).unwrap_err().to_string();
        assert!(error.contains("readable by us only"), "{error}");
    }
}
