//! What a worker starts goes with it when the keeper stops it: each worker
//! runs in a process group of its own, and the keeper signals the group.

use std::path::Path;
use std::time::Duration;

use hf_tests::{bin, eventually, Keeper, TempDir};

/// A `sh -c` snippet that starts `sleep 30` in the background, deaf to
/// SIGTERM, and writes its pid to `pidfile` — a stand-in for whatever a
/// worker's command starts besides the service itself.
fn with_sleeper(pidfile: &Path, then: &str) -> String {
    format!(
        "(trap '' TERM; exec sleep 30) & echo $! > {}; {then}",
        pidfile.display()
    )
}

/// The pid written to `pidfile`, once it is there.
fn sleeper(pidfile: &Path) -> u32 {
    eventually(Duration::from_secs(10), "the sleeper's pid", || {
        std::fs::read_to_string(pidfile).ok()?.trim().parse().ok()
    })
}

/// True while process `pid` runs `sleep` (not exited, not a zombie).
fn sleeping(pid: u32) -> bool {
    let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat.rsplit(") ").next().and_then(|s| s.chars().next());
    cmd.starts_with(b"sleep") && !matches!(state, None | Some('Z') | Some('X'))
}

/// Issue 15, item 8c. An upgrade candidate started through `sh -c` that
/// never becomes ready is rolled back: the keeper kills its process group,
/// so the child the shell started dies too instead of living on orphaned.
#[test]
fn a_rolled_back_candidate_leaves_no_orphan() {
    let dir = TempDir::new("pgroup-candidate");
    let pidfile = dir.path().join("sleeper.pid");
    let k = Keeper::start(&[], &[bin("hf-testsvc").to_str().unwrap()]);
    let script = with_sleeper(&pidfile, "wait");
    let (code, out, err) = k.upgrade(&["--ready-timeout", "1000"], &["sh", "-c", &script]);
    assert_ne!(code, 0, "the candidate cannot have been ready: {out}{err}");
    let pid = sleeper(&pidfile);
    eventually(
        Duration::from_secs(5),
        "the candidate's child gone with it",
        || (!sleeping(pid)).then_some(()),
    );
}

/// Issue 15, item 8c. Stopping the keeper stops what its workers started:
/// the worker's command forks a child (one that ignores SIGTERM) and then
/// execs the service; after a SIGTERM to the keeper, that child is gone
/// too. (Workers have process
/// groups of their own, so Ctrl-C at a terminal reaches only the keeper,
/// which stops them like this.)
#[test]
fn stopping_the_keeper_leaves_no_orphan() {
    let dir = TempDir::new("pgroup-stop");
    let pidfile = dir.path().join("sleeper.pid");
    let script = with_sleeper(&pidfile, "exec \"$0\" \"$@\"");
    let testsvc = bin("hf-testsvc");
    let k = Keeper::start(
        &["--standby", "0"],
        &["sh", "-c", &script, testsvc.to_str().unwrap()],
    );
    let pid = sleeper(&pidfile);
    assert!(sleeping(pid));
    k.stop();
    eventually(
        Duration::from_secs(5),
        "the worker's child gone with the keeper",
        || (!sleeping(pid)).then_some(()),
    );
}
