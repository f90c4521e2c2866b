//! Nothing is woken while idle: a keeper and its workers, with default
//! options and idle connections open, sleep until something happens — in
//! both library flavours — and an idle connection still notices a drain at
//! once.

use std::time::Duration;

use hf_tests::testsvc::{keeper, LineClient};
use hf_tests::Keeper;

/// Voluntary context switches of every thread of `pid` (each one a wake-up
/// after sleeping).
fn wakeups(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("status")).ok())
                .filter_map(|s| {
                    s.lines()
                        .find(|l| l.starts_with("voluntary_ctxt_switches:"))?
                        .split_whitespace()
                        .nth(1)?
                        .parse::<u64>()
                        .ok()
                })
                .sum()
        })
        .unwrap_or(0)
}

/// Wake-ups of the keeper and of each worker over `secs` of idleness.
fn idle_wakeups(k: &mut Keeper, secs: u64) -> Vec<(String, u64)> {
    let s = k.status().expect("status");
    let mut pids: Vec<(String, u32)> = vec![("keeper".into(), k.pid())];
    pids.extend(
        s.workers
            .iter()
            .map(|w| (format!("worker {} ({:?})", w.pid, w.role), w.pid)),
    );
    let before: Vec<u64> = pids.iter().map(|(_, p)| wakeups(*p)).collect();
    std::thread::sleep(Duration::from_secs(secs));
    pids.iter()
        .zip(before)
        .map(|((name, p), b)| (name.clone(), wakeups(*p) - b))
        .collect()
}

fn check_quiet(svc_args: &[&str]) {
    let mut k = keeper(&[], svc_args);
    // Three connections, each answered once, then left open and idle.
    let mut clients: Vec<LineClient> = (0..3)
        .map(|i| LineClient::connect(k.addr, format!("c{i}")))
        .collect();
    for (i, c) in clients.iter_mut().enumerate() {
        c.request(i as u64, 100, 0);
    }
    // Let the first idle read's timeout pass (the blocking flavour waits
    // 100 ms on the socket before it waits without a timer).
    std::thread::sleep(Duration::from_millis(400));
    let woken = idle_wakeups(&mut k, 2);
    for (who, n) in &woken {
        assert!(
            *n <= 2,
            "{who} woke {n} times in 2 s of idleness ({svc_args:?}): {woken:?}"
        );
    }
    // An idle connection still goes to a new version at once.
    let exe = hf_tests::bin("hf-testsvc").display().to_string();
    let mut cmd = vec![exe.as_str()];
    cmd.extend_from_slice(svc_args);
    let t = std::time::Instant::now();
    let (code, out, err) = k.upgrade(&["--settle", "0"], &cmd);
    assert_eq!(code, 0, "{out} {err}");
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "the upgrade took {:?}",
        t.elapsed()
    );
    for (i, c) in clients.iter_mut().enumerate() {
        c.request(10 + i as u64, 100, 0);
    }
}

#[test]
fn blocking_flavour_sleeps_while_idle() {
    check_quiet(&[]);
}

#[test]
fn tokio_flavour_sleeps_while_idle() {
    check_quiet(&["--tokio"]);
}
