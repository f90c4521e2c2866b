//! Stopping the keeper (`kill -TERM`, `systemctl stop`): requests in flight
//! finish, idle connections get a FIN (never a reset), new connections are
//! refused, and the keeper exits 0. A second SIGTERM, a SIGINT or the stop
//! timeout closes everything at once, still with a FIN.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hf_tests::http::{make_site, parse_all, Client};
use hf_tests::testsvc::{self, answer, LineClient};
use hf_tests::{
    bin, connect_small_rcvbuf, eventually, interrupt, paced_read_to_end, term, Keeper, Phase,
    TempDir,
};

/// The download in flight when the keeper is told to stop (the size from the
/// issue that found the cut-off).
const BIG: usize = 40 << 20;

fn httpd(root: &Path) -> Vec<String> {
    vec![
        bin("hf-httpd").display().to_string(),
        "--root".into(),
        root.display().to_string(),
    ]
}

fn s(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Keep-alive connections that were served once and now wait, idle, for
/// their next request.
fn idle_clients(addr: SocketAddr, n: usize, (path, body): &(String, Vec<u8>)) -> Vec<Client> {
    (0..n)
        .map(|i| {
            let mut c = Client::connect(addr).unwrap();
            let r = c
                .get(path)
                .unwrap_or_else(|e| panic!("idle client {i}: {e}"));
            assert_eq!(&r.body, body, "idle client {i}");
            c
        })
        .collect()
}

/// An idle connection of a stopping keeper must end with a FIN: the next
/// read returns `Ok(0)`, not a reset and not a timeout.
fn expect_fin(s: &mut TcpStream, what: &str) {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 256];
    match s.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!(
            "{what}: {n} unexpected bytes instead of a FIN: {:?}",
            String::from_utf8_lossy(&buf[..n])
        ),
        Err(e) => panic!("{what}: {e} ({:?}) instead of a FIN", e.kind()),
    }
}

/// A keep-alive download read at `rate` bytes a second on a small receive
/// window, so that it is genuinely in flight for seconds.
struct Download {
    progress: Arc<AtomicUsize>,
    reader: JoinHandle<Result<Vec<u8>, String>>,
}

impl Download {
    fn start(addr: SocketAddr, path: &str, rate: f64) -> Download {
        let mut sock = connect_small_rcvbuf(addr, 64 * 1024).unwrap();
        sock.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
            .unwrap();
        let progress = Arc::new(AtomicUsize::new(0));
        let reader = {
            let progress = progress.clone();
            std::thread::spawn(move || paced_read_to_end(sock, rate, progress))
        };
        let d = Download { progress, reader };
        eventually(Duration::from_secs(10), "the download under way", || {
            (d.got() > 1 << 20).then_some(())
        });
        d
    }

    fn got(&self) -> usize {
        self.progress.load(Ordering::Relaxed)
    }

    /// Everything the client received, up to the server's FIN.
    fn finish(self, k: &Keeper) -> Vec<u8> {
        self.reader
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("download: {e}; keeper log:\n{}", k.log()))
    }
}

/// `kill -TERM`: the 40 MiB download in flight completes byte for byte, a
/// request half received is answered, idle keep-alive connections get a FIN
/// at once (not after the download), new connections are refused, and the
/// keeper exits 0 once the last connection is done.
#[test]
fn sigterm_finishes_requests_in_flight_and_closes_idle_connections_with_a_fin() {
    let dir = TempDir::new("stop-graceful");
    let files = make_site(dir.path(), &[BIG, 300]);
    let mut k = Keeper::start(&[], &s(&httpd(dir.path())));
    let mut idle = idle_clients(k.addr, 4, &files[1]);
    // Half a request: in flight from the server's point of view.
    let mut half = Client::connect(k.addr).unwrap();
    half.send(format!("GET {} HTTP/1.1\r\nHost: t\r\n", files[1].0).as_bytes())
        .unwrap();
    let dl = Download::start(k.addr, &files[0].0, 8.0 * 1024.0 * 1024.0);

    term(k.pid());
    for (i, c) in idle.iter_mut().enumerate() {
        expect_fin(c.stream(), &format!("idle connection {i}"));
    }
    assert!(
        dl.got() < BIG,
        "the idle connections were closed only after the download ended"
    );
    eventually(Duration::from_secs(5), "new connections refused", || {
        TcpStream::connect(k.addr).is_err().then_some(())
    });
    let st = k
        .status()
        .unwrap_or_else(|e| panic!("no status while stopping: {e}; log:\n{}", k.log()));
    assert_eq!(st.phase, Phase::ShuttingDown);
    let (code, out, err) = k.upgrade(&["--json"], &[]);
    assert_eq!(code, 1, "an upgrade while stopping: {out}{err}");
    assert!(out.contains("shutting down"), "{out}{err}");

    half.send(b"\r\n").unwrap();
    let r = half
        .read_response(false)
        .unwrap_or_else(|e| panic!("the request in flight: {e}; log:\n{}", k.log()));
    assert_eq!((r.status, &r.body), (200, &files[1].1));
    expect_fin(
        half.stream(),
        "the connection once its request was answered",
    );

    let raw = dl.finish(&k);
    let r = parse_all(&raw, &[false]).unwrap_or_else(|e| panic!("download: {e}"));
    assert_eq!(r[0].status, 200);
    assert!(r[0].body == files[0].1, "the download's body differs");
    let st = k.exit_within(Duration::from_secs(10));
    assert!(st.success(), "keeper exit status {st}; log:\n{}", k.log());
}

/// The blocking flavour (hf-testsvc) too: an idle connection gets a FIN, a
/// request whose answer is half written completes, and the keeper exits 0.
#[test]
fn sigterm_lets_a_blocking_service_finish_its_answer() {
    let mut k = testsvc::keeper(&[], &[]);
    let mut idle = LineClient::connect(k.addr, "idle");
    idle.request(1, 100, 0);
    let mut busy = LineClient::connect(k.addr, "busy");
    // Half the answer, then a pause of 1.5 s, then the rest.
    busy.send("REQ 2 200000 1500\n");
    let want = answer(2, 200_000, 0);
    let first = busy.read_n(1000).unwrap();
    term(k.pid());
    idle.expect_eof(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", k.log()));
    let rest = busy
        .read_n(want.len() - first.len())
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", k.log()));
    assert!([first, rest].concat() == want, "the answer differs");
    busy.expect_eof(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", k.log()));
    let st = k.exit_within(Duration::from_secs(10));
    assert!(st.success(), "keeper exit status {st}; log:\n{}", k.log());
}

/// A second SIGTERM while a download is still running, or a SIGINT (Ctrl-C)
/// at any time: the keeper closes everything at once — the download is cut,
/// but with a FIN after the bytes already sent, never a reset — and exits 0.
#[test]
fn a_second_sigterm_or_a_sigint_closes_everything_at_once_and_cleanly() {
    let dir = TempDir::new("stop-now");
    let files = make_site(dir.path(), &[BIG, 300]);
    for how in ["SIGTERM twice", "SIGINT"] {
        let mut k = Keeper::start(&[], &s(&httpd(dir.path())));
        let mut idle = idle_clients(k.addr, 2, &files[1]);
        let dl = Download::start(k.addr, &files[0].0, 2.0 * 1024.0 * 1024.0);
        if how == "SIGINT" {
            interrupt(k.pid());
        } else {
            term(k.pid());
            for (i, c) in idle.iter_mut().enumerate() {
                expect_fin(c.stream(), &format!("{how}: idle connection {i}"));
            }
            // Still stopping: the download runs.
            std::thread::sleep(Duration::from_millis(300));
            assert!(
                k.running(),
                "{how}: the keeper did not wait for the download"
            );
            term(k.pid());
        }
        let t0 = Instant::now();
        let st = k.exit_within(Duration::from_secs(10));
        let took = t0.elapsed();
        assert!(
            st.success(),
            "{how}: keeper exit status {st}; log:\n{}",
            k.log()
        );
        assert!(
            took < Duration::from_secs(5),
            "{how}: the keeper took {took:?} to stop"
        );
        for (i, c) in idle.iter_mut().enumerate() {
            expect_fin(c.stream(), &format!("{how}: idle connection {i}"));
        }
        let raw = dl.finish(&k);
        assert!(
            raw.len() < BIG,
            "{how}: the download was not cut ({} bytes)",
            raw.len()
        );
    }
}

/// `--stop-timeout`: a download that would take much longer is cut cleanly
/// (FIN) when the stop timeout expires, and the keeper exits 0.
#[test]
fn stop_timeout_closes_what_is_still_busy_cleanly() {
    let dir = TempDir::new("stop-timeout");
    let files = make_site(dir.path(), &[BIG]);
    let mut k = Keeper::start(&["--stop-timeout", "1000"], &s(&httpd(dir.path())));
    let dl = Download::start(k.addr, &files[0].0, 2.0 * 1024.0 * 1024.0);
    let t0 = Instant::now();
    term(k.pid());
    let st = k.exit_within(Duration::from_secs(10));
    let took = t0.elapsed();
    assert!(st.success(), "keeper exit status {st}; log:\n{}", k.log());
    assert!(
        took >= Duration::from_millis(900),
        "the keeper did not wait for the stop timeout ({took:?})"
    );
    let raw = dl.finish(&k);
    assert!(raw.len() < BIG, "the download was not cut");
    assert!(k.log().contains("stop timeout"), "log:\n{}", k.log());
}
