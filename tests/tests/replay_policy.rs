//! The replay policy of non-idempotent requests: a request that declared it
//! must not run twice is not run again by the next worker after a crash; it
//! is answered with the service's error or the connection is closed
//! cleanly, and its side effect happened exactly once.

use std::io::Read;
use std::time::Duration;

use hf_tests::testsvc::{answer, keeper, LineClient};
use hf_tests::{eventually, TempDir};

fn ledger(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn policy_holds(flavour: &[&str]) {
    let tmp = TempDir::new("replay-policy");
    let file = tmp.path().join("ledger");
    let mut svc = vec!["--ledger", file.to_str().unwrap()];
    svc.extend_from_slice(flavour);
    let mut k = keeper(&[], &svc);

    // Error: the next worker answers with the service's error, and the
    // connection goes on; the policy ends at the commit.
    let mut c = LineClient::connect(k.addr, "error");
    c.send("ONCE e1 error hold\n");
    eventually(Duration::from_secs(10), "the side effect", || {
        (ledger(&file) == ["e1"]).then_some(())
    });
    k.kill_and_wait();
    assert_eq!(c.read_n(16).unwrap(), b"ERR NOREPLAY e1\n");
    c.send("ONCE e2 error done\n");
    assert_eq!(c.read_n(8).unwrap(), b"DONE e2\n");
    // A plain request after it replays as usual across a kill.
    c.send("HOLD 7 20000\n");
    let want = answer(7, 20_000, 0);
    let head = c.read_n(want.len() / 2).unwrap();
    k.kill_and_wait();
    let tail = c.read_n(want.len() - head.len()).unwrap();
    assert_eq!([head, tail].concat(), want);
    assert_eq!(ledger(&file), ["e1", "e2"]);

    // Close: the next worker closes the connection cleanly (EOF, no reset).
    let mut c = LineClient::connect(k.addr, "close");
    c.send("ONCE c1 close hold\n");
    eventually(Duration::from_secs(10), "the side effect", || {
        (ledger(&file).len() == 3).then_some(())
    });
    k.kill_and_wait();
    let mut rest = Vec::new();
    match c.stream().read_to_end(&mut rest) {
        Ok(_) => assert!(rest.is_empty(), "{rest:?}"),
        Err(e) => panic!("{e} ({:?}) instead of a clean close", e.kind()),
    }
    assert_eq!(ledger(&file), ["e1", "e2", "c1"]);
    assert_eq!(k.status().unwrap().restarts, 3);
    // Not counted as poison: nothing crashed by itself.
    assert_eq!(k.status().unwrap().poisoned, 0);
}

#[test]
fn non_idempotent_requests_never_run_twice() {
    policy_holds(&[]);
}

#[test]
fn non_idempotent_requests_never_run_twice_tokio() {
    policy_holds(&["--tokio"]);
}
