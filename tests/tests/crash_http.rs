//! hf-httpd under the keeper, workers SIGKILLed while real clients run.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hf_tests::http::{make_site, Client};
use hf_tests::{bin, Keeper, TempDir};

fn httpd(root: &std::path::Path) -> Vec<String> {
    vec![
        bin("hf-httpd").display().to_string(),
        "--root".into(),
        root.display().to_string(),
    ]
}

fn start(root: &std::path::Path, extra: &[&str]) -> Keeper {
    let cmd = httpd(root);
    let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
    Keeper::start(extra, &cmd)
}

/// 64 keep-alive clients, files of varied sizes, the active worker killed
/// every 20–50 ms for 10 s: no failed request, no reset, every byte right.
#[test]
fn storm_of_kills_under_64_keepalive_clients() {
    let dir = TempDir::new("storm");
    let sizes = [
        0, 1, 100, 1000, 4095, 4096, 20_000, 65_536, 100_000, 300_000, 1_000_000,
    ];
    let files = Arc::new(make_site(dir.path(), &sizes));
    let mut k = start(dir.path(), &[]);
    let addr = k.addr;
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..64u64)
        .map(|c| {
            let (files, stop, done) = (files.clone(), stop.clone(), done.clone());
            std::thread::spawn(move || -> Result<u64, String> {
                let mut cl =
                    Client::connect(addr).map_err(|e| format!("client {c}: connect: {e}"))?;
                let mut n = 0u64;
                let mut i = c as usize;
                while !stop.load(Ordering::Relaxed) {
                    let (path, want) = &files[i % files.len()];
                    i = i.wrapping_mul(7).wrapping_add(3);
                    let r = cl
                        .get(path)
                        .map_err(|e| format!("client {c} request {n} {path}: {e}"))?;
                    if r.status != 200 || r.body != *want {
                        return Err(format!(
                            "client {c} request {n} {path}: status {} body {} bytes, want {}",
                            r.status,
                            r.body.len(),
                            want.len()
                        ));
                    }
                    n += 1;
                    done.fetch_add(1, Ordering::Relaxed);
                }
                Ok(n)
            })
        })
        .collect();
    let t0 = Instant::now();
    let mut kills = 0;
    let mut seed = 0x1234_5678_u64;
    while t0.elapsed() < Duration::from_secs(10) {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(Duration::from_millis(20 + seed % 31));
        k.kill_active();
        kills += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for c in clients {
        match c.join().expect("client thread") {
            Ok(n) => total += n,
            Err(e) => panic!("{e}\nkeeper log:\n{}", k.log()),
        }
    }
    let s = k.status().expect("status");
    eprintln!(
        "{total} requests, {kills} kills, {} restarts, {} connections recovered, last recovery {:?} µs",
        s.restarts, s.recovered_connections, s.last_recovery_us
    );
    assert!(s.restarts >= 100, "only {} restarts", s.restarts);
    assert!(total > 1000, "only {total} requests completed");
    assert!(s.recovered_connections > 0);
}

/// A 64 MiB download read slowly while the worker is killed five times:
/// the client gets the exact file.
#[test]
fn large_response_to_slow_reader_survives_kills() {
    let dir = TempDir::new("large");
    let files = make_site(dir.path(), &[64 << 20]);
    let (path, want) = &files[0];
    let mut k = start(dir.path(), &[]);
    let mut cl = Client::connect(k.addr).unwrap();
    cl.send(format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
        .unwrap();
    let reader = std::thread::spawn(move || {
        // Slow: about 64 MiB in 2.5 s, in small reads.
        let s = cl.stream();
        let mut got = Vec::with_capacity(want_len());
        let mut buf = [0u8; 32 * 1024];
        let t0 = Instant::now();
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => panic!("read after {} bytes: {e}", got.len()),
            }
            let head = got.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
            if let Some(h) = head {
                if got.len() - h >= want_len() {
                    break;
                }
            }
            let expect = Duration::from_secs_f64(got.len() as f64 / (26.0 * 1024.0 * 1024.0));
            if let Some(wait) = expect.checked_sub(t0.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        got
    });
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(350));
        k.kill_and_wait();
    }
    let got = reader.join().expect("reader");
    let h = got
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("response head")
        + 4;
    assert!(got.starts_with(b"HTTP/1.1 200 OK\r\n"));
    assert_eq!(got.len() - h, want.len(), "body length");
    assert!(got[h..] == want[..], "body differs");
    let s = k.status().unwrap();
    assert_eq!(s.restarts, 5);
    assert!(
        s.recovered_connections >= 5,
        "the download was recovered each time: {}",
        s.recovered_connections
    );
}

fn want_len() -> usize {
    64 << 20
}

/// The client sends a request head in two parts with a kill in between:
/// the next worker reads the whole head and answers it.
#[test]
fn request_split_around_a_kill_completes() {
    let dir = TempDir::new("split");
    let files = make_site(dir.path(), &[5000]);
    let (path, want) = &files[0];
    let mut k = start(dir.path(), &[]);
    let mut cl = Client::connect(k.addr).unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n");
    let (a, b) = req.as_bytes().split_at(req.len() / 2);
    cl.send(a).unwrap();
    // Let the worker peek the first half before it dies.
    k.wait_for("connection handed out", |s| {
        s.workers.iter().any(|w| w.connections == 1)
    });
    std::thread::sleep(Duration::from_millis(30));
    k.kill_and_wait();
    cl.send(b).unwrap();
    let r = cl.read_response(false).unwrap();
    assert_eq!(r.status, 200);
    assert!(r.body == *want);
    // And the connection is still good for more.
    let r = cl.get(path).unwrap();
    assert!(r.body == *want);
}

/// No standby: connections that arrive while no worker runs wait in the
/// listen backlog and the keeper's queue; none is refused, all are answered.
#[test]
fn connections_wait_while_no_worker_runs() {
    let dir = TempDir::new("backlog");
    let files = make_site(dir.path(), &[777]);
    let (path, want) = &files[0];
    let mut k = start(dir.path(), &["--standby", "0"]);
    let addr = k.addr;
    let pid = k.kill_active();
    let t0 = Instant::now();
    let clients: Vec<_> = (0..200)
        .map(|_| {
            let path = path.clone();
            std::thread::spawn(move || -> std::io::Result<Vec<u8>> {
                let mut c = Client::connect(addr)?;
                Ok(c.get(&path)?.body)
            })
        })
        .collect();
    for c in clients {
        let body = c.join().unwrap().expect("request while no worker ran");
        assert!(body == *want);
    }
    let s = k.wait_for("a new worker", |s| s.workers.iter().any(|w| w.pid != pid));
    assert_eq!(s.restarts, 1);
    eprintln!(
        "200 connections answered {:?} after the only worker died",
        t0.elapsed()
    );
}

/// curl, a client nobody here wrote, downloads through two kills.
#[test]
fn curl_download_survives_kills() {
    let dir = TempDir::new("curl");
    let files = make_site(dir.path(), &[24 << 20]);
    let (path, want) = &files[0];
    let mut k = start(dir.path(), &[]);
    let out = dir.path().join("out.bin");
    let mut curl = std::process::Command::new("curl")
        .args(["-sS", "--fail", "--limit-rate", "12M", "-o"])
        .arg(&out)
        .arg(format!("http://{}{}", k.addr, path))
        .spawn()
        .expect("curl is installed");
    for _ in 0..2 {
        std::thread::sleep(Duration::from_millis(500));
        k.kill_and_wait();
    }
    let st = curl.wait().unwrap();
    assert!(st.success(), "curl failed: {st}");
    let got = std::fs::read(&out).unwrap();
    assert!(
        got == *want,
        "downloaded file differs ({} bytes)",
        got.len()
    );
    assert!(k.status().unwrap().recovered_connections >= 2);
}

/// HEAD, 404, 405 and a traversal attempt get proper answers, on one
/// keep-alive connection, across a kill.
#[test]
fn error_replies_and_keepalive_across_a_kill() {
    let dir = TempDir::new("errors");
    let files = make_site(dir.path(), &[10]);
    let (path, _) = &files[0];
    let mut k = start(dir.path(), &[]);
    let mut cl = Client::connect(k.addr).unwrap();
    cl.send(format!("HEAD {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
        .unwrap();
    let r = cl.read_response(true).unwrap();
    assert_eq!((r.status, r.header("content-length")), (200, Some("10")));
    k.kill_and_wait();
    assert_eq!(cl.get("/nope").unwrap().status, 404);
    assert_eq!(cl.get("/../../etc/passwd").unwrap().status, 403);
    cl.send(b"DELETE / HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    assert_eq!(cl.read_response(false).unwrap().status, 405);
    cl.stream().write_all(b"garbage\r\n\r\n").unwrap();
    assert_eq!(cl.read_response(false).unwrap().status, 400);
}
