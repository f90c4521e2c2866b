//! The built-in sample site served by `holdfast demo`.

use std::path::Path;

/// Size of `big.bin`: large enough that a download is still in flight when
/// the worker is killed, so the demo shows a transfer surviving the crash.
pub const BIG_BIN_LEN: usize = 8 * 1024 * 1024;
/// Seed of `big.bin` ("holdfast" in ASCII), so tests can regenerate and
/// compare the exact bytes a client received.
pub const BIG_BIN_SEED: u64 = 0x686f_6c64_6661_7374;

const INDEX_HTML: &str = r#"<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>holdfast demo</title>
<link rel="stylesheet" href="/style.css">
</head>
<body>
<h1>holdfast demo</h1>
<p>This page is served by hf-httpd, a small static-file server running on holdfast.
Holdfast keeps the listening socket and every open client connection alive outside the worker
process, so the worker can be killed with <code>kill -9</code> at any moment.
A fresh worker takes over the same connections and carries on where the old one stopped:
keep-alive sessions stay open and half-finished downloads complete with every byte intact.
Try fetching <a href="/big.bin">big.bin</a> (8 MiB) slowly and killing the worker mid-transfer.</p>
<ul>
<li><a href="/hello.txt">hello.txt</a></li>
<li><a href="/big.bin">big.bin</a></li>
</ul>
</body>
</html>
"#;

const STYLE_CSS: &str =
    "body { font-family: sans-serif; max-width: 40em; margin: 2em auto; line-height: 1.5; }\n\
code { background: #eee; padding: 0 .2em; }\n";

const HELLO_TXT: &str = "hello from hf-httpd\n";

/// Writes the sample site into `dir` (created if needed) and returns each
/// file's relative name and size.
pub fn write_sample_site(dir: &Path) -> std::io::Result<Vec<(String, u64)>> {
    std::fs::create_dir_all(dir)?;
    let big = sample_bytes(BIG_BIN_LEN, BIG_BIN_SEED);
    let files: [(&str, &[u8]); 4] = [
        ("index.html", INDEX_HTML.as_bytes()),
        ("style.css", STYLE_CSS.as_bytes()),
        ("hello.txt", HELLO_TXT.as_bytes()),
        ("big.bin", &big),
    ];
    let mut out = Vec::with_capacity(files.len());
    for (name, data) in files {
        std::fs::write(dir.join(name), data)?;
        out.push((name.to_string(), data.len() as u64));
    }
    Ok(out)
}

/// Deterministic pseudo-random bytes (xorshift64*, little-endian words).
/// Not cryptographic: it only has to be incompressible-looking and
/// reproducible so a test can verify a download byte for byte.
pub fn sample_bytes(len: usize, seed: u64) -> Vec<u8> {
    // xorshift has the all-zero state as a fixed point; avoid it.
    let mut x = if seed == 0 { BIG_BIN_SEED } else { seed };
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_bytes_deterministic() {
        let a = sample_bytes(1001, 7);
        assert_eq!(a.len(), 1001);
        assert_eq!(a, sample_bytes(1001, 7));
        // a prefix of a longer stream is the shorter stream
        assert_eq!(&sample_bytes(4096, 7)[..1001], &a[..]);
        assert_ne!(a, sample_bytes(1001, 8));
        assert!(sample_bytes(0, 1).is_empty());
        assert!(sample_bytes(64, 0).iter().any(|&b| b != 0));
    }

    #[test]
    fn writes_site() {
        let dir = std::env::temp_dir().join(format!("hf-site-test-{}", std::process::id()));
        let list = write_sample_site(&dir).unwrap();
        let names: Vec<&str> = list.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["index.html", "style.css", "hello.txt", "big.bin"]);
        for (name, size) in &list {
            assert_eq!(std::fs::metadata(dir.join(name)).unwrap().len(), *size);
        }
        assert_eq!(
            std::fs::read(dir.join("hello.txt")).unwrap(),
            b"hello from hf-httpd\n"
        );
        assert_eq!(
            std::fs::read(dir.join("big.bin")).unwrap(),
            sample_bytes(BIG_BIN_LEN, BIG_BIN_SEED)
        );
        assert!(std::fs::read_to_string(dir.join("index.html"))
            .unwrap()
            .contains("<title>holdfast demo</title>"));
        // rewriting over an existing site works
        write_sample_site(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
