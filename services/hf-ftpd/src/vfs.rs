//! The virtual file system: a root directory that no path escapes.
//!
//! Clients name files by *virtual* paths (`/` is the root). A path is first
//! normalised lexically ([`join`]): `.` and empty components vanish and `..`
//! never climbs above `/`. It is then mapped under the real root and
//! resolved by the kernel: every symlink is followed ([`Root::existing`]) or
//! all but the last ([`Root::entry`]), and a result outside the canonical
//! root is refused — so a symlink inside the root that points out of it
//! leads nowhere. Files are opened by their canonical path, the last
//! component with `O_NOFOLLOW` when written.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// `cwd` and `arg` joined into a normalised absolute virtual path.
pub fn join(cwd: &str, arg: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    let base = if arg.starts_with('/') { "" } else { cwd };
    for c in base.split('/').chain(arg.split('/')) {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    format!("/{}", parts.join("/"))
}

/// The last component of a normalised virtual path (`""` for the root).
pub fn base_name(vpath: &str) -> &str {
    vpath.rsplit('/').next().unwrap_or("")
}

/// The served directory.
#[derive(Debug)]
pub struct Root {
    real: PathBuf,
}

fn outside() -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, "outside the root")
}

impl Root {
    pub fn new(dir: &Path) -> io::Result<Root> {
        let real = dir.canonicalize()?;
        if !real.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotADirectory,
                format!("{} is not a directory", real.display()),
            ));
        }
        Ok(Root { real })
    }

    /// Where a normalised virtual path lands before any symlink is followed.
    fn lexical(&self, vpath: &str) -> PathBuf {
        self.real.join(vpath.trim_start_matches('/'))
    }

    /// Whether a canonical path is inside the root.
    pub fn contains(&self, canonical: &Path) -> bool {
        canonical.starts_with(&self.real)
    }

    fn inside(&self, p: PathBuf) -> io::Result<PathBuf> {
        if self.contains(&p) {
            Ok(p)
        } else {
            Err(outside())
        }
    }

    /// The canonical real path of an existing file or directory.
    pub fn existing(&self, vpath: &str) -> io::Result<PathBuf> {
        self.inside(self.lexical(vpath).canonicalize()?)
    }

    /// The real path of a directory entry to create, remove or rename: its
    /// parent resolved like [`Root::existing`], its last component taken as
    /// it is (a symlink is removed or renamed, not what it points to).
    pub fn entry(&self, vpath: &str) -> io::Result<PathBuf> {
        let (parent, name) = vpath.rsplit_once('/').unwrap_or(("", vpath));
        if name.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "the root itself",
            ));
        }
        let parent = self.existing(if parent.is_empty() { "/" } else { parent })?;
        Ok(parent.join(name))
    }

    /// A regular file opened for reading.
    pub fn open_read(&self, vpath: &str) -> io::Result<File> {
        let p = self.existing(vpath)?;
        let f = File::open(p)?;
        if !f.metadata()?.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::IsADirectory,
                "not a plain file",
            ));
        }
        Ok(f)
    }

    /// A regular file opened for writing, created if missing; an existing
    /// one is resolved through symlinks (which must stay inside the root).
    pub fn open_write(&self, vpath: &str) -> io::Result<File> {
        let entry = self.entry(vpath)?;
        let path = match entry.symlink_metadata() {
            Ok(_) => self.existing(vpath)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => entry,
            Err(e) => return Err(e),
        };
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(path)?;
        if !f.metadata()?.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::IsADirectory,
                "not a plain file",
            ));
        }
        Ok(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_normalises_and_never_climbs_above_the_root() {
        assert_eq!(join("/", ""), "/");
        assert_eq!(join("/a/b", ""), "/a/b");
        assert_eq!(join("/a/b", "c"), "/a/b/c");
        assert_eq!(join("/a/b", "/c"), "/c");
        assert_eq!(join("/a/b", ".."), "/a");
        assert_eq!(join("/a", "../../../.."), "/");
        assert_eq!(join("/", "../../etc/passwd"), "/etc/passwd");
        assert_eq!(join("/a", "./x//y/./../z/"), "/a/x/z");
        assert_eq!(join("/", "..."), "/...");
    }

    #[test]
    fn base_names() {
        assert_eq!(base_name("/"), "");
        assert_eq!(base_name("/a/b"), "b");
    }

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("hf-ftpd-vfs-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("root/sub")).unwrap();
        d
    }

    #[test]
    fn symlinks_out_of_the_root_lead_nowhere() {
        let d = tmp("links");
        std::fs::write(d.join("secret"), b"x").unwrap();
        std::fs::write(d.join("root/sub/f"), b"y").unwrap();
        std::os::unix::fs::symlink(d.join("secret"), d.join("root/out")).unwrap();
        std::os::unix::fs::symlink(&d, d.join("root/updir")).unwrap();
        std::os::unix::fs::symlink("sub/f", d.join("root/in")).unwrap();
        std::os::unix::fs::symlink(d.join("nothing"), d.join("root/dangling")).unwrap();
        let r = Root::new(&d.join("root")).unwrap();
        assert!(r.existing("/out").is_err());
        assert!(r.open_read("/out").is_err());
        assert!(r.existing("/updir/secret").is_err());
        assert!(r.entry("/updir/new").is_err());
        assert!(r.open_write("/updir/new").is_err());
        assert!(r.open_write("/out").is_err());
        assert!(r.open_write("/dangling").is_err());
        assert!(!d.join("nothing").exists());
        assert_eq!(std::fs::read(d.join("secret")).unwrap(), b"x");
        // Inside the root, links work; removing one takes the link.
        assert!(r.open_read("/in").is_ok());
        assert_eq!(r.entry("/out").unwrap(), r.real.join("out"));
        assert!(r.entry("/").is_err());
        assert!(r.open_read("/sub").is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
