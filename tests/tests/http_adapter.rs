//! hf-chat (axum on `holdfast-http`) under the keeper: workers SIGKILLed
//! and upgraded while keep-alive, pipelined, connection-per-request and
//! curl clients check every byte.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hf_tests::http::{Client, Response};
use hf_tests::{bin, connect_small_rcvbuf, run_cmd, Keeper, TempDir};

/// Length of hf-chat's `/big`.
const BIG_LEN: usize = 2 * 1024 * 1024;

fn chat() -> Keeper {
    let exe = bin("hf-chat").display().to_string();
    Keeper::start(&[], &[&exe])
}

fn big_body() -> Vec<u8> {
    (0..BIG_LEN).map(|i| (i % 251) as u8).collect()
}

/// A body that differs per client and request, so a reply to the wrong
/// request cannot pass.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// One request of the mix the clients send, with the answer it must get.
enum Req {
    Hello(u64),
    Big,
    Echo(Vec<u8>),
}

impl Req {
    /// The `i`-th request of client `c`, cycling through the mix;
    /// `echo_len` sizes the echo bodies.
    fn nth(c: u64, i: u64, echo_len: usize) -> Req {
        match i % 4 {
            0 | 2 => Req::Hello(c * 1_000_000 + i),
            1 => Req::Echo(pattern(c * 1_000_000 + i, echo_len)),
            _ => Req::Big,
        }
    }

    fn raw(&self, close: bool) -> Vec<u8> {
        let connection = if close { "Connection: close\r\n" } else { "" };
        match self {
            Req::Hello(n) => {
                format!("GET /hello?n={n} HTTP/1.1\r\nHost: t\r\n{connection}\r\n").into_bytes()
            }
            Req::Big => format!("GET /big HTTP/1.1\r\nHost: t\r\n{connection}\r\n").into_bytes(),
            Req::Echo(body) => {
                let mut r = format!(
                    "POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n{connection}\r\n",
                    body.len()
                )
                .into_bytes();
                r.extend_from_slice(body);
                r
            }
        }
    }

    fn check(&self, r: &Response, big: &[u8]) -> Result<(), String> {
        let want: &[u8] = match self {
            Req::Hello(n) => &format!("hello {n}\n").into_bytes(),
            Req::Big => big,
            Req::Echo(body) => body,
        };
        // Owned copy for the `Hello` case's temporary.
        let want = want.to_vec();
        if r.status != 200 || r.body != want {
            return Err(format!(
                "status {} body of {} bytes, want 200 and {} bytes",
                r.status,
                r.body.len(),
                want.len()
            ));
        }
        if r.header("date").is_none() {
            return Err("no Date header".into());
        }
        Ok(())
    }
}

/// How a client talks to the server.
#[derive(Clone, Copy, Debug)]
enum Style {
    /// One request at a time on one connection.
    KeepAlive,
    /// `depth` requests written at once, then their answers read.
    Pipelined(usize),
    /// A new connection per request, `Connection: close`.
    PerRequest,
}

/// Clients that check every answer until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    clients: Vec<JoinHandle<Result<u64, String>>>,
}

impl Load {
    fn start(addr: SocketAddr, styles: &[(Style, usize)]) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let big = Arc::new(big_body());
        let clients = styles
            .iter()
            .enumerate()
            .map(|(c, &(style, echo_len))| {
                let (stop, done, big) = (stop.clone(), done.clone(), big.clone());
                std::thread::spawn(move || {
                    run_client(addr, c as u64, style, echo_len, &stop, &done, &big)
                })
            })
            .collect();
        Load {
            stop,
            done,
            clients,
        }
    }

    /// Waits until `n` more answers were checked.
    fn progress(&self, n: u64) {
        let start = self.done.load(Ordering::Relaxed);
        hf_tests::eventually(Duration::from_secs(30), "clients progressing", || {
            (self.done.load(Ordering::Relaxed) >= start + n).then_some(())
        });
    }

    /// Stops the clients; every failure they saw, or the answers checked.
    fn finish(self) -> Result<u64, Vec<String>> {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = 0;
        let mut failures = Vec::new();
        for c in self.clients {
            match c.join().expect("client thread") {
                Ok(n) => total += n,
                Err(e) => failures.push(e),
            }
        }
        if failures.is_empty() {
            Ok(total)
        } else {
            Err(failures)
        }
    }
}

fn run_client(
    addr: SocketAddr,
    c: u64,
    style: Style,
    echo_len: usize,
    stop: &AtomicBool,
    done: &AtomicU64,
    big: &[u8],
) -> Result<u64, String> {
    let connect = || Client::connect(addr).map_err(|e| format!("client {c}: connect: {e}"));
    let mut cl = connect()?;
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let depth = match style {
            Style::Pipelined(d) => d,
            _ => 1,
        };
        let batch: Vec<Req> = (i..i + depth as u64)
            .map(|j| Req::nth(c, j, echo_len))
            .collect();
        let close = matches!(style, Style::PerRequest);
        if close {
            cl = connect()?;
        }
        let raw: Vec<u8> = batch.iter().flat_map(|r| r.raw(close)).collect();
        cl.send(&raw)
            .map_err(|e| format!("client {c} ({style:?}) request {i}: send: {e}"))?;
        for (k, req) in batch.iter().enumerate() {
            let n = i + k as u64;
            let r = cl
                .read_response(false)
                .map_err(|e| format!("client {c} ({style:?}) request {n}: {e}"))?;
            req.check(&r, big)
                .map_err(|e| format!("client {c} ({style:?}) request {n}: {e}"))?;
            done.fetch_add(1, Ordering::Relaxed);
        }
        if close {
            // The server ends the connection after the answer, cleanly.
            let mut rest = Vec::new();
            cl.stream()
                .read_to_end(&mut rest)
                .map_err(|e| format!("client {c} request {i}: after the answer: {e}"))?;
            if !rest.is_empty() {
                return Err(format!("client {c}: {} bytes after the answer", rest.len()));
            }
        }
        i += depth as u64;
    }
    Ok(i)
}

/// SIGKILLs the active worker every 100–200 ms for `secs` seconds.
fn kill_storm(k: &mut Keeper, secs: u64) -> u32 {
    let t0 = Instant::now();
    let mut kills = 0;
    let mut seed = 0x2545_F491_4F6C_DD1D_u64;
    while t0.elapsed() < Duration::from_secs(secs) {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(Duration::from_millis(100 + seed % 101));
        k.kill_active();
        kills += 1;
    }
    kills
}

/// Keep-alive, pipelined and connection-per-request clients, with `/big`
/// downloads and 1 MiB echo bodies among their requests, while the active
/// worker is killed every 100–200 ms for 5 s: not one failed request, reset,
/// lost or extra byte.
#[test]
fn kill_storm_under_keepalive_pipelined_and_per_request_clients() {
    let mut k = chat();
    let load = Load::start(
        k.addr,
        &[
            (Style::KeepAlive, 10_000),
            (Style::KeepAlive, 100_000),
            (Style::KeepAlive, 1 << 20),
            (Style::Pipelined(6), 3_000),
            (Style::Pipelined(8), 200_000),
            (Style::PerRequest, 5_000),
            (Style::PerRequest, 300_000),
        ],
    );
    load.progress(20);
    let kills = kill_storm(&mut k, 5);
    load.progress(20);
    let total = load
        .finish()
        .unwrap_or_else(|f| panic!("failures: {f:#?}\n{}", k.log()));
    let st = k.status().expect("status");
    eprintln!(
        "{total} requests checked, {kills} kills, {} connections recovered",
        st.recovered_connections
    );
    assert!(st.recovered_connections > 0, "no connection was recovered");
    assert_eq!(st.poisoned, 0, "a request was refused as poison");
}

/// A response cut by a crash is regenerated by the next worker in a later
/// second: its `Date` must be the recorded one, or the replay differs from
/// what the client already has and the connection is closed.
#[test]
fn response_replayed_in_a_later_second_keeps_its_recorded_date() {
    let mut k = chat();
    let big = big_body();
    // More answer bytes than any socket buffer holds, behind a small
    // window: the worker is still writing one of them when it is killed.
    const DOWNLOADS: usize = 6;
    for round in 0..3 {
        let mut s = connect_small_rcvbuf(k.addr, 4096).unwrap();
        let mut raw = b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n".repeat(DOWNLOADS - 1);
        raw.extend_from_slice(b"GET /big HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
        s.write_all(&raw).unwrap();
        let mut got = vec![0u8; 16 * 1024];
        s.read_exact(&mut got).unwrap();
        // The worker blocks on the full window within the answer it is
        // writing; the next one regenerates that answer a second later.
        std::thread::sleep(Duration::from_millis(1100));
        let recovered = k.status().unwrap().recovered_connections;
        k.kill_active();
        s.read_to_end(&mut got)
            .unwrap_or_else(|e| panic!("round {round}: {e}\n{}", k.log()));
        let r = hf_tests::http::parse_all(&got, &[false; DOWNLOADS])
            .unwrap_or_else(|e| panic!("round {round}: {e} ({} bytes)\n{}", got.len(), k.log()));
        for (i, r) in r.iter().enumerate() {
            assert_eq!(r.status, 200);
            assert!(r.body == big, "round {round}: body {i} differs");
        }
        assert!(
            k.status().unwrap().recovered_connections > recovered,
            "round {round}: the downloads were not in flight at the kill"
        );
    }
}

/// curl (keep-alive across URLs, a 1 MiB upload with `Expect:
/// 100-continue`) in a loop while workers are killed: every run succeeds
/// with the right bytes.
#[test]
fn curl_under_a_kill_storm() {
    let dir = TempDir::new("curl");
    let up = dir.path().join("up");
    std::fs::write(&up, pattern(7, 1 << 20)).unwrap();
    let mut k = chat();
    let addr = k.addr;
    let stop = Arc::new(AtomicBool::new(false));
    let runner = {
        let (stop, dir) = (stop.clone(), dir.path().to_owned());
        std::thread::spawn(move || -> Result<u32, String> {
            let big = big_body();
            let mut runs = 0;
            while !stop.load(Ordering::Relaxed) {
                let out = |n: &str| dir.join(n).display().to_string();
                let (code, _, err) = run_cmd(
                    std::process::Command::new("curl")
                        .args(["-sS", "--fail", "--max-time", "30"])
                        .arg(format!("http://{addr}/hello?n={runs}"))
                        .args(["-o", &out("hello")])
                        .arg(format!("http://{addr}/big"))
                        .args(["-o", &out("big"), "--next", "-sS", "--fail"])
                        .args(["-H", "Expect: 100-continue", "--data-binary"])
                        .arg(format!("@{}", up_path(&dir)))
                        .arg(format!("http://{addr}/echo"))
                        .args(["-o", &out("echo")]),
                );
                if code != 0 {
                    return Err(format!("curl run {runs}: exit {code}: {err}"));
                }
                let read = |n: &str| std::fs::read(dir.join(n)).unwrap_or_default();
                if read("hello") != format!("hello {runs}\n").into_bytes()
                    || read("big") != big
                    || read("echo") != read("up")
                {
                    return Err(format!("curl run {runs}: wrong bytes"));
                }
                runs += 1;
            }
            Ok(runs)
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    kill_storm(&mut k, 4);
    stop.store(true, Ordering::Relaxed);
    let runs = runner
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("{e}\n{}", k.log()));
    assert!(runs > 0, "curl never finished a run");
}

fn up_path(dir: &std::path::Path) -> String {
    dir.join("up").display().to_string()
}

/// `holdfast upgrade` three times under keep-alive and pipelined clients:
/// every connection moves to the new version at a request boundary, and no
/// request fails.
#[test]
fn upgrades_under_load_move_connections_at_request_boundaries() {
    let k = chat();
    let exe = bin("hf-chat").display().to_string();
    let load = Load::start(
        k.addr,
        &[
            (Style::KeepAlive, 10_000),
            (Style::KeepAlive, 100_000),
            (Style::Pipelined(6), 3_000),
            (Style::Pipelined(4), 200_000),
        ],
    );
    let (mut moved, mut total) = (0, 0);
    for i in 0..3 {
        load.progress(30);
        let (code, out, err) = k.upgrade(&["--settle", "50", "--json"], &[&exe]);
        assert_eq!(code, 0, "upgrade {i}: {out}{err}\n{}", k.log());
        let events: Vec<serde_json::Value> = out
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let event = |name: &str| {
            events
                .iter()
                .find(|v| v["event"] == name)
                .unwrap_or_else(|| panic!("upgrade {i}: no {name} event: {out}"))
        };
        let done = event("done");
        assert_eq!(done["recovered"], 0, "upgrade {i}: {out}");
        moved += done["moved"].as_u64().expect("moved");
        total += event("switched")["total"].as_u64().expect("total");
    }
    load.progress(30);
    let requests = load
        .finish()
        .unwrap_or_else(|f| panic!("failures: {f:#?}\n{}", k.log()));
    eprintln!("{requests} requests, {moved} of {total} connections moved");
    assert!(moved > 0, "no connection moved");
    assert_eq!(moved, total, "every connection moved at a request boundary");
}

/// The integration a new user tries first — hyper straight on
/// `holdfast::tokio::Conn` (hf-naive-http, same routes) — under the same
/// storm as hf-chat: requests fail, which is why the adapter exists and
/// why the docs warn against it.
#[test]
fn naive_hyper_on_conn_fails_under_the_same_kill_storm() {
    let exe = bin("hf-naive-http").display().to_string();
    let mut k = Keeper::start(&[], &[&exe]);
    let load = Load::start(
        k.addr,
        &[
            (Style::KeepAlive, 10_000),
            (Style::KeepAlive, 100_000),
            (Style::KeepAlive, 1 << 20),
            (Style::Pipelined(6), 3_000),
        ],
    );
    load.progress(20);
    // Kill until the clients notice (a few seconds at most): the replayed
    // history differs (hyper's Date) or is cut.
    let t0 = Instant::now();
    let mut failed = false;
    while t0.elapsed() < Duration::from_secs(8) && !failed {
        kill_storm(&mut k, 1);
        failed = load.clients.iter().any(|c| c.is_finished());
    }
    let failures = match load.finish() {
        Ok(n) => panic!("the naive integration survived the storm ({n} requests)"),
        Err(f) => f,
    };
    eprintln!(
        "naive integration: {} of 4 clients failed: {failures:?}",
        failures.len()
    );
}

fn chat_with_test_routes() -> Keeper {
    let exe = bin("hf-chat").display().to_string();
    Keeper::start(&[], &[&exe, "--test-routes"])
}

/// A keep-alive client whose answers come within 10 s or not at all.
fn client(addr: SocketAddr) -> Client {
    let mut cl = Client::connect(addr).unwrap();
    cl.stream()
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    cl
}

fn hello(cl: &mut Client, n: u64) {
    let r = cl.get(&format!("/hello?n={n}")).expect("hello");
    assert_eq!(
        (r.status, r.body),
        (200, format!("hello {n}\n").into_bytes())
    );
}

/// A handler that panics ends its worker (not just its connection); the
/// request comes back to the next worker, kills it too, and is then
/// answered `500` by the adapter without running again. The connection
/// stays open and serves the next request.
#[test]
fn panicking_handler_is_answered_500_as_poison_and_the_connection_lives_on() {
    let k = chat_with_test_routes();
    let mut cl = client(k.addr);
    hello(&mut cl, 1);
    let r = cl
        .get("/crash")
        .unwrap_or_else(|e| panic!("/crash: {e}\n{}", k.log()));
    assert_eq!(r.status, 500, "{}", k.log());
    assert!(r.header("date").is_some());
    hello(&mut cl, 2);
    assert_eq!(k.status().unwrap().poisoned, 1);
}

/// A request declared not to run twice — by its handler through its
/// `Handle` (`GET /once`), or by `ReplayPolicyLayer` on its route
/// (`POST /pay`) — and killed before answering is not run again: the next
/// worker answers `500`, and the connection carries on.
#[test]
fn request_declared_not_to_run_twice_gets_500_after_a_crash() {
    let mut k = chat_with_test_routes();
    let mut cl = client(k.addr);
    hello(&mut cl, 1);
    for raw in [
        &b"GET /once HTTP/1.1\r\nHost: t\r\n\r\n"[..],
        b"POST /pay HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n",
    ] {
        let what = String::from_utf8_lossy(&raw[..9]).into_owned();
        cl.send(raw).unwrap();
        // Time for the policy to be declared; the handler then waits forever.
        std::thread::sleep(Duration::from_millis(1000));
        k.kill_active();
        let r = cl
            .read_response(false)
            .unwrap_or_else(|e| panic!("{what}: {e}\n{}", k.log()));
        assert_eq!(r.status, 500, "{what}: {}", k.log());
        hello(&mut cl, 2);
    }
}

/// Requests the adapter cannot frame get 400, 413 or 431 and their
/// connection closes; a keep-alive connection alongside is not disturbed,
/// and chunked and pipelined requests are answered in order. `kept`: under
/// the keeper, which drops unread input before its FIN; alone, a close with
/// unread input is a reset (as for any server), so the 431 case, refused
/// before all of its head may have been read, is left out there.
fn bad_and_odd_requests(addr: SocketAddr, kept: bool) {
    let mut other = client(addr);
    hello(&mut other, 1);
    let mut long_head = b"GET /hello?n=1 HTTP/1.1\r\nX-Long: ".to_vec();
    long_head.resize(70 * 1024, b'a');
    long_head.extend_from_slice(b"\r\n\r\n");
    let cases: [(&[u8], u16); 5] = [
        (
            b"GET /hello?n=1 HTTP/1.1\r\nContent-Length: zz\r\n\r\n",
            400,
        ),
        (
            b"POST /echo HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            400,
        ),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400),
        (
            b"POST /echo HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n",
            413,
        ),
        (&long_head, 431),
    ];
    let cases = if kept { &cases[..] } else { &cases[..4] };
    for &(raw, status) in cases {
        let mut cl = client(addr);
        cl.send(raw).unwrap();
        let r = cl.read_response(false).unwrap();
        assert_eq!(
            r.status,
            status,
            "{:?}",
            String::from_utf8_lossy(&raw[..20])
        );
        let mut rest = Vec::new();
        cl.stream().read_to_end(&mut rest).expect("a clean close");
        assert!(rest.is_empty());
        hello(&mut other, 2);
    }
    // Chunked body, then two pipelined requests, in one write.
    other
        .send(
            b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n\
              3\r\nabc\r\n4;ext=1\r\ndefg\r\n0\r\n\r\n\
              GET /hello?n=3 HTTP/1.1\r\nHost: t\r\n\r\n\
              POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nhi",
        )
        .unwrap();
    let bodies: Vec<Vec<u8>> = (0..3)
        .map(|_| other.read_response(false).unwrap().body)
        .collect();
    assert_eq!(bodies, [&b"abcdefg"[..], b"hello 3\n", b"hi"]);
}

#[test]
fn unframeable_requests_are_refused_alone_under_the_keeper() {
    let k = chat();
    bad_and_odd_requests(k.addr, true);
}

/// `hf-chat --listen ADDR` runs alone (pass-through) with the same
/// behaviour.
#[test]
fn hf_chat_runs_alone_with_the_same_answers() {
    let (child, addr) = hf_tests::start_pass_through(
        std::process::Command::new(bin("hf-chat")).args(["--listen", "127.0.0.1:0"]),
    );
    let _child = hf_tests::Proc(child);
    bad_and_odd_requests(addr, false);
    let mut cl = client(addr);
    let r = cl.get("/big").unwrap();
    assert!(r.body == big_body());
    assert_eq!(r.header("content-type"), Some("application/octet-stream"));
}

/// Runs the load generator `make(addr)` builds (a client nobody here
/// wrote) against hf-chat while the worker is killed every 100–200 ms;
/// returns its stdout.
fn outside_client_under_kills(make: impl FnOnce(SocketAddr) -> std::process::Command) -> String {
    let mut k = chat();
    let child = make(k.addr)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("load generator (see .ci/run)");
    let out = std::thread::spawn(move || child.wait_with_output());
    std::thread::sleep(Duration::from_millis(200));
    let kills = kill_storm(&mut k, 3);
    let out = out.join().unwrap().expect("load generator output");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{}\n{}",
        text,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(kills >= 10, "only {kills} kills");
    text
}

/// The number after `label` in a load generator's report.
fn figure(text: &str, label: &str) -> u64 {
    let at = text
        .find(label)
        .unwrap_or_else(|| panic!("no {label:?} in:\n{text}"));
    text[at + label.len()..]
        .trim_start()
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no figure after {label:?} in:\n{text}"))
}

/// ApacheBench with keep-alive (HTTP/1.0 `Connection: Keep-Alive`),
/// `/hello`, through a kill storm: not one failed request, wrong length or
/// non-2xx answer.
#[test]
fn ab_keepalive_under_a_kill_storm() {
    let text = outside_client_under_kills(|addr| {
        let mut c = std::process::Command::new("ab");
        c.args(["-k", "-c", "8", "-t", "4", "-n", "1000000"])
            .arg(format!("http://{addr}/hello?n=42"));
        c
    });
    assert_eq!(figure(&text, "Failed requests:"), 0, "{text}");
    assert!(!text.contains("Non-2xx"), "{text}");
    assert!(figure(&text, "Complete requests:") > 1000, "{text}");
}

/// h2load in HTTP/1.1 mode, four requests pipelined per connection,
/// through a kill storm: every request succeeds.
#[test]
fn h2load_pipelined_under_a_kill_storm() {
    let text = outside_client_under_kills(|addr| {
        let mut c = std::process::Command::new("h2load");
        c.args(["--h1", "-c", "8", "-m", "4", "-D", "4"])
            .arg(format!("http://{addr}/hello?n=7"));
        c
    });
    let line = text
        .lines()
        .find(|l| l.starts_with("requests:"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(line.contains(" 0 failed, 0 errored, 0 timeout"), "{line}");
    assert!(figure(line, "requests:") > 1000, "{line}");
}
