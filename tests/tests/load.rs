//! hf-load against hf-httpd under the keeper, the active worker SIGKILLed
//! every 300 ms: not one failed request, keep-alive or connection per
//! request.

use std::time::Duration;

use hf_tests::http::make_site;
use hf_tests::{bin, Keeper, TempDir};

const SIZES: [usize; 9] = [0, 1, 100, 1000, 4096, 20_000, 65_536, 300_000, 1_000_000];

/// Runs hf-load (16 connections, 3 s, a kill every 300 ms) against a fresh
/// keeper and checks the report.
fn load_under_kills(close: bool) {
    let dir = TempDir::new("load");
    make_site(dir.path(), &SIZES);
    let httpd = bin("hf-httpd").display().to_string();
    let root = dir.path().display().to_string();
    let mut k = Keeper::start(&[], &[&httpd, "--root", &root]);
    let files = hf_load::FileSet::from_site(dir.path()).expect("site");
    assert_eq!(files.files.len(), SIZES.len());
    let mut cfg = hf_load::Config::new(k.addr, files);
    cfg.conns = 16;
    cfg.duration = Duration::from_secs(3);
    cfg.close = close;
    cfg.kill_every = Some(Duration::from_millis(300));
    cfg.control = Some(k.control.clone());
    let r = hf_load::run(&cfg).expect("hf-load setup");
    eprintln!("{}", r.text());
    assert_eq!(
        r.failed,
        0,
        "requests failed:\n{}\nkeeper log:\n{}",
        r.text(),
        k.log()
    );
    assert!(r.kills >= 5, "only {} kills:\n{}", r.kills, r.text());
    assert!(
        r.ok >= 200,
        "only {} requests completed:\n{}",
        r.ok,
        r.text()
    );
    if close {
        assert_eq!(r.connections_opened, r.ok, "one connection per request");
    } else {
        assert_eq!(
            r.connections_opened, 16,
            "keep-alive connections survive the kills"
        );
    }
    // The last kill may still be on its way through the keeper.
    let kills = r.kills;
    k.wait_for("every kill counted as a restart", |s| s.restarts >= kills);
}

/// Keep-alive: the 16 connections must outlive every kill.
#[test]
fn keepalive_load_survives_a_kill_every_300ms() {
    load_under_kills(false);
}

/// `Connection: close` on every request: the response must arrive whole
/// and then the connection must close cleanly (FIN), even when the worker
/// dies between its last write and its close.
#[test]
fn connection_per_request_load_survives_a_kill_every_300ms() {
    load_under_kills(true);
}
