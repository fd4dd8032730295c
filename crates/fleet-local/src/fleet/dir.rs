//! The fleet's directory: a private one the caller names, or a temp dir.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context};
use tempfile::TempDir;

/// The fleet's directory: `dir`, made private (see [`prepare_dir`]), or a fresh temp dir.
pub(super) fn fleet_dir(dir: Option<&Path>) -> anyhow::Result<(PathBuf, Option<TempDir>)> {
    match dir {
        Some(dir) => Ok((prepare_dir(dir)?, None)),
        None => {
            let temp = tempfile::Builder::new().prefix("pgfleet-").tempdir()?;
            Ok((temp.path().to_owned(), Some(temp)))
        }
    }
}

/// Makes `dir` the fleet's private directory and returns its canonical path: a symbolic link is refused
/// (before anything is changed); created mode 0700 if missing; an existing one must be owned by us and
/// writable by nobody else (a directory another user could write to could be swapped under us) and is
/// then closed to others (0700). When we are root, the `postgres` user must reach `dir/postgres` and
/// the service user `dir/nginx` and `dir/prometheus`: others may enter (0711), but list nothing, and
/// every entry is private to its owner.
pub fn prepare_dir(dir: &Path) -> anyhow::Result<PathBuf> {
    ensure!(
        !fs::symlink_metadata(dir).is_ok_and(|meta| meta.file_type().is_symlink()),
        "refusing the fleet directory {}: it is a symbolic link; name the directory itself",
        dir.display()
    );
    if !dir.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let dir = dir.canonicalize().with_context(|| format!("cannot resolve {}", dir.display()))?;
    let meta = fs::metadata(&dir).with_context(|| format!("cannot inspect {}", dir.display()))?;
    let me = nix::unistd::geteuid().as_raw();
    ensure!(meta.is_dir(), "{} is not a directory", dir.display());
    ensure!(
        meta.uid() == me,
        "refusing the fleet directory {}: it belongs to user {}, not to us (user {me}); use a directory of our own",
        dir.display(),
        meta.uid()
    );
    ensure!(
        meta.mode() & 0o022 == 0,
        "refusing the fleet directory {}: others can write to it (mode {:o}); use a private directory          (or `chmod go-w {}`)",
        dir.display(),
        meta.mode() & 0o7777,
        dir.display()
    );
    fs::set_permissions(&dir, fs::Permissions::from_mode(fleet_dir_mode()))
        .with_context(|| format!("cannot make {} private", dir.display()))?;
    Ok(dir)
}

/// The fleet directory's mode (see [`prepare_dir`]): 0711 when we are root, else 0700.
fn fleet_dir_mode() -> u32 {
    if nix::unistd::geteuid().is_root() {
        0o711
    } else {
        0o700
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_fleet_directory_is_private() {
        let parent = tempfile::tempdir().unwrap();
        let dir = prepare_dir(&parent.path().join("a/.fleet")).unwrap();
        assert_eq!(fs::metadata(&dir).unwrap().mode() & 0o777, fleet_dir_mode());
    }

    #[test]
    fn a_fleet_directory_others_can_write_to_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        for mode in [0o777, 0o1777, 0o770] {
            fs::set_permissions(dir.path(), fs::Permissions::from_mode(mode)).unwrap();
            let error = prepare_dir(dir.path()).unwrap_err().to_string();
            assert!(error.contains("others can write to it"), "{mode:o}: {error}");
        }
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        prepare_dir(dir.path()).unwrap();
        assert_eq!(
            fs::metadata(dir.path()).unwrap().mode() & 0o777,
            fleet_dir_mode(),
            "an open one is closed"
        );
    }

    #[test]
    fn a_fleet_directory_given_as_a_link_is_refused_and_its_target_left_alone() {
        let temp = tempfile::tempdir().unwrap();
        let target = temp.path().join("target");
        fs::DirBuilder::new().mode(0o755).create(&target).unwrap();
        std::os::unix::fs::symlink(&target, temp.path().join("fleet")).unwrap();
        let error = prepare_dir(&temp.path().join("fleet")).unwrap_err().to_string();
        assert!(error.contains("symbolic link"), "{error}");
        assert_eq!(fs::metadata(&target).unwrap().mode() & 0o777, 0o755);
    }

    #[test]
    fn a_fleet_directory_owned_by_another_user_is_refused() {
        let nobody = nix::unistd::User::from_name("nobody").unwrap().expect("a `nobody` user");
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: only root can hand a directory to another user");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::chown(dir.path(), Some(nobody.uid.as_raw()), None).unwrap();
        let error = prepare_dir(dir.path()).unwrap_err().to_string();
        assert!(error.contains("belongs to user"), "{error}");
    }
}
