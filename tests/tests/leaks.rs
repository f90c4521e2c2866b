//! Connection accounting: every connection a client closes — idle, in the
//! middle of an answer, abortively, or while its worker is being replaced —
//! is eventually released by the keeper (its `connections` count returns to
//! 0), and so are hundreds of short ones.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use hf_tests::http::{make_site, Client};
use hf_tests::testsvc::{answer, half, keeper, LineClient};
use hf_tests::{bin, reset, Keeper, Snapshot, TempDir};

/// Open file descriptors of process `pid`.
fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(usize::MAX)
}

fn held(s: &Snapshot) -> usize {
    s.workers.iter().map(|w| w.connections).sum()
}

fn released(k: &mut Keeper, what: &str) -> Snapshot {
    let s = k.wait_for(what, |s| s.connections == 0);
    assert_eq!(held(&s), 0, "{what}: workers still own connections: {s:?}");
    assert_eq!(s.waiting, 0, "{s:?}");
    s
}

/// Idle close: after a request, the client closes; the keeper lets go.
#[test]
fn client_close_of_an_idle_connection_is_released() {
    let mut k = keeper(&[], &[]);
    let mut c = LineClient::connect(k.addr, "idle");
    c.request(1, 100, 0);
    let s = k.wait_for("the connection held", |s| s.connections == 1);
    assert_eq!(held(&s), 1, "{s:?}");
    drop(c);
    released(
        &mut k,
        "the idle connection released after the client closed",
    );
    // A client that closes before sending anything at all.
    let s = TcpStream::connect(k.addr).unwrap();
    k.wait_for("the silent connection accepted", |s| s.accepted == 2);
    drop(s);
    released(&mut k, "the silent connection released");
}

/// The client goes away (FIN, then RST) while the worker is in the middle of
/// an answer: when the worker next writes or reads, it fails, and the keeper
/// releases the connection.
#[test]
fn client_close_mid_response_is_released() {
    let mut k = keeper(&[], &[]);
    // Orderly close after the first half.
    let mut a = LineClient::connect(k.addr, "fin");
    a.send("REQ 1 20000 200\n");
    a.expect(&answer(1, 20_000, 0)[..half(1, 20_000)], "first half");
    // Abortive close (RST) after the first half, with a second request queued.
    let mut b = LineClient::connect(k.addr, "rst");
    b.send("REQ 2 20000 200\nREQ 3 10 0\n");
    b.expect(&answer(2, 20_000, 0)[..half(2, 20_000)], "first half");
    // A request sent, and the client gone before its answer.
    let mut d = LineClient::connect(k.addr, "gone");
    d.send("REQ 5 100000 0\n");
    k.wait_for("all three held", |s| s.connections == 3);
    drop(d);
    drop(a);
    reset(b.into_stream());
    released(&mut k, "connections closed mid-answer released");
    // The worker is fine and serves on.
    let mut c = LineClient::connect(k.addr, "after");
    c.request(4, 10, 0);
}

/// The client closes while its connection is between two workers: it was
/// owned by a worker that is then killed, and the client is gone by the time
/// (or just as) the standby takes over. The recovery must not leak it.
#[test]
fn client_gone_during_recovery_is_released() {
    let mut k = keeper(&[], &[]);
    let mut clients = Vec::new();
    for i in 0..6u64 {
        let mut c = LineClient::connect(k.addr, format!("c{i}"));
        c.send(&format!("REQ {i} 10000 2000\n"));
        c.expect(&answer(i, 10_000, 0)[..half(i, 10_000)], "first half");
        clients.push(c);
    }
    let mut idle = LineClient::connect(k.addr, "idle");
    idle.request(99, 10, 0);
    k.wait_for("all held", |s| s.connections == 7);
    // Half go away before the kill, half (abortively) right after.
    let mut after = Vec::new();
    for (i, c) in clients.into_iter().enumerate() {
        if i % 2 == 0 {
            drop(c);
        } else {
            after.push(c);
        }
    }
    // The idle one closes too: a connection with nothing in flight.
    drop(idle);
    let pid = k.kill_active();
    for c in after {
        reset(c.into_stream());
    }
    k.wait_for("a new active worker", |s| {
        s.workers
            .iter()
            .any(|w| w.role == hf_tests::Role::Active && w.pid != pid)
    });
    let s = released(
        &mut k,
        "connections whose client left during a recovery released",
    );
    assert_eq!(s.restarts, 1);
    let mut c = LineClient::connect(k.addr, "after");
    c.request(7, 10, 0);
}

/// 500 short connections against hf-testsvc, each closed by the client
/// after one answer; then the keeper holds nothing.
#[test]
fn many_short_client_closed_connections_leave_nothing() {
    let mut k = keeper(&[], &[]);
    let addr = k.addr;
    let worker = k.active_pid();
    // Baselines, after one connection has come and gone.
    LineClient::connect(addr, "warm-up").request(9999, 1, 0);
    released(&mut k, "the warm-up connection released");
    let (keeper_fds, worker_fds) = (fds(k.pid()), fds(worker));
    let threads: Vec<_> = (0..5u64)
        .map(|t| {
            std::thread::spawn(move || {
                for i in 0..100u64 {
                    let id = t * 1000 + i;
                    let mut c = LineClient::connect(addr, format!("short {id}"));
                    c.request(id, (id % 300) as usize, 0);
                    if i % 10 == 9 {
                        reset(c.into_stream());
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("client thread");
    }
    let s = released(&mut k, "500 client-closed connections released");
    assert_eq!(s.accepted, 501);
    // Not only the count: no descriptor stays open in the keeper or the
    // worker (one may be a status query in progress).
    hf_tests::eventually(
        Duration::from_secs(10),
        "the keeper's and the worker's fds back to their baselines",
        || (fds(k.pid()) <= keeper_fds + 1 && fds(worker) <= worker_fds).then_some(()),
    );
    // The journal slots of those 500 are reused: connections on them
    // recover like any other.
    let mut cs: Vec<LineClient> = (0..20u64)
        .map(|i| {
            let mut c = LineClient::connect(addr, format!("reuse {i}"));
            c.send(&format!("REQ {i} 3000 1000\n"));
            c.expect(&answer(i, 3000, 0)[..half(i, 3000)], "first half");
            c
        })
        .collect();
    k.kill_and_wait();
    for (i, c) in cs.iter_mut().enumerate() {
        c.expect(
            &answer(i as u64, 3000, 0)[half(i as u64, 3000)..],
            "rest after the kill",
        );
    }
    drop(cs);
    released(&mut k, "the 20 recovered connections released");
}

/// 500 HTTP requests with `Connection: close` against hf-httpd: the server
/// closes each (the client sees EOF after the answer), and the keeper holds
/// nothing afterwards.
#[test]
fn many_connection_close_requests_leave_nothing() {
    let dir = TempDir::new("leak-httpd");
    let files = make_site(dir.path(), &[10, 3000]);
    let httpd = bin("hf-httpd").display().to_string();
    let root = dir.path().display().to_string();
    let mut k = Keeper::start(&[], &[&httpd, "--root", &root]);
    let addr = k.addr;
    let threads: Vec<_> = (0..5usize)
        .map(|t| {
            let files = files.clone();
            std::thread::spawn(move || {
                for i in 0..100usize {
                    let (path, want) = &files[(t + i) % files.len()];
                    let mut c = Client::connect(addr).unwrap();
                    c.send(
                        format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                            .as_bytes(),
                    )
                    .unwrap();
                    let r = c
                        .read_response(false)
                        .unwrap_or_else(|e| panic!("request {t}/{i}: {e}"));
                    assert_eq!(r.status, 200);
                    assert!(r.body == *want);
                    // The server ends the connection: a clean EOF.
                    let mut rest = Vec::new();
                    let n = c
                        .stream()
                        .read_to_end(&mut rest)
                        .unwrap_or_else(|e| panic!("request {t}/{i}: {e} instead of EOF"));
                    assert_eq!(n, 0, "bytes after a Connection: close answer");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("client thread");
    }
    let s = released(&mut k, "500 Connection: close connections released");
    assert_eq!(s.accepted, 500);
    // And after a kill with nothing held, still nothing.
    k.kill_and_wait();
    let mut c = Client::connect(addr).unwrap();
    c.stream()
        .write_all(b"GET /f0-10.bin HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    assert_eq!(c.read_response(false).unwrap().body, files[0].1);
    drop(c);
    released(&mut k, "the last connection released");
}

/// `--max-conns 2` and 60 connections one after another (some closed by the
/// client, some by the server, some reset): each frees its slot, so every
/// one is served.
#[test]
fn max_conns_slots_are_reused() {
    let mut k = keeper(&["--max-conns", "2"], &[]);
    for i in 0..60u64 {
        let mut c = LineClient::connect(k.addr, format!("conn {i}"));
        c.request(i, 10, 0);
        match i % 3 {
            0 => drop(c),
            1 => reset(c.into_stream()),
            _ => {
                // Keep one open across the next connection.
                let mut d = LineClient::connect(k.addr, format!("conn {i}b"));
                d.request(1000 + i, 10, 0);
            }
        }
    }
    released(&mut k, "all released");
}

/// Issue 15, item 8a. Clients that reset their connections (SO_LINGER 0)
/// while their worker is down — one in the middle of an answer, one idle
/// after a complete answer, one waiting for an answer not yet started — are
/// dropped quietly by the worker that takes over: a reset is not a FIN, so
/// no warning about stream positions that do not match, and the keeper
/// releases all three.
#[test]
fn clients_that_reset_during_a_recovery_are_dropped_quietly() {
    let mut k = keeper(&[], &[]);
    let mut mid = LineClient::connect(k.addr, "mid-answer");
    mid.send("REQ 1 20000 300\n");
    mid.expect(&answer(1, 20_000, 0)[..half(1, 20_000)], "first half");
    let mut idle = LineClient::connect(k.addr, "idle");
    idle.request(2, 100, 0);
    let mut waiting = LineClient::connect(k.addr, "waiting");
    waiting.send("REQ 3 100 2000\n");
    k.wait_for("all three held", |s| s.connections == 3);
    // Stopped, the worker cannot notice the resets: the one that takes
    // over finds them.
    let pid = k.active_pid();
    let stop = rustix::process::Pid::from_raw(pid as i32).expect("pid");
    rustix::process::kill_process(stop, rustix::process::Signal::STOP).expect("SIGSTOP");
    for c in [mid, idle, waiting] {
        reset(c.into_stream());
    }
    std::thread::sleep(Duration::from_millis(50));
    hf_tests::kill9(pid);
    k.wait_for("a new active worker", |s| {
        s.workers
            .iter()
            .any(|w| w.role == hf_tests::Role::Active && w.pid != pid)
    });
    released(&mut k, "the reset connections released");
    let log = k.log();
    assert!(
        !log.lines()
            .any(|l| l.contains("WARN") && l.contains("cannot resume connection")),
        "a reset connection was taken for a damaged one; log:\n{log}"
    );
    let mut c = LineClient::connect(k.addr, "after");
    c.request(4, 10, 0);
}
