//! Files and directories the launcher (root, as a rule) writes where another user may plant a link: the
//! `postgres` user owns a cluster's directory, the service user nginx's and Prometheus's. Nothing here
//! follows a link at the last component of a path; the directories above it are ours.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
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

/// Gives `dir` and everything under it to `owner`, never following a link (`lchown`), if `dir` is still
/// ours: what an earlier version of the launcher left there as root. A directory `owner` already has is
/// left as it is (who could have planted what in it is `owner`'s business).
pub fn hand_over_tree(dir: &Path, owner: &User) -> anyhow::Result<()> {
    let ours = nix::unistd::geteuid().as_raw();
    if fs::symlink_metadata(dir).map(|meta| meta.uid()).ok() != Some(ours) {
        return Ok(());
    }
    let (uid, gid) = (Some(owner.uid.as_raw()), Some(owner.gid.as_raw()));
    std::os::unix::fs::lchown(dir, uid, gid).with_context(|| format!("cannot give {}", dir.display()))?;
    for entry in fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let path = entry?.path();
        match fs::symlink_metadata(&path)?.is_dir() {
            true => hand_over_tree(&path, owner)?,
            false => std::os::unix::fs::lchown(&path, uid, gid)
                .with_context(|| format!("cannot give {}", path.display()))?,
        }
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

    #[test]
    fn a_tree_left_by_root_is_handed_over_without_following_its_links() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: only root can hand files to another user");
            return;
        }
        let nobody = User::from_name("nobody").unwrap().expect("a `nobody` user");
        let dir = tempfile::tempdir().unwrap();
        let (tree, outside) = (dir.path().join("tree"), dir.path().join("outside"));
        fs::create_dir_all(tree.join("member")).unwrap();
        fs::write(tree.join("member/db"), "").unwrap();
        fs::write(&outside, "").unwrap();
        std::os::unix::fs::symlink(&outside, tree.join("link")).unwrap();
        hand_over_tree(&tree, &nobody).unwrap();
        for path in [&tree, &tree.join("member"), &tree.join("member/db"), &tree.join("link")] {
            assert_eq!(fs::symlink_metadata(path).unwrap().uid(), nobody.uid.as_raw(), "{}", path.display());
        }
        assert_eq!(fs::metadata(&outside).unwrap().uid(), 0, "a link's target stays root's");
    }
}
