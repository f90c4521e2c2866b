//! Rejuvenation: workers replaced for their memory or their age through
//! the upgrade path, while a client keeps using the same connection.

use std::time::Duration;

use hf_tests::testsvc::{self, LineClient};
use hf_tests::Role;

fn resident_mib(pid: u32) -> u64 {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    (pages * rustix::param::page_size() as u64) >> 20
}

/// A worker whose memory grows without bound is replaced by a fresh one
/// once it passes `--max-rss`; the connection that made it grow never
/// notices, and every answer is checked.
#[test]
fn leaking_worker_is_replaced_before_it_grows_far() {
    let mut k = testsvc::keeper(&["--max-rss", "48"], &["--tokio"]);
    let first = k.active_pid();
    let mut c = LineClient::connect(k.addr, "leaker");
    let mut i = 0;
    let mut peak = 0;
    while k.status().unwrap().rejuvenations == 0 {
        assert!(
            i < 200,
            "no rejuvenation after {i} MiB leaked:\n{}",
            k.log()
        );
        c.send(&format!("LEAK {i} 4\n"));
        c.expect(format!("LEAKED {i} 4\n").as_bytes(), "leak answer");
        c.request(i, 1000, 0);
        peak = peak.max(resident_mib(first));
        std::thread::sleep(Duration::from_millis(20));
        i += 1;
    }
    let st = k.wait_for("a fresh active worker", |s| {
        s.workers
            .iter()
            .any(|w| w.role == Role::Active && w.pid != first && w.generation == 2)
            && s.generations == [2]
    });
    assert!(peak < 48 + 64, "grew to {peak} MiB before it was replaced");
    let fresh = st
        .workers
        .iter()
        .find(|w| w.role == Role::Active)
        .unwrap()
        .pid;
    assert!(resident_mib(fresh) < 48);
    for j in 0..20 {
        c.request(1000 + j, 5000, 0);
    }
    assert_eq!(st.restarts, 0);
}

/// `--max-uptime`: workers are replaced on schedule, with nothing lost.
#[test]
fn workers_are_replaced_after_their_uptime() {
    let k = testsvc::keeper(&["--max-uptime", "1"], &[]);
    let mut c = LineClient::connect(k.addr, "steady");
    let mut i = 0;
    while k.status().unwrap().rejuvenations < 2 {
        assert!(i < 2000, "fewer than 2 rejuvenations after {i} requests");
        c.request(i, 2000, 0);
        std::thread::sleep(Duration::from_millis(2));
        i += 1;
    }
    c.request(i, 2000, 0);
    let st = k.status().unwrap();
    assert!(st.generation >= 2 && st.restarts == 0, "{st:?}");
}

/// `--max-requests`: a worker is replaced after that many committed
/// requests, on the tokio and the blocking flavour, while one client keeps
/// using the same connection; every answer is checked.
#[test]
fn workers_are_replaced_after_their_request_count() {
    for flavour in [&["--tokio"][..], &[][..]] {
        let k = testsvc::keeper(&["--max-requests", "20"], flavour);
        let mut c = LineClient::connect(k.addr, "counted");
        let mut i = 0;
        while k.status().unwrap().rejuvenations < 2 {
            assert!(i < 5000, "fewer than 2 rejuvenations after {i} requests");
            c.request(i, 500, 0);
            i += 1;
        }
        c.request(i, 500, 0);
        let st = k.status().unwrap();
        assert!(st.generation >= 2 && st.restarts == 0, "{st:?}");
        assert!(i >= 40, "replaced after {i} requests, before 2 × 20");
    }
}
