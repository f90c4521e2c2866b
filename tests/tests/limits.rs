//! Resource edges: an open-files limit too small for --max-conns.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use hf_tests::testsvc::answer;
use hf_tests::{bin, free_port, wait_status, Phase, TempDir};

/// With RLIMIT_NOFILE at 100 the keeper holds at most 36 connections (64
/// descriptors stay in reserve) and says so; 150 clients arriving at once
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
    assert!(text.contains("lowering --max-conns to 36"), "log:\n{text}");
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
