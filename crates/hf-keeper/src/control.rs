//! Who may use the control socket: its owner and root, nobody else.
//!
//! Whoever can replace the socket receives the next `holdfast upgrade`
//! command with all its arguments, and whoever can connect to it can
//! upgrade or re-execute the service. So:
//! - the socket's directory must be one that only the keeper's user (or
//!   root) can change: owned by that user or root, writable by no group and
//!   no other user. The keeper creates the default one itself (mode 0700)
//!   and refuses one that another user created first;
//! - the keeper checks the peer's credentials (`SO_PEERCRED`) on every
//!   control connection: same uid, or root;
//! - `holdfast status` and `holdfast upgrade` refuse a socket in a
//!   directory they cannot trust, and a keeper that runs as another user
//!   (the credentials of the process that listens, checked after connecting,
//!   so a socket swapped in between is caught too).

use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::os::unix::net::UnixStream;
use std::path::Path;

/// The effective uid of this process.
fn euid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// The uid may use a control socket of this process's user: it is that
/// user, or root.
pub fn trusted_uid(uid: u32) -> bool {
    uid == euid() || uid == 0
}

fn denied(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, msg)
}

/// The directory of the control socket at `path`.
fn dir_of(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// Checks that `dir` is a directory (not a symbolic link) owned by this
/// process's user or root, which no group and no other user can write.
pub fn check_dir(dir: &Path) -> io::Result<()> {
    let md = std::fs::symlink_metadata(dir)?;
    let why = if !md.is_dir() {
        Some("is not a directory".to_owned())
    } else if !trusted_uid(md.uid()) {
        Some(format!(
            "is owned by uid {}, not by uid {} or root",
            md.uid(),
            euid()
        ))
    } else if md.mode() & 0o022 != 0 {
        Some(format!(
            "is writable by other users (mode {:o})",
            md.mode() & 0o7777
        ))
    } else {
        None
    };
    match why {
        Some(why) => Err(denied(format!(
            "directory {} {why}: another user could replace the control socket \
             (remove that directory, or pick another path with --control)",
            dir.display()
        ))),
        None => Ok(()),
    }
}

/// The keeper's side: creates the control socket's directory, owner-only
/// (mode 0700, missing parents too), unless it exists; then checks it.
/// Creating the last component without `recursive` fails if it appeared
/// meanwhile, so a directory someone else made is always checked.
pub(crate) fn prepare_dir(path: &Path) -> io::Result<()> {
    let dir = dir_of(path);
    let mut builder = std::fs::DirBuilder::new();
    builder.mode(0o700);
    let made = match builder.create(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if let Some(parent) = dir.parent() {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(parent)?;
            }
            builder.create(dir)
        }
        r => r,
    };
    match made {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    check_dir(dir)
}

/// The client's side: connects to the keeper at `path` only if its
/// directory is trusted, and only to a keeper of this user or root.
pub fn connect(path: &Path) -> io::Result<UnixStream> {
    check_dir(dir_of(path))?;
    let s = UnixStream::connect(path)?;
    let peer = rustix::net::sockopt::socket_peercred(&s)?;
    let uid = peer.uid.as_raw();
    if !trusted_uid(uid) {
        return Err(denied(format!(
            "the process listening on {} (pid {}) runs as uid {uid}, not as uid {} or root: \
             not talking to it",
            path.display(),
            peer.pid.as_raw_nonzero(),
            euid()
        )));
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn scratch(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("hf-control-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn creates_an_owner_only_directory_and_its_parents() {
        let base = scratch("create");
        let sock = base.join("a").join("b").join("control.sock");
        prepare_dir(&sock).unwrap();
        for d in [base.join("a"), base.join("a").join("b")] {
            let mode = std::fs::metadata(&d).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o700, "{}", d.display());
        }
        // An existing trusted directory is fine.
        prepare_dir(&sock).unwrap();
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn refuses_a_directory_others_can_write_or_a_link() {
        let base = scratch("open");
        std::fs::create_dir(&base).unwrap();
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let e = prepare_dir(&base.join("control.sock")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        assert!(e.to_string().contains("writable by other users"), "{e}");
        let link = scratch("link");
        std::os::unix::fs::symlink(&base, &link).unwrap();
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o700)).unwrap();
        let e = check_dir(&link).unwrap_err();
        assert!(e.to_string().contains("not a directory"), "{e}");
        std::fs::remove_file(&link).unwrap();
        std::fs::remove_dir_all(&base).unwrap();
    }
}
