//! Hangs: a worker whose event loop stops (its heartbeat with it) is killed
//! after `--hang-timeout` and recovered like a crash.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use hf_tests::testsvc::{answer, half, keeper};

fn first_half(k: &hf_tests::Keeper, verb: &str, id: u64, len: usize) -> (TcpStream, Vec<u8>) {
    let mut s = TcpStream::connect(k.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(format!("{verb} {id} {len}\n").as_bytes())
        .unwrap();
    let mut got = vec![0u8; half(id, len)];
    s.read_exact(&mut got).unwrap();
    (s, got)
}

fn rest(s: &mut TcpStream, mut got: Vec<u8>, id: u64, len: usize) -> Vec<u8> {
    let want = answer(id, len, 0);
    let at = got.len();
    got.resize(want.len(), 0);
    s.read_exact(&mut got[at..])
        .expect("the rest of the answer");
    got
}

#[test]
fn hung_worker_is_replaced_and_its_request_completes() {
    let mut k = keeper(&["--hang-timeout", "300"], &["--tokio"]);
    let (mut a, got) = first_half(&k, "STALL", 1, 500);
    let t0 = Instant::now();
    // The runtime is blocked: the keeper notices the silent heartbeat.
    let s = k.wait_for("the hung worker replaced", |s| s.restarts == 1);
    let got = rest(&mut a, got, 1, 500);
    assert!(got == answer(1, 500, 0), "answer differs");
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(250),
        "killed before the timeout: {waited:?}"
    );
    assert!(
        s.last_exits
            .iter()
            .any(|e| e.contains("hung (no heartbeat for")),
        "{:?}",
        s.last_exits
    );
    // The connection goes on with the new worker.
    a.write_all(b"REQ 2 100 0\n").unwrap();
    let mut more = vec![0u8; answer(2, 100, 0).len()];
    a.read_exact(&mut more).unwrap();
    assert!(more == answer(2, 100, 0));
}

#[test]
fn idle_and_busy_workers_are_not_taken_for_hung() {
    let k = keeper(&["--hang-timeout", "200"], &["--tokio"]);
    let mut c = TcpStream::connect(k.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    // Idle for many timeouts, then requests that sleep (in their task only)
    // for longer than the timeout: the runtime keeps beating.
    std::thread::sleep(Duration::from_millis(1000));
    for id in 1..=3 {
        c.write_all(format!("REQ {id} 1000 400\n").as_bytes())
            .unwrap();
        let mut got = vec![0u8; answer(id, 1000, 0).len()];
        c.read_exact(&mut got).unwrap();
        assert!(got == answer(id, 1000, 0));
    }
    let s = k.status().unwrap();
    assert_eq!(s.restarts, 0, "{:?}", s.last_exits);
}

/// The blocking flavour beats only when the service asks it to, so a
/// blocking service that never does is not watched: a long request is not
/// mistaken for a hang.
#[test]
fn blocking_workers_without_heartbeat_are_not_watched() {
    let mut k = keeper(&["--hang-timeout", "200"], &[]);
    let (mut a, got) = first_half(&k, "STALL", 1, 300);
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(k.status().unwrap().restarts, 0);
    k.kill_and_wait();
    let got = rest(&mut a, got, 1, 300);
    assert!(got == answer(1, 300, 0));
}

/// `--request-deadline`: one request stuck in its task (the runtime and its
/// heartbeat carry on) past the deadline gets the worker replaced; the
/// successor replays it and it completes. Idle keep-alive connections are
/// not requests in flight.
#[test]
fn request_past_its_deadline_gets_the_worker_replaced() {
    let mut k = keeper(
        &["--request-deadline", "300", "--hang-timeout", "200"],
        &["--tokio"],
    );
    // An idle connection, open for longer than the deadline.
    let mut idle = TcpStream::connect(k.addr).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let (mut a, got) = first_half(&k, "HOLD", 1, 400);
    let t0 = Instant::now();
    let s = k.wait_for("the worker replaced", |s| s.restarts == 1);
    let got = rest(&mut a, got, 1, 400);
    assert!(got == answer(1, 400, 0));
    assert!(
        t0.elapsed() >= Duration::from_millis(300),
        "replaced before the deadline"
    );
    assert!(
        s.last_exits.iter().any(|e| e.contains("hung")),
        "{:?}",
        s.last_exits
    );
    // The idle connection was not the problem and still works.
    idle.write_all(b"REQ 2 10 0\n").unwrap();
    let mut more = vec![0u8; answer(2, 10, 0).len()];
    idle.read_exact(&mut more).unwrap();
    assert!(more == answer(2, 10, 0));
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(
        k.status().unwrap().restarts,
        1,
        "no further kills once the request completed"
    );
}
