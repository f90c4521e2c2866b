//! The request mix: which URL paths to fetch and what each body must be.
//!
//! Expected bodies are known by size and CRC-32C, not kept in memory, so a
//! site of large files costs nothing to verify against. They come either
//! from the files themselves (`--site DIR`, when the load runs next to the
//! server's document root) or from a list (`--files LIST`, when the server
//! is remote from the files); `hf-load --site DIR --list-files` writes such
//! a list.

use std::fmt::Write as _;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::Error;

/// One file the server serves: its URL path and what its body must be.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct FileSpec {
    /// Origin-form path, already percent-encoded (`/dir/a%20b.txt`).
    pub path: String,
    pub size: u64,
    pub crc32c: u32,
}

impl FileSpec {
    /// The spec of an in-memory body served at `path`.
    pub fn of_bytes(path: impl Into<String>, body: &[u8]) -> FileSpec {
        FileSpec {
            path: path.into(),
            size: body.len() as u64,
            crc32c: crc32c::crc32c(body),
        }
    }
}

/// The files requests are drawn from (uniformly, in a per-connection
/// pseudo-random order).
#[derive(Clone, Debug, Default)]
pub struct FileSet {
    pub files: Vec<FileSpec>,
}

impl FileSet {
    pub fn new(files: Vec<FileSpec>) -> FileSet {
        FileSet { files }
    }

    /// Walks `dir`: every regular file (symlinks to files included, as a
    /// static server follows them) becomes a request for its path relative
    /// to `dir`. Symlinked directories are not entered, so a loop cannot
    /// make the walk endless. Sorted by path, so runs are repeatable.
    pub fn from_site(dir: &Path) -> Result<FileSet, Error> {
        let meta = std::fs::metadata(dir)
            .map_err(|e| Error::io(format!("--site {}", dir.display()), e))?;
        if !meta.is_dir() {
            return Err(Error::Setup(format!(
                "--site {}: not a directory",
                dir.display()
            )));
        }
        let mut files = Vec::new();
        let mut todo: Vec<PathBuf> = vec![PathBuf::new()];
        while let Some(rel) = todo.pop() {
            let here = dir.join(&rel);
            let rd = std::fs::read_dir(&here)
                .map_err(|e| Error::io(format!("reading directory {}", here.display()), e))?;
            for ent in rd {
                let ent =
                    ent.map_err(|e| Error::io(format!("reading directory {}", here.display()), e))?;
                let rel = rel.join(ent.file_name());
                let ft = ent
                    .file_type()
                    .map_err(|e| Error::io(format!("{}", ent.path().display()), e))?;
                if ft.is_dir() {
                    todo.push(rel);
                    continue;
                }
                // Follows a symlink; FIFOs, sockets and devices are skipped
                // (the server refuses them too).
                match std::fs::metadata(ent.path()) {
                    Ok(m) if m.is_file() => {}
                    _ => continue,
                }
                let (size, crc) = checksum_file(&ent.path())?;
                files.push(FileSpec {
                    path: url_path(&rel),
                    size,
                    crc32c: crc,
                });
            }
        }
        files.sort_by(|a, b| a.path.cmp(&b.path));
        if files.is_empty() {
            return Err(Error::Setup(format!(
                "--site {}: no regular files in it to request",
                dir.display()
            )));
        }
        Ok(FileSet { files })
    }

    /// Reads a list of `urlpath size crc32c-hex` lines (blank lines and
    /// `#` comments ignored), as [`FileSet::to_list`] writes it.
    pub fn from_list(path: &Path) -> Result<FileSet, Error> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io(format!("--files {}", path.display()), e))?;
        FileSet::parse_list(&text)
            .map_err(|e| Error::Setup(format!("--files {}: {e}", path.display())))
    }

    /// [`FileSet::from_list`] on the text itself.
    pub fn parse_list(text: &str) -> Result<FileSet, String> {
        let mut files = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |why: &str| {
                format!(
                    "line {}: {why} in {line:?} (want `urlpath size crc32c-hex`)",
                    i + 1
                )
            };
            let mut it = line.split_whitespace();
            let (Some(p), Some(size), Some(crc), None) =
                (it.next(), it.next(), it.next(), it.next())
            else {
                return Err(bad("not three fields"));
            };
            if !p.starts_with('/') {
                return Err(bad("the URL path does not start with /"));
            }
            let size = size.parse().map_err(|_| bad("bad size"))?;
            let crc = u32::from_str_radix(crc.trim_start_matches("0x"), 16)
                .map_err(|_| bad("bad CRC-32C (8 hex digits)"))?;
            files.push(FileSpec {
                path: p.to_owned(),
                size,
                crc32c: crc,
            });
        }
        if files.is_empty() {
            return Err("no files listed".into());
        }
        Ok(FileSet { files })
    }

    /// The list format [`FileSet::from_list`] reads.
    pub fn to_list(&self) -> String {
        let mut out = String::from("# urlpath size crc32c (hf-load --files)\n");
        for f in &self.files {
            let _ = writeln!(out, "{} {} {:08x}", f.path, f.size, f.crc32c);
        }
        out
    }

    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

/// Size and CRC-32C of a file, read in pieces (files may be large).
fn checksum_file(p: &Path) -> Result<(u64, u32), Error> {
    let mut f = std::fs::File::open(p).map_err(|e| Error::io(format!("{}", p.display()), e))?;
    let mut buf = vec![0u8; 256 * 1024];
    let (mut size, mut crc) = (0u64, 0u32);
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => return Ok((size, crc)),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::io(format!("reading {}", p.display()), e)),
        };
        crc = crc32c::crc32c_append(crc, &buf[..n]);
        size += n as u64;
    }
}

/// `/` + the relative path's components, each percent-encoded except for
/// the characters a path segment may carry as they are (RFC 3986
/// unreserved and sub-delims, `:` and `@`), so any file name becomes a
/// request target the server decodes back to it.
pub fn url_path(rel: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let mut out = String::new();
    for c in rel.components() {
        out.push('/');
        for &b in c.as_os_str().as_bytes() {
            if b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@".contains(&b) {
                out.push(b as char);
            } else {
                let _ = write!(out, "%{b:02X}");
            }
        }
    }
    if out.is_empty() {
        out.push('/');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_paths_are_encoded_per_segment() {
        assert_eq!(url_path(Path::new("a/b c/%.txt")), "/a/b%20c/%25.txt");
        assert_eq!(url_path(Path::new("x?#y")), "/x%3F%23y");
        assert_eq!(url_path(Path::new("é")), "/%C3%A9");
    }

    #[test]
    fn list_round_trips_and_rejects_garbage() {
        let set = FileSet::new(vec![
            FileSpec::of_bytes("/a", b"hello"),
            FileSpec::of_bytes("/d/b%20c", b""),
        ]);
        let back = FileSet::parse_list(&set.to_list()).unwrap();
        assert_eq!(back.files, set.files);
        assert!(FileSet::parse_list("a 1 00000000")
            .unwrap_err()
            .contains("line 1"));
        assert!(FileSet::parse_list("/a x 00000000").is_err());
        assert!(FileSet::parse_list("/a 1 zz").is_err());
        assert!(FileSet::parse_list("/a 1 0 extra").is_err());
        assert!(FileSet::parse_list("# nothing\n\n").is_err());
    }

    #[test]
    fn site_walk_finds_nested_files_with_their_checksums() {
        let dir = std::env::temp_dir().join(format!("hf-load-site-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("sub dir")).unwrap();
        std::fs::write(dir.join("a.txt"), b"abc").unwrap();
        std::fs::write(dir.join("sub dir/b.bin"), vec![7u8; 300_000]).unwrap();
        std::os::unix::fs::symlink("a.txt", dir.join("link")).unwrap();
        let set = FileSet::from_site(&dir).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(
            set.files,
            vec![
                FileSpec::of_bytes("/a.txt", b"abc"),
                FileSpec::of_bytes("/link", b"abc"),
                FileSpec::of_bytes("/sub%20dir/b.bin", &vec![7u8; 300_000]),
            ]
        );
    }
}
