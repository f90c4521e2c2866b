//! Resource edges: an open-files limit too small for --max-conns.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use hf_tests::testsvc::answer;
use hf_tests::{bin, free_port, wait_status, Phase, TempDir};

/// With RLIMIT_NOFILE at 100 the keeper holds at most 18 connections (64
/// descriptors stay in reserve, and a worker needs one more for each
/// connection it serves) and says so; 150 clients arriving at once
/// — more than the limit allows open at once — are all answered, the extra
/// ones after waiting in the listen backlog.
#[test]
fn small_fd_limit_lowers_max_conns_and_nobody_is_refused() {
    let dir = TempDir::new("nofile");
    let control = dir.path().join("control.sock");
    let log = dir.path().join("keeper.log");
    let port = free_port();
    let script = "import os, resource, sys\nresource.setrlimit(resource.RLIMIT_NOFILE, (100, 100))\nos.execv(sys.argv[1], sys.argv[1:])\n";
    let logf = std::fs::File::create(&log).unwrap();
    let mut keeper = hf_tests::Proc(
        Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(bin("holdfast"))
            .args(["run", "--listen", &format!("127.0.0.1:{port}"), "--control"])
            .arg(&control)
            .arg("--")
            .arg(bin("hf-testsvc"))
            .arg("--tokio")
            .stdin(Stdio::null())
            .stdout(logf.try_clone().unwrap())
            .stderr(logf)
            .spawn()
            .unwrap(),
    );
    wait_status(&control, "serving", Duration::from_secs(20), |s| {
        s.phase == Phase::Serving
    });
    let clients: Vec<_> = (0..150u64)
        .map(|id| {
            std::thread::spawn(move || -> std::io::Result<Vec<u8>> {
                let mut c = TcpStream::connect(("127.0.0.1", port))?;
                c.set_read_timeout(Some(Duration::from_secs(20)))?;
                // Hold the connection a little so that many are open at once.
                std::thread::sleep(Duration::from_millis(200));
                c.write_all(format!("REQ {id} 500 0\n").as_bytes())?;
                let mut got = vec![0u8; answer(id, 500, 0).len()];
                c.read_exact(&mut got)?;
                Ok(got)
            })
        })
        .collect();
    for (id, c) in clients.into_iter().enumerate() {
        let got = c.join().unwrap().expect("answered, not refused or reset");
        assert!(got == answer(id as u64, 500, 0));
    }
    let s = hf_keeper::status::query(&control).unwrap();
    assert_eq!(s.accepted, 150);
    let _ = keeper.0.kill();
    let _ = keeper.0.wait();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("holding at most 18 connections"),
        "log:\n{text}"
    );
}

/// An accept storm: 2,000 connections arriving at once from 40 threads,
/// each with a request, while the worker is killed in the middle of it:
/// every one answered byte for byte, none reset.
#[test]
fn accept_storm_with_a_kill_in_the_middle() {
    let mut k = hf_tests::testsvc::keeper(&[], &["--tokio"]);
    let addr = k.addr;
    let go = std::sync::Arc::new(std::sync::Barrier::new(41));
    let threads: Vec<_> = (0..40u64)
        .map(|t| {
            let go = go.clone();
            std::thread::spawn(move || -> Result<(), String> {
                go.wait();
                let mut open = Vec::new();
                for i in 0..50u64 {
                    let id = t * 1000 + i;
                    let mut c = TcpStream::connect(addr).map_err(|e| format!("{id}: {e}"))?;
                    c.write_all(format!("REQ {id} 300 0\n").as_bytes())
                        .map_err(|e| format!("{id}: {e}"))?;
                    open.push((id, c));
                }
                for (id, mut c) in open {
                    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                    let want = answer(id, 300, 0);
                    let mut got = vec![0u8; want.len()];
                    c.read_exact(&mut got).map_err(|e| format!("{id}: {e}"))?;
                    if got != want {
                        return Err(format!("{id}: wrong answer"));
                    }
                }
                Ok(())
            })
        })
        .collect();
    go.wait();
    std::thread::sleep(Duration::from_millis(30));
    k.kill_active();
    for t in threads {
        t.join().unwrap().unwrap_or_else(|e| panic!("{e}"));
    }
    let s = k.wait_for("all closed", |s| s.connections == 0);
    assert_eq!(s.accepted, 2000);
}

/// A client that never reads (its answer fills the socket buffers) and one
/// that never sends hold their connections without holding up anyone else,
/// across a worker kill too; the reader that finally reads gets every byte.
#[test]
fn clients_that_never_read_or_never_send_hold_up_nobody() {
    let mut k = hf_tests::testsvc::keeper(&[], &["--tokio"]);
    let mut stuck = TcpStream::connect(k.addr).unwrap();
    let big = 8 << 20;
    stuck
        .write_all(format!("REQ 1 {big} 0\n").as_bytes())
        .unwrap();
    let _silent = TcpStream::connect(k.addr).unwrap();
    let mut c = hf_tests::testsvc::LineClient::connect(k.addr, "busy");
    for i in 0..20 {
        c.request(100 + i, 5000, 0);
    }
    k.kill_and_wait();
    for i in 0..20 {
        c.request(1000 + i, 5000, 0);
    }
    stuck
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let want = answer(1, big, 0);
    let mut got = vec![0u8; want.len()];
    stuck.read_exact(&mut got).unwrap();
    assert!(got == want, "the stuck client's answer differs");
}

/// Starts `holdfast run` under an open-files limit of `nofile` (soft and
/// hard, set in the keeper's process before it starts), serving `dir` with
/// hf-httpd started through `worker_prefix` (a shell snippet run before the
/// worker's `exec`, e.g. a lower `ulimit -n` of its own). Returns the
/// keeper, its control socket and its port.
fn httpd_under_nofile(
    dir: &std::path::Path,
    nofile: u32,
    worker_prefix: &str,
) -> (hf_tests::Proc, std::path::PathBuf, u16) {
    let control = dir.join("control.sock");
    let log = dir.join("keeper.log");
    let port = free_port();
    let script = format!(
        "import os, resource, sys\nresource.setrlimit(resource.RLIMIT_NOFILE, ({nofile}, {nofile}))\nos.execv(sys.argv[1], sys.argv[1:])\n"
    );
    let logf = std::fs::File::create(&log).unwrap();
    let root = dir.join("site");
    let keeper = hf_tests::Proc(
        Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(bin("holdfast"))
            .args(["run", "--listen", &format!("127.0.0.1:{port}"), "--control"])
            .arg(&control)
            .args(["--", "sh", "-c"])
            .arg(format!("{worker_prefix} exec \"$0\" \"$@\""))
            .arg(bin("hf-httpd"))
            .arg("--root")
            .arg(&root)
            .env("HOLDFAST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(logf.try_clone().unwrap())
            .stderr(logf)
            .spawn()
            .unwrap(),
    );
    wait_status(&control, "serving", Duration::from_secs(20), |s| {
        s.phase == Phase::Serving
    });
    (keeper, control, port)
}

/// `clients` keep-alive clients at once, each asking for every file of
/// `files` in turn; every fourth starts with the first file (make it larger
/// than a loopback socket's send buffer) and waits before reading it
/// through a small receive window, so that the worker holds that file open
/// while the other clients arrive. Returns the failures (status other than
/// 200, wrong body, reset, cut answer), at most one per client.
fn fetch_all_at_once(
    port: u16,
    clients: usize,
    files: &std::sync::Arc<Vec<(String, Vec<u8>)>>,
) -> Vec<String> {
    let go = std::sync::Arc::new(std::sync::Barrier::new(clients));
    let threads: Vec<_> = (0..clients)
        .map(|c| {
            let (go, files) = (go.clone(), files.clone());
            std::thread::spawn(move || -> Result<(), String> {
                let slow = c % 4 == 0;
                let first = usize::from(!slow);
                let order: Vec<usize> = (first..files.len()).collect();
                go.wait();
                let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
                let s = hf_tests::connect_small_rcvbuf(addr, if slow { 4096 } else { 1 << 20 })
                    .map_err(|e| format!("client {c}: connect: {e}"))?;
                let mut cl = hf_tests::http::Client::from_stream(s)
                    .map_err(|e| format!("client {c}: {e}"))?;
                for (i, f) in order.iter().enumerate() {
                    let (path, want) = &files[*f];
                    let r = cl
                        .send(format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes())
                        .and_then(|()| {
                            if slow && i == 0 {
                                std::thread::sleep(Duration::from_millis(300));
                            }
                            cl.read_response(false)
                        })
                        .map_err(|e| format!("client {c} {path}: {e}"))?;
                    if r.status != 200 || r.body != *want {
                        return Err(format!(
                            "client {c} {path}: status {}, {} bytes of {}",
                            r.status,
                            r.body.len(),
                            want.len()
                        ));
                    }
                }
                Ok(())
            })
        })
        .collect();
    threads
        .into_iter()
        .filter_map(|t| t.join().unwrap().err())
        .collect()
}

/// Issue 15, item 7. With RLIMIT_NOFILE at 256 the workers (which inherit
/// it) must have room for their connections and for the files they open to
/// answer them: 240 clients arriving at once, each reading 8 files, get
/// every answer right — no 404 for a file that exists, no cut answer — and
/// no worker dies on the way.
#[test]
fn workers_under_the_open_files_limit_answer_every_request() {
    let dir = TempDir::new("nofile-httpd");
    std::fs::create_dir(dir.path().join("site")).unwrap();
    let files = std::sync::Arc::new(hf_tests::http::make_site(
        &dir.path().join("site"),
        &[6_000_000, 600_000, 300_000, 10, 1000, 20_000, 70_000],
    ));
    let (mut keeper, control, port) = httpd_under_nofile(dir.path(), 256, "");
    let failed = fetch_all_at_once(port, 240, &files);
    let s = hf_keeper::status::query(&control).unwrap();
    let _ = keeper.0.kill();
    let _ = keeper.0.wait();
    let log = std::fs::read_to_string(dir.path().join("keeper.log")).unwrap();
    assert!(
        failed.is_empty(),
        "{} clients failed, first: {:?}; log:\n{log}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert_eq!(s.accepted, 240);
    assert_eq!(s.restarts, 0, "a worker died; log:\n{log}");
}

/// Issue 15, item 7, the library's side: a worker whose own open-files
/// limit (128) is lower than its keeper's takes no more connections than
/// leave it room to serve them, and hands the rest back to the keeper,
/// which holds them until the worker has room: every request answered, no
/// descriptor lost to a truncated hand-over, no worker death.
#[test]
fn a_worker_with_a_lower_open_files_limit_takes_only_what_fits() {
    let dir = TempDir::new("nofile-worker");
    std::fs::create_dir(dir.path().join("site")).unwrap();
    let files = std::sync::Arc::new(hf_tests::http::make_site(
        &dir.path().join("site"),
        &[6_000_000, 600_000, 300_000, 10, 1000, 20_000, 70_000],
    ));
    let (mut keeper, control, port) = httpd_under_nofile(dir.path(), 256, "ulimit -n 128 &&");
    let failed = fetch_all_at_once(port, 240, &files);
    let s = hf_keeper::status::query(&control).unwrap();
    let _ = keeper.0.kill();
    let _ = keeper.0.wait();
    let log = std::fs::read_to_string(dir.path().join("keeper.log")).unwrap();
    assert!(
        failed.is_empty(),
        "{} clients failed, first: {:?}; log:\n{log}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert_eq!(s.accepted, 240);
    assert_eq!(s.restarts, 0, "a worker died; log:\n{log}");
    assert!(
        !log.contains("control message truncated"),
        "fds were lost in a hand-over; log:\n{log}"
    );
    // The worker did run out of room (what this test is about) and said so.
    assert!(
        log.contains("handing them back to the keeper"),
        "the worker never refused a connection; log:\n{log}"
    );
}
