//! A worker that cannot start: start-ups back off, connections wait for the
//! hold timeout and then get the configured "unavailable" reply and a clean
//! close — never a reset, never a spinning CPU.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hf_tests::{bin, free_port, wait_status, Phase, TempDir};

const REPLY: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

/// A keeper on a free port whose worker exits 1 at every start, with the
/// unavailable reply `REPLY` and `extra` arguments: (its directory, control
/// socket, port, process).
fn failing_keeper(extra: &[&str]) -> (TempDir, std::path::PathBuf, u16, hf_tests::Proc) {
    let dir = TempDir::new("crashloop");
    let control = dir.path().join("control.sock");
    let reply = dir.path().join("503.http");
    std::fs::write(&reply, REPLY).unwrap();
    let port = free_port();
    let keeper = hf_tests::Proc(
        Command::new(bin("holdfast"))
            .args(["run", "--listen", &format!("127.0.0.1:{port}")])
            .args(extra)
            .arg("--unavailable")
            .arg(&reply)
            .arg("--control")
            .arg(&control)
            .args(["--", "/bin/sh", "-c", "exit 1"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    (dir, control, port, keeper)
}

#[test]
fn crash_loop_backs_off_and_turns_connections_away_cleanly() {
    let (_dir, control, port, mut keeper) = failing_keeper(&["--hold-timeout", "600"]);
    wait_status(
        &control,
        "failing start-ups",
        Duration::from_secs(20),
        |s| s.start_failures >= 2,
    );
    let t0 = Instant::now();
    let clients: Vec<_> = (0..5)
        .map(|_| {
            std::thread::spawn(move || {
                let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
                c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                c.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
                let mut got = Vec::new();
                let mut buf = [0u8; 256];
                loop {
                    match c.read(&mut buf) {
                        Ok(0) => return Ok(got),
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                        Err(e) if e.kind() == ErrorKind::ConnectionReset => {
                            return Err("reset".to_owned())
                        }
                        Err(e) => return Err(e.to_string()),
                    }
                }
            })
        })
        .collect();
    for c in clients {
        let got = c.join().unwrap().expect("a clean close, not a reset");
        assert_eq!(got, REPLY, "the unavailable reply, then EOF");
    }
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(550),
        "turned away before the hold timeout: {waited:?}"
    );
    let s = wait_status(&control, "the count", Duration::from_secs(5), |s| {
        s.turned_away == 5
    });
    assert_eq!(s.phase, Phase::Starting);
    assert!(
        s.last_exits
            .iter()
            .all(|e| e.contains("exited with code 1")),
        "{:?}",
        s.last_exits
    );
    // Back-off, not a spin: 40 ms doubling to a 5 s cap allows only a
    // handful of start-ups in the few seconds this test ran.
    let elapsed = t0.elapsed() + Duration::from_millis(200);
    assert!(
        s.start_failures <= 12,
        "{} start-ups failed in {elapsed:?}",
        s.start_failures
    );
    let _ = keeper.0.kill();
    let _ = keeper.0.wait();
}

/// While no worker can run, the input waiting connections have queued is
/// bounded too (`--hold-kib`): past it, the oldest connections get the
/// unavailable reply and a clean close; newer ones go on waiting.
#[test]
fn held_input_is_bounded_by_bytes_oldest_first() {
    let (_dir, control, port, mut keeper) =
        failing_keeper(&["--hold-timeout", "60000", "--hold-kib", "256"]);
    wait_status(
        &control,
        "failing start-ups",
        Duration::from_secs(20),
        |s| s.start_failures >= 1,
    );
    // Five clients, oldest first, each with 100 KB of request queued (it
    // fits in the kernel's buffers, so every write completes).
    let body = vec![b'x'; 100_000];
    let mut clients = Vec::new();
    for _ in 0..5 {
        let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        c.write_all(&body).unwrap();
        clients.push(c);
        // Accepted, in order. Not `waiting`: from the third client on, the
        // keeper may turn the oldest away before a status read sees it held.
        wait_status(
            &control,
            "the connection accepted",
            Duration::from_secs(5),
            |s| s.accepted == clients.len() as u64,
        );
    }
    // 500 KB waiting, 256 KiB allowed: the three oldest go, the two newest stay.
    let s = wait_status(
        &control,
        "oldest turned away",
        Duration::from_secs(5),
        |s| s.turned_away == 3,
    );
    assert_eq!(s.waiting, 2);
    for (i, c) in clients.iter_mut().enumerate() {
        c.set_read_timeout(Some(Duration::from_millis(if i < 3 { 5000 } else { 300 })))
            .unwrap();
        let mut got = Vec::new();
        let r = c.read_to_end(&mut got);
        if i < 3 {
            r.unwrap_or_else(|e| panic!("client {i}: {e} instead of a clean close"));
            assert_eq!(got, REPLY, "client {i}");
        } else {
            let e = r.expect_err("a newer client is still held");
            assert!(
                matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
                "client {i}: {e}"
            );
            assert!(got.is_empty());
        }
    }
    let _ = keeper.0.kill();
    let _ = keeper.0.wait();
}

/// Issue: a crash loop after "ready" never let go. A version that reports
/// ready and then aborts on every request used to be restarted ~500 times
/// a second with no back-off, and `--hold-timeout` started over at each
/// recovery, so clients waited forever. Now active workers that crash
/// before serving anything back off like failed start-ups, the hold time
/// counts from the first loss, and a request that still crashes its worker
/// after it was flagged as poison is closed: every client sees a clean end
/// (the unavailable reply or a FIN), in bounded time.
#[test]
fn crash_loop_after_ready_backs_off_and_lets_go() {
    let dir = TempDir::new("crashloop-ready");
    let control = dir.path().join("control.sock");
    let reply = dir.path().join("503.http");
    std::fs::write(&reply, REPLY).unwrap();
    let port = free_port();
    let mut keeper = hf_tests::Proc(
        Command::new(bin("holdfast"))
            .args(["run", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--hold-timeout", "1500", "--unavailable"])
            .arg(&reply)
            .arg("--control")
            .arg(&control)
            .arg("--")
            .arg(bin("hf-testsvc"))
            .arg("--abort-on-request")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_status(&control, "serving", Duration::from_secs(20), |s| {
        s.phase == Phase::Serving
    });
    let t0 = Instant::now();
    let clients: Vec<_> = (0..4)
        .map(|i| {
            std::thread::spawn(move || {
                let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
                c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                c.write_all(format!("REQ {i} 10 0\n").as_bytes()).unwrap();
                let mut got = Vec::new();
                c.read_to_end(&mut got)
                    .map(|_| got)
                    .map_err(|e| format!("client {i}: {e} ({:?})", e.kind()))
            })
        })
        .collect();
    for c in clients {
        let got = c
            .join()
            .unwrap()
            .expect("a clean end, not a reset or a hang");
        assert!(
            got.is_empty() || got == REPLY,
            "the unavailable reply or nothing: {:?}",
            String::from_utf8_lossy(&got)
        );
    }
    let took = t0.elapsed();
    let s = hf_tests::status_of(&control);
    assert!(
        s.restarts <= 40,
        "{} restarts in {took:?}: no back-off",
        s.restarts
    );
    assert!(s.start_failures > 0, "the crash loop is reported");
    // Back-off makes the loop slow enough for the hold timeout, counted
    // from the first loss, to turn clients away with the reply.
    assert!(s.turned_away >= 1, "{s:?}");
    let _ = keeper.0.kill();
    let _ = keeper.0.wait();
}
