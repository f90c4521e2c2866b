//! `holdfast run --metrics ADDR`: Prometheus text at `/metrics`, scraped
//! across a kill and an upgrade.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use hf_tests::testsvc::{keeper, LineClient};

fn scrape(port: u16, path: &str) -> (String, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: m\r\n\r\n").as_bytes())
        .unwrap();
    let mut got = String::new();
    s.read_to_string(&mut got).unwrap();
    let (head, body) = got.split_once("\r\n\r\n").expect("a response");
    (head.to_owned(), body.to_owned())
}

/// The value of the sample named exactly `name` (with its labels).
fn value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn metrics_follow_kills_and_upgrades() {
    // Port 0: a port picked beforehand could be taken meanwhile by the
    // keeper's own listener (also port 0). The keeper logs the address.
    let mut k = keeper(&["--metrics", "127.0.0.1:0"], &[]);
    let port: u16 = hf_tests::eventually(Duration::from_secs(5), "the metrics address", || {
        let log = k.log();
        let line = log.lines().find(|l| l.contains("metrics at /metrics"))?;
        line.rsplit(':').next()?.trim().parse().ok()
    });
    let (head, text) = scrape(port, "/metrics");
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(head.contains("application/openmetrics-text"), "{head}");
    assert_eq!(value(&text, "holdfast_generation"), Some(1.0), "{text}");
    assert!(text.contains("holdfast_build_info{version=\""), "{text}");
    assert!(text.trim_end().ends_with("# EOF"), "{text}");

    let mut c = LineClient::connect(k.addr, "scraped");
    c.request(1, 100, 0);
    k.kill_and_wait();
    c.request(2, 100, 0);
    let (_, text) = scrape(port, "/metrics");
    assert_eq!(
        value(&text, "holdfast_worker_restarts_total{reason=\"killed\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value(&text, "holdfast_recovery_duration_seconds_count"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value(&text, "holdfast_connections_recovered_total"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value(&text, "holdfast_connections_held"),
        Some(1.0),
        "{text}"
    );

    let (code, out, err) = k.upgrade(&[], &[]);
    assert_eq!(code, 0, "{out}{err}");
    c.request(3, 100, 0);
    let (_, text) = scrape(port, "/metrics");
    assert_eq!(
        value(&text, "holdfast_upgrades_total{result=\"success\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(value(&text, "holdfast_generation"), Some(2.0), "{text}");

    let (head, _) = scrape(port, "/other");
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
}
