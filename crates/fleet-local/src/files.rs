//! Files and directories the launcher (root, as a rule) writes where another user may plant a link: the
//! `postgres` user owns a cluster's directory, the service user nginx's and Prometheus's. Nothing here
//! follows a link at the last component of a path; the directories above it are ours.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use anyhow::{bail, ensure, Context};
use nix::libc::{O_NOFOLLOW, O_NONBLOCK};
use nix::unistd::User;

/// Writes `contents` to `path` as a new file of `mode`, owned by `owner` (else by us). What was at `path`
/// is removed first (a link itself, never its target), and the file is created with `O_CREAT | O_EXCL |
/// O_NOFOLLOW`: a link planted meanwhile makes this fail instead of being followed. The owner changes on
/// the open file (`fchown`), not by path.
pub fn write_new(path: &Path, contents: &[u8], mode: u32, owner: Option<&User>) -> anyhow::Result<()> {
    remove_entry(path)?;
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(O_NOFOLLOW)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    if let Some(user) = owner {
        std::os::unix::fs::fchown(&file, Some(user.uid.as_raw()), Some(user.gid.as_raw()))
            .with_context(|| format!("cannot give {} to the `{}` user", path.display(), user.name))?;
    }
    file.write_all(contents).with_context(|| format!("cannot write {}", path.display()))
}

/// Opens `path` for appending, created readable and writable by its owner only (logs may quote data).
/// Anything there but a regular file (a link, a FIFO) is removed first; one planted meanwhile makes the
/// open fail (`O_NOFOLLOW`, and `O_NONBLOCK` so a FIFO cannot block us).
pub fn open_append(path: &Path) -> anyhow::Result<File> {
    if fs::symlink_metadata(path).is_ok_and(|meta| !meta.is_file()) {
        remove_entry(path)?;
    }
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(O_NOFOLLOW | O_NONBLOCK)
        .open(path)
        .with_context(|| format!("cannot open the log file {}", path.display()))?;
    ensure!(file.metadata()?.is_file(), "{} is not a regular file", path.display());
    Ok(file)
}

/// Opens the regular file `path` for reading, refusing a link at its last component.
pub fn open_read(path: &Path) -> anyhow::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(O_NOFOLLOW | O_NONBLOCK)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    ensure!(file.metadata()?.is_file(), "{} is not a regular file", path.display());
    Ok(file)
}

/// Makes `dir` a directory of mode 0700 owned by `owner` (else by us): created if missing, refused if it
/// is a link or not a directory.
pub fn private_dir(dir: &Path, owner: Option<&User>) -> anyhow::Result<()> {
    match fs::symlink_metadata(dir) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => bail!("{} is not a directory (a link?); refusing to use it", dir.display()),
        Err(error) if error.kind() == ErrorKind::NotFound => fs::DirBuilder::new()
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create {}", dir.display()))?,
        Err(error) => return Err(error).with_context(|| format!("cannot inspect {}", dir.display())),
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot make {} private", dir.display()))?;
    if let Some(user) = owner {
        std::os::unix::fs::lchown(dir, Some(user.uid.as_raw()), Some(user.gid.as_raw()))
            .with_context(|| format!("cannot give {} to the `{}` user", dir.display(), user.name))?;
    }
    Ok(())
}

/// Makes `dir` an empty [`private_dir`] of `owner`'s: what an earlier run left there is removed first.
pub fn fresh_dir(dir: &Path, owner: Option<&User>) -> anyhow::Result<()> {
    if fs::symlink_metadata(dir).is_ok() {
        fs::remove_dir_all(dir).with_context(|| format!("cannot clear {}", dir.display()))?;
    }
    private_dir(dir, owner)
}

/// Removes the file or link at `path`, if any; a directory there is an error.
fn remove_entry(path: &Path) -> anyhow::Result<()> {
    match fs::remove_file(path) {
        Err(error) if error.kind() != ErrorKind::NotFound => {
            Err(error).with_context(|| format!("cannot replace {}", path.display()))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_planted_link_is_replaced_and_its_target_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        fs::write(&target, "untouched").unwrap();
        for (name, write) in [
            ("config", (|p: &Path| write_new(p, b"new", 0o600, None)) as fn(&Path) -> anyhow::Result<()>),
            ("log", |p: &Path| Ok(open_append(p)?.write_all(b"new")?)),
        ] {
            let link = dir.path().join(name);
            std::os::unix::fs::symlink(&target, &link).unwrap();
            write(&link).unwrap();
            assert_eq!(fs::read_to_string(&link).unwrap(), "new", "{name}");
            assert!(open_read(&link).is_ok());
        }
        assert_eq!(fs::read_to_string(&target).unwrap(), "untouched");
        std::os::unix::fs::symlink(&target, dir.path().join("link")).unwrap();
        assert!(open_read(&dir.path().join("link")).is_err(), "a link is not read through");
        assert!(private_dir(&dir.path().join("link"), None).is_err(), "a link is no directory");
    }
}
