//! What the server is configured with: the root, and who may log in.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context;

use crate::session::MAX_USER;
use crate::vfs::Root;

/// The server's configuration, shared by every connection.
pub struct Config {
    pub root: Root,
    /// `USER anonymous` / `USER ftp` log in with any password.
    pub anonymous: bool,
    /// Anonymous sessions may also upload, delete, rename and make
    /// directories (by default they only read).
    pub anonymous_write: bool,
    pub users: Users,
}

impl Config {
    /// Whether `name` is the anonymous account.
    pub fn is_anonymous(&self, name: &str) -> bool {
        self.anonymous
            && (name.eq_ignore_ascii_case("anonymous") || name.eq_ignore_ascii_case("ftp"))
    }
}

/// Accounts from a users file: one `name:password` per line; blank lines
/// and lines starting with `#` are skipped.
#[derive(Default)]
pub struct Users(HashMap<String, String>);

impl Users {
    pub fn load(path: &Path) -> anyhow::Result<Users> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading users file {}", path.display()))?;
        Users::parse(&text).with_context(|| format!("users file {}", path.display()))
    }

    pub fn parse(text: &str) -> anyhow::Result<Users> {
        let mut users = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() || line.trim_start().starts_with('#') {
                continue;
            }
            let Some((name, password)) = line.split_once(':') else {
                anyhow::bail!("line {}: expected name:password", i + 1);
            };
            let name = name.trim();
            if name.is_empty() || name.len() > MAX_USER || name.contains(char::is_whitespace) {
                anyhow::bail!(
                    "line {}: a user name is 1 to {MAX_USER} bytes without spaces",
                    i + 1
                );
            }
            if users.insert(name.to_owned(), password.to_owned()).is_some() {
                anyhow::bail!("line {}: user {name} appears twice", i + 1);
            }
        }
        Ok(Users(users))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `password` is `name`'s.
    pub fn check(&self, name: &str, password: &str) -> bool {
        self.0
            .get(name)
            .is_some_and(|p| constant_time_eq(p.as_bytes(), password.as_bytes()))
    }
}

/// Compares without stopping at the first difference, so the time taken
/// does not say how much of a guess was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_file() {
        let u = Users::parse("# accounts\n\nalice:s3cret\nbob:pa:ss word\r\n  # more\n").unwrap();
        assert!(u.check("alice", "s3cret"));
        assert!(!u.check("alice", "s3cre"));
        assert!(!u.check("alice", "s3cret "));
        assert!(u.check("bob", "pa:ss word"));
        assert!(!u.check("carol", ""));
        assert!(Users::parse("alice").is_err());
        assert!(Users::parse(":x").is_err());
        assert!(Users::parse("a:1\na:2").is_err());
    }
}
