//! hf-chat over HTTPS and WSS (`--tls-cert`/`--tls-key`: holdfast-http on
//! holdfast-tls) under the keeper, with workers SIGKILLed every 100–200 ms
//! and upgraded. The clients — Python's `ssl` (OpenSSL) verifying the
//! server against a test CA — use one TLS session each from start to end:
//! every byte checked, nothing lost, nothing doubled, no reconnection.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hf_tests::pki::Pki;
use hf_tests::{bin, finish_client, py_script, python, tail, Keeper, TempDir};

/// Keep-alive HTTPS: `/hello`, `/big` (byte-checked) and a 3 MiB `POST
/// /echo`, in rounds, on one connection (a reconnection is a failure);
/// then, if asked, SSE streams read whole and checked (their requests
/// padded by a header of `pad` bytes). Prints "ok ...".
const CLIENT: &str = r#"
import http.client, ssl, sys, time
port, ca, rounds, events, pad = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
ctx = ssl.create_default_context(cafile=ca)
c = http.client.HTTPSConnection('localhost', port, context=ctx, timeout=30)
big = bytes(i % 251 for i in range(2 * 1024 * 1024))
body = bytes((i * 7 + i // 4093) % 256 for i in range(3 * 1024 * 1024))
sock = None
def call(method, path, data=None, headers={}):
    global sock
    c.request(method, path, body=data, headers=headers)
    if sock is None:
        sock = c.sock
        assert c.sock.version() == 'TLSv1.3', c.sock.version()
    r = c.getresponse()
    got = r.read()
    if c.sock is not sock:
        sys.exit(f'{method} {path}: the connection was closed or replaced')
    if r.status != 200:
        sys.exit(f'{method} {path}: status {r.status}')
    return got
for i in range(rounds):
    got = call('GET', f'/hello?n={i}')
    if got != b'hello %d\n' % i:
        sys.exit(f'/hello {i}: {got!r}')
    if i % 3 == 0:
        got = call('GET', '/big')
        if got != big:
            sys.exit(f'/big in round {i}: {len(got)} bytes, differ')
    if i % 3 == 1:
        got = call('POST', '/echo', body)
        if got != body:
            sys.exit(f'/echo in round {i}: {len(got)} bytes, differ')
if events:
    for s in range(3):
        got = call('GET', f'/events?n={events}&every_ms=10', headers={'X-Pad': 'p' * pad} if pad else {})
        want = b''.join(b'id: %d\ndata: event %d\n\n' % (e, e) for e in range(1, events + 1))
        if got != want:
            sys.exit(f'stream {s}: {len(got)} bytes, want {len(want)}')
    call('GET', '/hello?n=0')
print('ok', rounds, 'rounds', events, 'events')
"#;

/// One new connection (a new TLS handshake) per `GET /hello?n=I`, for
/// `n` requests: every answer checked. Prints "ok ...".
const PER_CONN: &str = r#"
import http.client, ssl, sys
port, ca, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
ctx = ssl.create_default_context(cafile=ca)
for i in range(n):
    c = http.client.HTTPSConnection('localhost', port, context=ctx, timeout=30)
    c.request('GET', f'/hello?n={i}', headers={'Connection': 'close'})
    r = c.getresponse()
    got = r.read()
    if r.status != 200 or got != b'hello %d\n' % i:
        sys.exit(f'request {i}: {r.status} {got!r}')
    c.close()
print('ok', n, 'connections')
"#;

struct Chat {
    pki: Pki,
    data: TempDir,
    client: TempDir,
}

impl Chat {
    fn new() -> Chat {
        let client = TempDir::new("https-client");
        std::fs::write(client.path().join("client.py"), CLIENT).unwrap();
        std::fs::write(client.path().join("perconn.py"), PER_CONN).unwrap();
        Chat {
            pki: Pki::new(),
            data: TempDir::new("https-chat"),
            client,
        }
    }

    /// The worker command: hf-chat over TLS, logging its resumed streams.
    fn cmd(&self) -> Vec<String> {
        vec![
            "/usr/bin/env".into(),
            "RUST_LOG=hf_chat=info,holdfast_http=debug,holdfast_tls=info".into(),
            bin("hf-chat").display().to_string(),
            "--data-dir".into(),
            self.data.path().display().to_string(),
            "--tls-cert".into(),
            self.pki.path("ec.pem"),
            "--tls-key".into(),
            self.pki.path("ec.key"),
        ]
    }

    fn start(&self) -> Keeper {
        let cmd = self.cmd();
        let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
        Keeper::start(&[], &cmd)
    }

    fn upgrade(&self, k: &Keeper) {
        let cmd = self.cmd();
        let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
        let (code, out, err) = k.upgrade(&[], &cmd);
        assert_eq!(code, 0, "upgrade failed: {out} {err}");
    }

    fn http_client(&self, k: &Keeper, rounds: u32, events: u32, pad: u32) -> Child {
        Command::new(python())
            .arg(self.client.path().join("client.py"))
            .arg(k.addr.port().to_string())
            .arg(self.pki.path("ca.pem"))
            .arg(rounds.to_string())
            .arg(events.to_string())
            .arg(pad.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("python3")
    }

    fn per_conn_client(&self, k: &Keeper, n: u32) -> Child {
        Command::new(python())
            .arg(self.client.path().join("perconn.py"))
            .arg(k.addr.port().to_string())
            .arg(self.pki.path("ca.pem"))
            .arg(n.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("python3")
    }

    fn room_client(&self, k: &Keeper, args: &[&str]) -> Child {
        Command::new(python())
            .arg(py_script("ws_room.py"))
            .arg(k.addr.to_string())
            .args(["--tls", &self.pki.path("ca.pem")])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("python3 with the websockets library (see .ci/run)")
    }
}

/// Runs `disturb` every 100–200 ms until every client has exited (at most
/// 150 s); returns how many times it ran.
fn while_running(clients: &mut [Child], mut disturb: impl FnMut(u32)) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(150);
    let mut n = 0;
    loop {
        std::thread::sleep(Duration::from_millis(100 + u64::from(n % 6) * 20));
        if clients
            .iter_mut()
            .all(|c| matches!(c.try_wait(), Ok(Some(_))))
        {
            return n;
        }
        assert!(Instant::now() < deadline, "the clients did not finish");
        disturb(n);
        n += 1;
    }
}

/// Every client succeeded (printed "ok").
fn finish(clients: Vec<Child>, k: &Keeper) {
    for child in clients {
        finish_client(child, k);
    }
}

/// Connections handed to a new worker after a kill.
fn recovered(k: &Keeper) -> u64 {
    k.log()
        .lines()
        .filter_map(|l| l.split("recovered onto standby: ").nth(1))
        .filter_map(|t| t.split(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Keep-alive HTTPS under a kill storm: two clients, each on one TLS 1.3
/// session, run `/hello`, `/big` (2 MiB, byte-checked) and 3 MiB `POST
/// /echo` while the worker is SIGKILLed every 100–200 ms: no failure, no
/// reconnection. (Fails with the TLS session left out of the state blob:
/// the next worker cannot take the connection up and closes it.)
#[test]
fn https_keep_alive_survives_a_kill_storm() {
    let chat = Chat::new();
    let mut k = chat.start();
    let mut clients = vec![
        chat.http_client(&k, 300, 0, 0),
        chat.http_client(&k, 300, 0, 0),
    ];
    let kills = while_running(&mut clients, |_| {
        k.kill_active();
    });
    finish(clients, &k);
    eprintln!("{kills} kills, {} connections recovered", recovered(&k));
    assert!(kills >= 10, "only {kills} kills landed");
    assert!(recovered(&k) > 0, "no connection was ever recovered");
}

/// A chat room over wss:// through kills and `holdfast upgrade`s: every
/// member gets every message exactly once, in order, and no connection
/// closes (tests/py/ws_room.py). The second room's upgrade heads (about
/// 245 bytes) would fit the state blob beside a member's state over plain
/// TCP, not in the room TLS leaves: they go to a held memfd (fails with
/// the plain connection's inline limit: the commit is refused and the
/// WebSocket closed).
#[test]
fn wss_room_survives_kills_and_upgrades() {
    let chat = Chat::new();
    let mut k = chat.start();
    let mut clients = vec![
        chat.room_client(&k, &["--members", "3", "--per", "150", "--gap", "0.03"]),
        chat.room_client(
            &k,
            &[
                "--room",
                "tight",
                "--members",
                "2",
                "--per",
                "120",
                "--gap",
                "0.03",
                "--small-head",
                "--cookie",
                "60",
            ],
        ),
    ];
    let mut upgrades = 0;
    let kills = while_running(&mut clients, |n| {
        if n % 4 == 2 {
            chat.upgrade(&k);
            upgrades += 1;
        } else {
            k.kill_active();
        }
    });
    finish(clients, &k);
    eprintln!(
        "{kills} disturbances, {upgrades} upgrades, {} connections recovered",
        recovered(&k)
    );
    assert!(upgrades >= 2, "only {upgrades} upgrades ran");
    assert!(kills >= 8, "only {kills} disturbances landed");
    assert!(recovered(&k) > 0, "no connection was ever recovered");
}

/// Server-Sent Events over HTTPS through kills: three 300-event streams in
/// a row on one TLS session, each read whole and compared, then a request
/// on the same connection; the new workers resumed the streams after their
/// last committed event (their log says so). The second client's requests
/// (about 180 bytes) are over what the state blob keeps beside a TLS
/// session: they are kept in a held memfd.
#[test]
fn https_sse_stream_survives_kills() {
    let chat = Chat::new();
    let mut k = chat.start();
    let mut clients = vec![
        chat.http_client(&k, 0, 300, 0),
        chat.http_client(&k, 0, 300, 80),
    ];
    let kills = while_running(&mut clients, |_| {
        k.kill_active();
    });
    finish(clients, &k);
    let log = k.log();
    let resumed = log.matches("resuming /events after event").count();
    eprintln!("{kills} kills, {resumed} streams resumed");
    assert!(kills >= 10, "only {kills} kills landed");
    assert!(
        resumed > 0,
        "{kills} kills, no stream resumed from its progress:\n{}",
        tail(&log, 40)
    );
}

/// Alone (pass-through), hf-chat serves the same HTTPS: curl, verifying
/// against the test CA, gets `/hello` and the whole `/big` over TLS 1.3
/// with ALPN `http/1.1`.
#[test]
fn https_alone_serves_the_same_answers_to_curl() {
    let chat = Chat::new();
    let mut cmd = Command::new(bin("hf-chat"));
    cmd.args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(chat.data.path())
        .args(["--tls-cert", &chat.pki.path("ec.pem")])
        .args(["--tls-key", &chat.pki.path("ec.key")]);
    let (child, addr) = hf_tests::start_pass_through(&mut cmd);
    let _child = hf_tests::Proc(child);
    let out = chat.client.path().join("big");
    let url = |p: &str| format!("https://localhost:{}{p}", addr.port());
    let (code, stdout, stderr) = hf_tests::run_cmd(
        Command::new("curl")
            .args(["-sS", "-v", "--http1.1", "--tlsv1.3", "--cacert"])
            .arg(chat.pki.path("ca.pem"))
            .arg(url("/hello?n=7"))
            .arg(url("/big"))
            .arg("-o")
            .arg("/dev/stdout")
            .arg("-o")
            .arg(&out),
    );
    assert_eq!(code, 0, "curl: {stderr}");
    assert_eq!(stdout, "hello 7\n");
    assert!(
        stderr.contains("ALPN: server accepted http/1.1"),
        "{stderr}"
    );
    let big = std::fs::read(&out).unwrap();
    assert_eq!(big.len(), 2 * 1024 * 1024);
    assert!(big.iter().enumerate().all(|(i, &b)| b as usize == i % 251));
}

/// `--tls-cert` and `--tls-key` come together, and a file that is not a
/// PEM certificate is named in the error.
#[test]
fn tls_flags_come_in_pairs_and_bad_files_are_named() {
    let chat = Chat::new();
    let run = |args: &[&str]| {
        let mut cmd = Command::new(bin("hf-chat"));
        cmd.args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(chat.data.path())
            .args(args);
        hf_tests::run_cmd(&mut cmd)
    };
    let cert = chat.pki.path("ec.pem");
    let key = chat.pki.path("ec.key");
    let (code, _, err) = run(&["--tls-cert", &cert]);
    assert_ne!(code, 0);
    assert!(err.contains("--tls-key"), "{err}");
    let (code, _, err) = run(&["--tls-key", &key]);
    assert_ne!(code, 0);
    assert!(err.contains("--tls-cert"), "{err}");
    let (code, _, err) = run(&["--tls-cert", &key, "--tls-key", &key]);
    assert_ne!(code, 0);
    assert!(
        err.contains("TLS certificate") && err.contains("ec.key"),
        "{err}"
    );
}

/// A new TLS connection per request while the worker is SIGKILLed every
/// 20–40 ms, so kills land inside handshakes: the next worker replays the
/// handshake from its recorded seed (the log says so) and every request
/// is answered.
#[test]
fn new_https_connection_per_request_under_kills_every_20ms() {
    let chat = Chat::new();
    let mut k = chat.start();
    let mut clients = vec![chat.per_conn_client(&k, 500), chat.per_conn_client(&k, 500)];
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut kills = 0u32;
    while !clients
        .iter_mut()
        .all(|c| matches!(c.try_wait(), Ok(Some(_))))
    {
        assert!(Instant::now() < deadline, "the clients did not finish");
        std::thread::sleep(Duration::from_millis(20 + u64::from(kills % 3) * 10));
        k.kill_active();
        kills += 1;
    }
    finish(clients, &k);
    let cut = k.log().matches("TLS handshake cut by a crash").count();
    eprintln!("{kills} kills, {cut} handshakes cut and replayed");
    assert!(kills >= 20, "only {kills} kills landed");
    assert!(cut > 0, "no kill landed inside a handshake");
}
