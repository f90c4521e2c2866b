//! The services run without a keeper: the same binaries, plain sockets.

use std::io::Write;
use std::process::Command;

use hf_tests::http::{make_site, Client};
use hf_tests::testsvc::{answer, LineClient};
use hf_tests::{bin, run_cmd, start_pass_through, Proc, TempDir};

#[test]
fn httpd_alone_serves_files_with_keepalive() {
    let dir = TempDir::new("pt-httpd");
    let sizes = [0, 1, 4096, 100_000, 256 * 1024, 256 * 1024 + 1, 3_000_000];
    let files = make_site(dir.path(), &sizes);
    let (child, addr) = start_pass_through(
        Command::new(bin("hf-httpd"))
            .arg("--root")
            .arg(dir.path())
            .args(["--listen", "127.0.0.1:0"]),
    );
    let _child = Proc(child);
    let mut c = Client::connect(addr).unwrap();
    for round in 0..2 {
        for (path, want) in &files {
            let r = c
                .get(path)
                .unwrap_or_else(|e| panic!("round {round} {path}: {e}"));
            assert_eq!(r.status, 200, "{path}");
            assert_eq!(
                r.header("content-length"),
                Some(want.len().to_string().as_str()),
                "{path}"
            );
            assert!(
                r.body == *want,
                "{path}: body differs ({} bytes)",
                r.body.len()
            );
        }
    }
    // Pipelined requests on the same connection, answered in order.
    let (p0, w0) = &files[2];
    let (p1, w1) = &files[3];
    let pipelined = format!(
        "GET {p0} HTTP/1.1\r\nHost: t\r\n\r\n\
         HEAD {p1} HTTP/1.1\r\nHost: t\r\n\r\n\
         GET {p1} HTTP/1.1\r\nHost: t\r\n\r\n"
    );
    c.send(pipelined.as_bytes()).unwrap();
    assert!(c.read_response(false).unwrap().body == *w0);
    let head = c.read_response(true).unwrap();
    assert_eq!(
        head.header("content-length"),
        Some(w1.len().to_string().as_str())
    );
    assert!(c.read_response(false).unwrap().body == *w1);
    assert_eq!(c.get("/missing").unwrap().status, 404);
    // Still the same connection, still good.
    assert!(c.get(p0).unwrap().body == *w0);
}

#[test]
fn testsvc_alone_answers_requests() {
    let (child, addr) =
        start_pass_through(Command::new(bin("hf-testsvc")).args(["--listen", "127.0.0.1:0"]));
    let _child = Proc(child);
    let mut c = LineClient::connect(addr, "pass-through");
    c.request(1, 0, 0);
    c.request(2, 10, 0);
    c.request(3, 200_000, 0);
    // Pipelined, with a pause inside one answer and a malformed line.
    c.send("REQ 4 100 30\nREQ 5 7 0\nbogus\nHOLD 6 x\nREQ 7 1 0\n");
    c.expect(&answer(4, 100, 0), "REQ 4");
    c.expect(&answer(5, 7, 0), "REQ 5");
    c.expect(b"ERR\nERR\n", "malformed lines");
    c.expect(&answer(7, 1, 0), "REQ 7");
    // A second connection is served alongside.
    let mut d = LineClient::connect(addr, "second");
    d.request(8, 5000, 0);
    c.request(9, 5000, 0);
}

#[test]
fn httpd_startup_errors_are_clear() {
    let (code, _, err) = run_cmd(Command::new(bin("hf-httpd")).args([
        "--root",
        "/nonexistent/www",
        "--listen",
        "127.0.0.1:0",
    ]));
    assert_eq!(code, 1, "stderr: {err}");
    assert!(
        err.contains("/nonexistent/www"),
        "stderr does not name the root:\n{err}"
    );
    assert!(err.contains("document root"), "{err}");

    let dir = TempDir::new("pt-notdir");
    let file = dir.path().join("file.txt");
    std::fs::File::create(&file)
        .unwrap()
        .write_all(b"x")
        .unwrap();
    let (code, _, err) = run_cmd(
        Command::new(bin("hf-httpd"))
            .arg("--root")
            .arg(&file)
            .args(["--listen", "127.0.0.1:0"]),
    );
    assert_eq!(code, 1, "stderr: {err}");
    assert!(err.contains("not a directory"), "{err}");

    let (code, _, err) = run_cmd(Command::new(bin("hf-httpd")).args(["--bogus"]));
    assert_eq!(code, 2, "stderr: {err}");
    assert!(err.contains("--bogus"), "{err}");

    let (code, _, err) = run_cmd(Command::new(bin("hf-httpd")).args(["--listen", "127.0.0.1:0"]));
    assert_eq!(code, 2, "stderr: {err}");
    assert!(err.contains("--root"), "missing --root not named:\n{err}");

    let (code, _, err) = run_cmd(Command::new(bin("hf-httpd")).args([
        "--root",
        "/tmp",
        "--listen",
        "not-an-address",
    ]));
    assert_eq!(code, 2, "stderr: {err}");
    assert!(err.contains("not-an-address"), "{err}");

    // Port taken.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let a = taken.local_addr().unwrap().to_string();
    let (code, _, err) =
        run_cmd(Command::new(bin("hf-httpd")).args(["--root", "/tmp", "--listen", &a]));
    assert_eq!(code, 1, "stderr: {err}");
    assert!(err.to_lowercase().contains("address"), "{err}");
}

#[test]
fn testsvc_without_address_or_keeper_fails_clearly() {
    let (code, _, err) = run_cmd(&mut Command::new(bin("hf-testsvc")));
    assert_eq!(code, 1, "stderr: {err}");
    assert!(err.contains("no address to listen on"), "{err}");
    let (code, _, err) = run_cmd(Command::new(bin("hf-testsvc")).arg("--bogus"));
    assert_eq!(code, 2, "stderr: {err}");
    assert!(err.contains("--bogus"), "{err}");
}
