//! hf-httpd follows RFC 9112 where clients and intermediaries rely on it,
//! and a client that never finishes its request head cannot hold a
//! connection forever.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use hf_tests::http::make_site;
use hf_tests::{bin, Keeper, TempDir};

fn httpd(dir: &TempDir, extra: &[&str]) -> Keeper {
    let exe = bin("hf-httpd");
    let mut cmd = vec![
        exe.to_str().unwrap(),
        "--root",
        dir.path().to_str().unwrap(),
    ];
    cmd.extend_from_slice(extra);
    Keeper::start(&[], &cmd)
}

/// Sends `req` and reads one response head (and its body, if it says how
/// long it is): the status line.
fn status_of(s: &mut TcpStream, req: &str) -> String {
    s.write_all(req.as_bytes()).unwrap();
    let mut got = Vec::new();
    let mut b = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut b).unwrap(), 1, "response head cut short");
        got.push(b[0]);
    }
    let head = String::from_utf8(got).unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .map_or(0, |v| v.trim().parse().unwrap());
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).unwrap();
    head.lines().next().unwrap().to_owned()
}

/// Issue: hf-httpd answered an HTTP/1.1 request without `Host` with 200
/// (RFC 9112 requires 400, as nginx answers), and served `/file.bin/` as
/// the file (nginx: 404).
#[test]
fn host_is_required_and_a_file_is_no_directory() {
    let dir = TempDir::new("conformance");
    let files = make_site(dir.path(), &[1000]);
    let path = &files[0].0;
    let k = httpd(&dir, &[]);
    let mut s = TcpStream::connect(k.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let ok = format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(status_of(&mut s, &ok), "HTTP/1.1 200 OK");
    assert_eq!(
        status_of(&mut s, &format!("GET {path} HTTP/1.1\r\n\r\n")),
        "HTTP/1.1 400 Bad Request",
        "HTTP/1.1 without Host"
    );
    assert_eq!(
        status_of(
            &mut s,
            &format!("GET {path} HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
        ),
        "HTTP/1.1 400 Bad Request",
        "two Host fields"
    );
    assert_eq!(
        status_of(&mut s, &format!("GET {path}/ HTTP/1.1\r\nHost: t\r\n\r\n")),
        "HTTP/1.1 404 Not Found",
        "a file named as a directory"
    );
    // The connection went on through the errors.
    assert_eq!(status_of(&mut s, &ok), "HTTP/1.1 200 OK");
    // HTTP/1.0 needs no Host.
    let mut s10 = TcpStream::connect(k.addr).unwrap();
    s10.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(
        status_of(&mut s10, &format!("GET {path} HTTP/1.0\r\n\r\n")),
        "HTTP/1.1 200 OK"
    );
}

/// Issue: hf-httpd had no header timeout: 500 slowloris connections sat
/// forever. A head still incomplete `--header-timeout` after its first
/// byte gets 408 and a close; an idle keep-alive connection is not timed.
#[test]
fn slow_request_heads_time_out() {
    let dir = TempDir::new("slowloris");
    let files = make_site(dir.path(), &[10]);
    let path = &files[0].0;
    let k = httpd(&dir, &["--header-timeout", "300"]);
    let idle = TcpStream::connect(k.addr).unwrap();
    let mut slow = TcpStream::connect(k.addr).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let t0 = Instant::now();
    slow.write_all(b"GET / HTTP/1.1\r\nHo").unwrap();
    let mut got = Vec::new();
    slow.read_to_end(&mut got)
        .expect("a clean close after the answer");
    let took = t0.elapsed();
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.starts_with("HTTP/1.1 408 Request Timeout\r\n"),
        "{text}"
    );
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(5),
        "{took:?}"
    );
    // The idle connection is still open and serves a request.
    let mut idle = idle;
    idle.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert_eq!(
        status_of(
            &mut idle,
            &format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n")
        ),
        "HTTP/1.1 200 OK"
    );
}
