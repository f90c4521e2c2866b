//! A test CA and a server certificate for `localhost` / `127.0.0.1` signed
//! by it (ECDSA P-256, made with the `openssl` CLI), for clients that
//! verify the server: Python's `ssl`, curl.

use std::process::Command;

use crate::{run_cmd, TempDir};

/// `ca.pem`, and `ec.pem` / `ec.key` signed by it, in a temporary directory.
pub struct Pki {
    dir: TempDir,
}

impl Pki {
    pub fn new() -> Pki {
        let dir = TempDir::new("pki");
        let d = dir.path();
        std::fs::write(d.join("ext"), "subjectAltName=DNS:localhost,IP:127.0.0.1\n").unwrap();
        let ssl = |args: &[&str]| {
            let (code, out, err) = run_cmd(Command::new("openssl").args(args).current_dir(d));
            assert_eq!(code, 0, "openssl {args:?}: {out}{err}");
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ];
        let mut ca = vec!["req", "-x509"];
        ca.extend(ec);
        ca.extend([
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=holdfast test CA",
        ]);
        ssl(&ca);
        let mut csr = vec!["req"];
        csr.extend(ec);
        csr.extend([
            "-keyout",
            "ec.key",
            "-out",
            "ec.csr",
            "-subj",
            "/CN=localhost",
        ]);
        ssl(&csr);
        ssl(&[
            "x509",
            "-req",
            "-in",
            "ec.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "ec.pem",
            "-days",
            "2",
            "-extfile",
            "ext",
        ]);
        Pki { dir }
    }

    /// A file of the PKI: `ca.pem`, `ec.pem`, `ec.key`.
    pub fn path(&self, f: &str) -> String {
        self.dir.path().join(f).display().to_string()
    }
}

impl Default for Pki {
    fn default() -> Pki {
        Pki::new()
    }
}
