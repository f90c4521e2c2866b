//! TLS sessions that survive their worker: hf-testsvc served over TLS by
//! holdfast-tls, driven by Python's `ssl` module (OpenSSL) verifying the
//! server against a test CA made here with the `openssl` CLI, while workers
//! are SIGKILLed or upgraded. Every byte the clients receive is compared
//! with what one crash-free run sends.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hf_tests::http::make_site;
use hf_tests::testsvc::answer;
use hf_tests::{bin, kill9, run_cmd, start_pass_through, tail, Keeper, Role, TempDir};

/// The client: runs a script of request batches over TLS, one batch per
/// write (so several requests share a record and commits fall inside
/// records), and writes every byte it receives to a file. `perconn` opens
/// a new connection (a new handshake) for each batch.
const CLIENT: &str = r#"
import socket, ssl, sys, time
host, port, ca, script, out, mode = sys.argv[1:7]
maxver = sys.argv[7] if len(sys.argv) > 7 else ''
rate = float(sys.argv[8]) if len(sys.argv) > 8 else 0.0
ctx = ssl.create_default_context(cafile=ca)
if maxver == '1.2':
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
version = None
session = None
reused = 0
def connect():
    global version, reused
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rate:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    raw.settimeout(30)
    raw.connect((host, int(port)))
    s = ctx.wrap_socket(raw, server_hostname='localhost',
                        session=session if mode == 'resume' else None)
    version = s.version()
    reused += s.session_reused
    return s, s.makefile('rb')
def readn(f, n):
    parts, got, t0 = [], 0, time.monotonic()
    while got < n:
        b = f.read(min(n - got, 64 * 1024) if rate else n - got)
        if not b:
            raise EOFError(f'end of stream after {got} of {n} bytes')
        parts.append(b)
        got += len(b)
        if rate:
            ahead = got / rate - (time.monotonic() - t0)
            if ahead > 0:
                time.sleep(ahead)
    return b''.join(parts)
batches = [[tuple(map(int, r.split(':'))) for r in l.split()] for l in open(script) if l.strip()]
o = open(out, 'wb')
s = f = None
n = 0
def bye():
    s.sendall(b'QUIT 0\n')
    b = f.readline()
    if b != b'BYE 0\n':
        sys.exit(f'bad goodbye {b!r}')
    if f.read() != b'':
        sys.exit('bytes after the goodbye')
    s.close()
for batch in batches:
    if s is None:
        s, f = connect()
    s.sendall(b''.join(b'REQ %d %d %d\n' % r for r in batch))
    for (i, l, d) in batch:
        h = f.readline()
        o.write(h)
        if h != b'RESP %d %d\n' % (i, l):
            o.close()
            sys.exit(f'request {i}: bad head {h!r}')
        o.write(readn(f, l + 1))
        n += 1
    if mode in ('perconn', 'resume'):
        session = s.session
        bye()
        s = f = None
    elif n == len(batch):
        # The first answers are in: the session is established.
        print('ready', flush=True)
if s is not None:
    bye()
o.close()
print('done', n, version, 'reused', reused)
"#;

/// A test CA and two server certificates for `localhost` signed by it.
struct Pki {
    dir: TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = TempDir::new("tls-pki");
        let d = dir.path();
        std::fs::write(d.join("ext"), "subjectAltName=DNS:localhost,IP:127.0.0.1\n").unwrap();
        let ssl = |args: &[&str]| {
            let (code, out, err) = run_cmd(Command::new("openssl").args(args).current_dir(d));
            assert_eq!(code, 0, "openssl {args:?}: {out}{err}");
        };
        ssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=holdfast test CA",
        ]);
        for (name, key) in [("ec", "ec"), ("rsa", "rsa:2048")] {
            let mut args = vec!["req", "-newkey", key];
            if key == "ec" {
                args.extend(["-pkeyopt", "ec_paramgen_curve:P-256"]);
            }
            let (k, csr) = (format!("{name}.key"), format!("{name}.csr"));
            args.extend([
                "-nodes",
                "-keyout",
                &k,
                "-out",
                &csr,
                "-subj",
                "/CN=localhost",
            ]);
            ssl(&args);
            ssl(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &format!("{name}.pem"),
                "-days",
                "2",
                "-extfile",
                "ext",
            ]);
        }
        // A chain: an intermediate CA signed by the root, a leaf signed by
        // the intermediate; chain.pem holds the leaf then the intermediate.
        std::fs::write(
            d.join("ca-ext"),
            "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n",
        )
        .unwrap();
        ssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "int.key",
            "-out",
            "int.csr",
            "-subj",
            "/CN=holdfast test intermediate",
        ]);
        ssl(&[
            "x509",
            "-req",
            "-in",
            "int.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "int.pem",
            "-days",
            "2",
            "-extfile",
            "ca-ext",
        ]);
        ssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "chain.key",
            "-out",
            "chain.csr",
            "-subj",
            "/CN=localhost",
        ]);
        ssl(&[
            "x509",
            "-req",
            "-in",
            "chain.csr",
            "-CA",
            "int.pem",
            "-CAkey",
            "int.key",
            "-CAcreateserial",
            "-out",
            "leaf.pem",
            "-days",
            "2",
            "-extfile",
            "ext",
        ]);
        let chain = [
            std::fs::read(d.join("leaf.pem")).unwrap(),
            std::fs::read(d.join("int.pem")).unwrap(),
        ]
        .concat();
        std::fs::write(d.join("chain.pem"), chain).unwrap();
        std::fs::write(d.join("client.py"), CLIENT).unwrap();
        Pki { dir }
    }

    fn path(&self, f: &str) -> String {
        self.dir.path().join(f).display().to_string()
    }

    /// hf-testsvc (tokio flavour) over TLS with the `kind` ("ec" or
    /// "rsa") certificate.
    fn testsvc(&self, kind: &str, extra: &[&str]) -> Vec<String> {
        let mut v = self.testsvc_blocking(kind, extra);
        v.insert(1, "--tokio".into());
        v
    }

    /// [`Pki::testsvc`] on the blocking flavour.
    fn testsvc_blocking(&self, kind: &str, extra: &[&str]) -> Vec<String> {
        let mut v = vec![
            bin("hf-testsvc").display().to_string(),
            "--tls-cert".into(),
            self.path(&format!("{kind}.pem")),
            "--tls-key".into(),
            self.path(&format!("{kind}.key")),
        ];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    }
}

fn s(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Request batches: (id, answer length, delay ms) each.
type Script = Vec<Vec<(u64, usize, u64)>>;

fn script(first_id: u64, batches: usize, per: usize, max_len: usize, seed: u64) -> Script {
    let mut x = seed | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut id = first_id;
    (0..batches)
        .map(|_| {
            (0..per)
                .map(|_| {
                    id += 1;
                    (id, (next() % max_len as u64) as usize, next() % 4)
                })
                .collect()
        })
        .collect()
}

/// A running client.
struct Client {
    name: String,
    child: std::process::Child,
    stdout: std::io::BufReader<std::process::ChildStdout>,
    out: PathBuf,
    want: Vec<u8>,
}

impl Client {
    fn start(
        pki: &Pki,
        addr: std::net::SocketAddr,
        name: &str,
        sc: &Script,
        mode: &str,
        opts: &[&str],
    ) -> Client {
        let sfile = pki.dir.path().join(format!("{name}.script"));
        let out = pki.dir.path().join(format!("{name}.out"));
        let text: String = sc
            .iter()
            .map(|b| {
                let reqs: Vec<String> = b.iter().map(|(i, l, d)| format!("{i}:{l}:{d}")).collect();
                reqs.join(" ") + "\n"
            })
            .collect();
        std::fs::write(&sfile, text).unwrap();
        let want = sc
            .iter()
            .flatten()
            .flat_map(|(i, l, _)| answer(*i, *l, 0))
            .collect();
        let mut child = Command::new("python3")
            .arg(pki.path("client.py"))
            .args([
                "127.0.0.1".to_string(),
                addr.port().to_string(),
                pki.path("ca.pem"),
                sfile.display().to_string(),
                out.display().to_string(),
                mode.to_string(),
            ])
            .args(opts)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("python3");
        let stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        Client {
            name: name.into(),
            child,
            stdout,
            out,
            want,
        }
    }

    /// Waits until the client's session is established (its first batch
    /// answered), so what follows tests established sessions alone
    /// (handshakes cut by kills have their own test).
    fn ready(mut self) -> Client {
        use std::io::BufRead;
        let mut line = String::new();
        let _ = self.stdout.read_line(&mut line);
        assert_eq!(line.trim(), "ready", "{}: not ready", self.name);
        self
    }

    /// Waits for the client (at most `timeout`) and checks every byte it
    /// received; returns its summary line ("done N VERSION").
    fn check(mut self, timeout: Duration) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        while self.child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut summary = String::new();
        let _ = std::io::Read::read_to_string(&mut self.stdout, &mut summary);
        let o = self.child.wait_with_output().expect("client output");
        let got = std::fs::read(&self.out).unwrap_or_default();
        let same = got.len().min(self.want.len());
        let first_diff = (0..same).find(|&i| got[i] != self.want[i]);
        let summary = summary.trim().trim_start_matches("ready").trim().to_owned();
        if !o.status.success() || got != self.want {
            return Err(format!(
                "{}: exit {:?}, {} of {} bytes, first difference at {:?}; stdout {summary:?}; stderr {}",
                self.name,
                o.status.code(),
                got.len(),
                self.want.len(),
                first_diff,
                String::from_utf8_lossy(&o.stderr)
            ));
        }
        Ok(summary)
    }
}

/// SIGKILLs the active worker every `every` until stopped; returns the
/// number of kills.
fn kill_storm(control: PathBuf, every: Duration, stop: Arc<AtomicBool>) -> JoinHandle<u32> {
    std::thread::spawn(move || {
        let mut kills = 0;
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(every);
            if let Ok(st) = hf_keeper::status::query(&control) {
                if let Some(w) = st.workers.iter().find(|w| w.role == Role::Active) {
                    kill9(w.pid);
                    kills += 1;
                }
            }
        }
        kills
    })
}

/// Runs `clients` under a kill storm; all must finish with every byte right.
fn under_storm(k: &mut Keeper, clients: Vec<Client>, every: Duration) -> (u32, Vec<String>) {
    let stop = Arc::new(AtomicBool::new(false));
    let storm = kill_storm(k.control.clone(), every, stop.clone());
    let results: Vec<_> = clients
        .into_iter()
        .map(|c| c.check(Duration::from_secs(120)))
        .collect();
    stop.store(true, Ordering::Relaxed);
    let kills = storm.join().unwrap();
    let failed: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "{} of {} clients failed after {kills} kills:\n{failed:#?}\nkeeper log tail:\n{}",
        failed.len(),
        results.len(),
        tail(&k.log(), 40)
    );
    (kills, results.into_iter().map(Result::unwrap).collect())
}

/// Keep-alive TLS 1.3 clients pipelining batches of requests (so commits
/// fall inside records) while the worker is SIGKILLed every 50 ms: every
/// byte arrives exactly once, for both certificate kinds.
#[test]
fn keepalive_tls13_under_a_kill_storm() {
    let pki = Pki::new();
    for (n, kind) in ["ec", "rsa"].into_iter().enumerate() {
        let mut k = Keeper::start(&[], &s(&pki.testsvc(kind, &[])));
        let clients = (0..4)
            .map(|c| {
                let sc = script(1_000_000 * (c + 1), 60, 6, 30_000, 7 + c + 100 * n as u64);
                Client::start(
                    &pki,
                    k.addr,
                    &format!("{kind}-ka{c}"),
                    &sc,
                    "keepalive",
                    &[],
                )
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(Client::ready)
            .collect();
        let (kills, done) = under_storm(&mut k, clients, Duration::from_millis(50));
        for d in &done {
            assert!(d.contains("TLSv1.3"), "{d}");
        }
        let st = k.status().unwrap();
        assert!(kills >= 10, "only {kills} kills");
        assert!(
            st.recovered_connections >= 10,
            "{kind}: only {} connections recovered in {kills} kills",
            st.recovered_connections
        );
        eprintln!(
            "{kind}: {kills} kills, {} connections recovered, clients: {done:?}",
            st.recovered_connections
        );
    }
}

/// A new TLS connection (a new handshake) for every request while the
/// worker is SIGKILLed every 20 ms, so kills land inside handshakes, for
/// both certificate kinds: each cut handshake is replayed from its
/// recorded seed byte for byte, and no client notices.
#[test]
fn new_connection_per_request_under_kills_every_20ms() {
    let pki = Pki::new();
    for (n, kind) in ["ec", "rsa"].into_iter().enumerate() {
        let mut k = Keeper::start(&[], &s(&pki.testsvc(kind, &[])));
        let clients = (0..4)
            .map(|c| {
                let sc = script(1_000_000 * (c + 1), 80, 1, 3_000, 3 + c + 10 * n as u64);
                // Half the clients resume their last session each time.
                let mode = if c % 2 == 0 { "perconn" } else { "resume" };
                Client::start(&pki, k.addr, &format!("{kind}-pc{c}"), &sc, mode, &[])
            })
            .collect();
        let (kills, done) = under_storm(&mut k, clients, Duration::from_millis(20));
        let replayed = k.log().matches("TLS handshake cut by a crash").count();
        eprintln!("{kind}: {kills} kills, {replayed} handshakes replayed, clients: {done:?}");
        assert!(kills >= 20, "only {kills} kills");
        assert!(replayed >= 1, "{kind}: no kill landed inside a handshake");
        for d in done.iter().skip(1).step_by(2) {
            let reused: u32 = d.rsplit(' ').next().unwrap().parse().unwrap();
            assert!(reused >= 70, "{kind}: few sessions resumed: {d}");
        }
    }
}

/// A 24 MiB answer, read slowly through a small window, while the worker
/// is killed five times: each new worker regenerates the answer, encrypts
/// it into the same records and sends only what the client lacks.
#[test]
fn large_tls_download_through_kills() {
    let pki = Pki::new();
    let mut k = Keeper::start(&[], &s(&pki.testsvc("ec", &[])));
    let sc: Script = vec![vec![(1, 24 << 20, 0)], vec![(2, 1000, 0)]];
    let sc: Script = vec![vec![(3, 10, 0)], sc[0].clone(), sc[1].clone()];
    let c = Client::start(
        &pki,
        k.addr,
        "download",
        &sc,
        "keepalive",
        &["", &(8u32 << 20).to_string()],
    )
    .ready();
    let mut kills = 0;
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(300));
        k.kill_and_wait();
        kills += 1;
    }
    let done = c
        .check(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}\n{}", tail(&k.log(), 40)));
    let st = k.status().unwrap();
    assert_eq!(st.recovered_connections, kills, "{done}");
}

/// The signature type `openssl s_client` sees in a new handshake: which
/// certificate the service presents.
fn presented_key(pki: &Pki, addr: std::net::SocketAddr) -> String {
    let (_, out, err) = run_cmd(
        Command::new("openssl")
            .args(["s_client", "-connect", &addr.to_string(), "-CAfile"])
            .arg(pki.path("ca.pem"))
            .args(["-servername", "localhost", "-verify_return_error"]),
    );
    let all = format!("{out}{err}");
    assert!(all.contains("Verify return code: 0 (ok)"), "{all}");
    all.lines()
        .find_map(|l| l.strip_prefix("Peer signature type: "))
        .unwrap_or_default()
        .to_owned()
}

/// `holdfast upgrade` while keep-alive TLS clients run: their sessions
/// move to the new workers at commit points and go on. The upgrades
/// alternate between an ECDSA and an RSA certificate (a certificate
/// reload): sessions in progress keep their keys, new handshakes present
/// the new certificate.
#[test]
fn tls_sessions_move_through_upgrades() {
    let pki = Pki::new();
    let cmd = pki.testsvc("ec", &[]);
    let rsa = pki.testsvc("rsa", &[]);
    let k = Keeper::start(&[], &s(&cmd));
    assert_eq!(presented_key(&pki, k.addr), "ECDSA");
    let clients: Vec<Client> = (0..4)
        .map(|c| {
            let sc = script(1_000_000 * (c + 1), 150, 4, 20_000, 31 + c);
            Client::start(&pki, k.addr, &format!("up{c}"), &sc, "keepalive", &[])
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(Client::ready)
        .collect();
    let mut moved = 0;
    for i in 0..3 {
        std::thread::sleep(Duration::from_millis(300));
        let next = if i % 2 == 0 { &rsa } else { &cmd };
        let (code, out, err) = k.upgrade(&["--settle", "20", "--json"], &s(next));
        assert_eq!(code, 0, "upgrade {i}: {out}{err}\n{}", k.log());
        let want = if i % 2 == 0 { "RSA-PSS" } else { "ECDSA" };
        assert_eq!(presented_key(&pki, k.addr), want, "after upgrade {i}");
        let last = out.lines().last().unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(last).unwrap();
        assert_eq!(v["event"], "done", "{out}");
        moved += v["moved"].as_u64().unwrap_or(0) + v["recovered"].as_u64().unwrap_or(0);
    }
    let failed: Vec<String> = clients
        .into_iter()
        .filter_map(|c| c.check(Duration::from_secs(120)).err())
        .collect();
    assert!(failed.is_empty(), "{failed:#?}\n{}", tail(&k.log(), 40));
    assert!(moved >= 4, "only {moved} connections moved in 3 upgrades");
    let st = k.status().unwrap();
    assert_eq!((st.upgrades, st.restarts), (3, 0));
}

/// Without a keeper the same binary serves TLS 1.3 and 1.2.
#[test]
fn pass_through_serves_tls13_and_tls12() {
    let pki = Pki::new();
    let mut cmd = Command::new(bin("hf-testsvc"));
    cmd.args(&pki.testsvc("rsa", &["--listen", "127.0.0.1:0"])[1..]);
    let (mut child, addr) = start_pass_through(&mut cmd);
    let sc = script(0, 20, 3, 50_000, 5);
    for (name, opts) in [("pt13", &[][..]), ("pt12", &["1.2"][..])] {
        let done = Client::start(&pki, addr, name, &sc, "keepalive", opts)
            .check(Duration::from_secs(30))
            .unwrap();
        let want = if opts.is_empty() {
            "TLSv1.3"
        } else {
            "TLSv1.2"
        };
        assert!(done.contains(want), "{done}");
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// TLS 1.2 is served under the keeper too, but its sessions do not
/// survive the worker: after a kill the client's connection ends (cleanly,
/// without a reset), and new connections are served.
#[test]
fn tls12_is_served_and_closed_by_a_crash() {
    let pki = Pki::new();
    let mut k = Keeper::start(&[], &s(&pki.testsvc("ec", &[])));
    let sc = script(0, 10, 2, 10_000, 9);
    let done = Client::start(&pki, k.addr, "t12", &sc, "keepalive", &["1.2"])
        .check(Duration::from_secs(30))
        .unwrap();
    assert!(done.contains("TLSv1.2"), "{done}");
    // A long answer in flight when the worker dies: the client sees the
    // connection end early, not a wrong byte.
    let sc: Script = vec![vec![(2, 10, 0)], vec![(1, 16 << 20, 0)]];
    let c = Client::start(
        &pki,
        k.addr,
        "t12kill",
        &sc,
        "keepalive",
        &["1.2", "4000000"],
    )
    .ready();
    std::thread::sleep(Duration::from_millis(500));
    k.kill_and_wait();
    let e = c.check(Duration::from_secs(30)).unwrap_err();
    assert!(e.contains("end of stream"), "{e}");
    let got = std::fs::read(pki.dir.path().join("t12kill.out")).unwrap();
    let mut want = answer(2, 10, 0);
    want.extend(answer(1, 16 << 20, 0));
    assert!(
        got.len() < want.len() && want.starts_with(&got),
        "a wrong byte"
    );
    let sc = script(100, 3, 2, 1000, 11);
    Client::start(&pki, k.addr, "t12after", &sc, "keepalive", &["1.2"])
        .check(Duration::from_secs(30))
        .unwrap();
}

/// Hostile input: garbage instead of a ClientHello, a record with a bad
/// MAC, a truncated record. Each connection ends with the proper alert or
/// a clean close; the worker goes on.
#[test]
fn hostile_tls_input_gets_an_alert_and_a_clean_close() {
    let pki = Pki::new();
    let mut k = Keeper::start(&[], &s(&pki.testsvc("ec", &[])));
    let pid = k.active_pid();
    let probe = format!(
        r#"
import socket, ssl, sys
host, port, ca = '127.0.0.1', {port}, {ca:?}
def raw():
    s = socket.create_connection((host, port), timeout=10)
    return s
def drain(s):
    got = b''
    while True:
        try:
            b = s.recv(65536)
        except ConnectionResetError:
            sys.exit('reset')
        if not b:
            return got
        got += b
# 1. Garbage instead of a ClientHello: a fatal alert record, then FIN.
s = raw(); s.sendall(b'GET / HTTP/1.1\r\n\r\n'); got = drain(s)
assert got[:1] == b'\x15', got
print('garbage', got.hex())
# 2. A handshake, then a record whose MAC is wrong: the server answers with
# an (encrypted) alert the client reads as bad_record_mac, then FIN.
ctx = ssl.create_default_context(cafile=ca)
for kind in ('mac', 'trunc'):
    s = raw()
    inc, outg = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, outg, server_hostname='localhost')
    while True:
        try:
            obj.do_handshake(); break
        except ssl.SSLWantReadError:
            s.sendall(outg.read())
            b = s.recv(65536)
            if not b: sys.exit('closed in handshake')
            inc.write(b)
    s.sendall(outg.read())
    obj.write(b'REQ 1 10 0\n'); s.sendall(outg.read())
    if kind == 'mac':
        s.sendall(bytes([23, 3, 3, 0, 40]) + bytes(40))
        inc.write(drain(s))
        try:
            while True:
                obj.read(65536)
        except ssl.SSLError as e:
            assert 'BAD_RECORD_MAC' in str(e).upper(), e
            print('mac', e)
    else:
        s.sendall(bytes([23, 3, 3, 0, 200]) + bytes(10))
        s.shutdown(socket.SHUT_WR)
        inc.write(drain(s))
        print('trunc ok')
"#,
        port = k.addr.port(),
        ca = pki.path("ca.pem"),
    );
    let (code, out, err) = run_cmd(Command::new("python3").args(["-c", &probe]));
    assert_eq!(code, 0, "{out}{err}\n{}", tail(&k.log(), 30));
    assert!(
        out.contains("garbage") && out.contains("mac") && out.contains("trunc ok"),
        "{out}"
    );
    assert_eq!(k.active_pid(), pid, "the worker died");
    let sc = script(0, 3, 2, 1000, 3);
    Client::start(&pki, k.addr, "after", &sc, "keepalive", &[])
        .check(Duration::from_secs(30))
        .unwrap();
    let st = k.status().unwrap();
    assert_eq!(st.restarts, 0);
}

/// A keep-alive HTTPS client (Python's http.client): GETs the files in
/// turn on one connection and compares every body with the file on disk.
const HTTPS_CLIENT: &str = r#"
import http.client, ssl, sys, os
port, ca, root, n = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
files = sys.argv[5:]
ctx = ssl.create_default_context(cafile=ca)
c = http.client.HTTPSConnection('localhost', port, context=ctx, timeout=30)
c.connect()
c.sock.getpeername()
want = {f: open(os.path.join(root, f.lstrip('/')), 'rb').read() for f in files}
for i in range(n):
    f = files[i % len(files)]
    c.request('GET', f)
    r = c.getresponse()
    body = r.read()
    if r.status != 200 or body != want[f]:
        sys.exit(f'request {i} {f}: status {r.status}, {len(body)} bytes, want {len(want[f])}')
    if r.getheader('Connection', '').lower() == 'close' or c.sock is None:
        sys.exit(f'request {i}: connection closed')
print('done', n, c.sock.version())
"#;

fn httpd_tls(pki: &Pki, root: &std::path::Path, kind: &str) -> Vec<String> {
    vec![
        bin("hf-httpd").display().to_string(),
        "--root".into(),
        root.display().to_string(),
        "--tls-cert".into(),
        pki.path(&format!("{kind}.pem")),
        "--tls-key".into(),
        pki.path(&format!("{kind}.key")),
    ]
}

/// hf-httpd over HTTPS: keep-alive clients (Python) under a SIGKILL every
/// 50 ms, a new worker every time, and every body compared with its file.
#[test]
fn https_keepalive_under_a_kill_storm() {
    let pki = Pki::new();
    let site = TempDir::new("tls-site");
    let files = make_site(site.path(), &[0, 100, 5_000, 70_000, 300_000, 1 << 20]);
    let client = pki.dir.path().join("https.py");
    std::fs::write(&client, HTTPS_CLIENT).unwrap();
    for kind in ["ec", "rsa"] {
        let k = Keeper::start(&[], &s(&httpd_tls(&pki, site.path(), kind)));
        let stop = Arc::new(AtomicBool::new(false));
        let storm = kill_storm(k.control.clone(), Duration::from_millis(50), stop.clone());
        let runs: Vec<_> = (0..4)
            .map(|c| {
                let mut args = vec![
                    client.display().to_string(),
                    k.addr.port().to_string(),
                    pki.path("ca.pem"),
                    site.path().display().to_string(),
                    "250".into(),
                ];
                // Each client starts at another file.
                let mut names: Vec<String> = files.iter().map(|(p, _)| p.clone()).collect();
                names.rotate_left(c);
                args.extend(names);
                Command::new("python3")
                    .args(args)
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let outs: Vec<_> = runs
            .into_iter()
            .map(|c| c.wait_with_output().unwrap())
            .collect();
        stop.store(true, Ordering::Relaxed);
        let kills = storm.join().unwrap();
        for o in &outs {
            assert!(
                o.status.success(),
                "{kind}: a client failed after {kills} kills: {}{}\n{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr),
                tail(&k.log(), 30)
            );
        }
        let st = k.status().unwrap();
        assert!(kills >= 5, "only {kills} kills");
        assert!(st.recovered_connections >= 10, "{kind}: {st:?}");
        eprintln!(
            "{kind}: {kills} kills, {} recoveries",
            st.recovered_connections
        );
    }
}

/// A 48 MiB HTTPS download by curl through three kills and two upgrades
/// of hf-httpd: the file arrives whole and intact.
#[test]
fn https_download_through_kills_and_upgrades() {
    let pki = Pki::new();
    let site = TempDir::new("tls-dl");
    let files = make_site(site.path(), &[48 << 20]);
    let (path, want) = files[0].clone();
    let cmd = httpd_tls(&pki, site.path(), "ec");
    let mut k = Keeper::start(&[], &s(&cmd));
    let out = pki.dir.path().join("download.bin");
    let port = k.addr.port();
    let mut curl = Command::new("curl")
        .args([
            "-sS",
            "--fail",
            "--cacert",
            &pki.path("ca.pem"),
            "--resolve",
        ])
        .arg(format!("localhost:{port}:127.0.0.1"))
        .args(["--limit-rate", "12M", "--max-time", "90", "-o"])
        .arg(&out)
        .arg(format!("https://localhost:{port}{path}"))
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("curl");
    for i in 0..5 {
        std::thread::sleep(Duration::from_millis(500));
        if i % 2 == 0 {
            k.kill_and_wait();
        } else {
            let (code, o, e) = k.upgrade(&["--settle", "20", "--json"], &s(&cmd));
            assert_eq!(code, 0, "upgrade: {o}{e}\n{}", tail(&k.log(), 30));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(st) = curl.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = curl.kill();
            panic!("curl still running after 60 s\n{}", tail(&k.log(), 30));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    let _ = std::io::Read::read_to_string(&mut curl.stderr.take().unwrap(), &mut err);
    assert!(status.success(), "curl: {err}\n{}", tail(&k.log(), 30));
    let got = std::fs::read(&out).unwrap();
    assert!(
        got.len() == want.len() && got == want,
        "{} of {} bytes, body differs",
        got.len(),
        want.len()
    );
    let st = k.status().unwrap();
    assert_eq!((st.upgrades, st.recovered_connections), (2, 3), "{st:?}");
}

/// KeyUpdate both ways across kills, with `openssl s_client` (`K`: update
/// and ask the server to update too; `k`: update only): every answer
/// arrives (the count is the service's state blob, kept beside the TLS
/// session's), the server answers each `K` with its own KeyUpdate, and
/// workers killed between the updates hand the session on with the right
/// generation of keys.
#[test]
fn key_update_both_ways_across_kills() {
    let pki = Pki::new();
    let mut k = Keeper::start(&[], &s(&pki.testsvc("ec", &["--state-version", "1"])));
    let driver = format!(
        r#"
import subprocess, time, sys
p = subprocess.Popen(['openssl', 's_client', '-connect', '127.0.0.1:{port}', '-CAfile', {ca:?},
                      '-servername', 'localhost', '-msg'],
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
for s in sys.stdin:
    s = s.strip()
    if s == 'kill':
        print('kill', flush=True)
        sys.stdin.readline()  # the test says when the new worker is up
        continue
    p.stdin.write(s.encode() + b'\n'); p.stdin.flush(); time.sleep(0.3)
out, _ = p.communicate(timeout=20)
sys.stderr.write(out.decode())
"#,
        port = k.addr.port(),
        ca = pki.path("ca.pem"),
    );
    let steps = [
        "COUNT a", "K", "COUNT b", "kill", "COUNT c", "k", "kill", "COUNT d", "K", "kill",
        "COUNT e", "K", "COUNT f", "kill", "COUNT g",
    ];
    let mut child = Command::new("python3")
        .args(["-c", &driver])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(child.stdout.take().unwrap()));
    for step in steps {
        std::io::Write::write_all(&mut stdin, format!("{step}\n").as_bytes()).unwrap();
        if step == "kill" {
            assert_eq!(lines.next().unwrap().unwrap(), "kill");
            k.kill_and_wait();
            std::io::Write::write_all(&mut stdin, b"go\n").unwrap();
        }
    }
    drop(stdin);
    let o = child.wait_with_output().unwrap();
    let out = String::from_utf8_lossy(&o.stderr);
    let counts: Vec<&str> = out.lines().filter(|l| l.starts_with("COUNT ")).collect();
    assert_eq!(
        counts,
        [
            "COUNT a 0",
            "COUNT b 1",
            "COUNT c 2",
            "COUNT d 3",
            "COUNT e 4",
            "COUNT f 5",
            "COUNT g 6"
        ],
        "{out}\n{}",
        tail(&k.log(), 30)
    );
    let sent = out
        .matches(">>> TLS 1.3, Handshake [length 0005], KeyUpdate")
        .count();
    let got = out
        .matches("<<< TLS 1.3, Handshake [length 0005], KeyUpdate")
        .count();
    assert_eq!(
        (sent, got),
        (4, 3),
        "client sent {sent} KeyUpdates, got {got}:\n{out}"
    );
    let alerts = out
        .lines()
        .any(|l| l.starts_with("<<<") && l.contains("Alert") || l.contains(" alert "));
    assert!(!alerts, "the server sent an alert:\n{out}");
    assert_eq!(k.status().unwrap().recovered_connections, 4);
}

/// Session resumption with the service's ticket key: a ticket issued by a
/// worker resumes a session on its successor after a SIGKILL, and on the
/// new version after `holdfast upgrade`.
#[test]
fn sessions_resume_after_a_crash_and_an_upgrade() {
    let pki = Pki::new();
    let cmd = pki.testsvc("rsa", &[]);
    let mut k = Keeper::start(&[], &s(&cmd));
    let probe = format!(
        r#"
import socket, ssl, sys
ctx = ssl.create_default_context(cafile={ca:?})
session = None
for line in sys.stdin:
    s = ctx.wrap_socket(socket.create_connection(('127.0.0.1', {port}), timeout=10),
                        server_hostname='localhost', session=session)
    s.sendall(b'REQ 1 10 0\n')
    f = s.makefile('rb')
    assert f.readline() == b'RESP 1 10\n'
    f.read(11)
    session = s.session
    print(s.session_reused, flush=True)
    s.close()
"#,
        port = k.addr.port(),
        ca = pki.path("ca.pem"),
    );
    let mut child = Command::new("python3")
        .args(["-c", &probe])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(child.stdout.take().unwrap()));
    let mut connect = || {
        std::io::Write::write_all(&mut stdin, b"go\n").unwrap();
        lines.next().expect("probe output").unwrap()
    };
    assert_eq!(
        connect(),
        "False",
        "the first connection is a full handshake"
    );
    assert_eq!(connect(), "True", "resumed on the same worker");
    k.kill_and_wait();
    assert_eq!(connect(), "True", "resumed after a crash");
    let (code, o, e) = k.upgrade(&["--settle", "20", "--json"], &s(&cmd));
    assert_eq!(code, 0, "upgrade: {o}{e}");
    assert_eq!(connect(), "True", "resumed after an upgrade");
    let _ = child.kill();
    let _ = child.wait();
}

/// The blocking flavour (hf-testsvc without `--tokio`, a thread per
/// connection) runs the same TLS code: keep-alive sessions, a handshake
/// per request and resumed sessions all survive a SIGKILL every 30 ms.
#[test]
fn blocking_flavour_tls_under_a_kill_storm() {
    let pki = Pki::new();
    let mut k = Keeper::start(&[], &s(&pki.testsvc_blocking("ec", &[])));
    let mut clients: Vec<Client> = (0..2)
        .map(|c| {
            let sc = script(1_000_000 * (c + 1), 60, 6, 30_000, 70 + c);
            Client::start(&pki, k.addr, &format!("bl-ka{c}"), &sc, "keepalive", &[])
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(Client::ready)
        .collect();
    for (c, mode) in ["perconn", "resume"].into_iter().enumerate() {
        let sc = script(5_000_000 * (c as u64 + 1), 60, 1, 3_000, 80 + c as u64);
        clients.push(Client::start(
            &pki,
            k.addr,
            &format!("bl-{mode}"),
            &sc,
            mode,
            &[],
        ));
    }
    let (kills, done) = under_storm(&mut k, clients, Duration::from_millis(30));
    let replayed = k.log().matches("TLS handshake cut by a crash").count();
    eprintln!("blocking: {kills} kills, {replayed} handshakes replayed, clients: {done:?}");
    assert!(kills >= 10, "only {kills} kills");
    assert!(done[3].ends_with("reused 59"), "{done:?}");
    let st = k.status().unwrap();
    assert!(st.recovered_connections >= 10, "{st:?}");
}

/// What `ledger.py` (services/hf-httpd/cgi-bin) sends for `id` and `size`.
fn ledger_body(id: &str, size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(size + 32);
    while out.len() < size {
        let line = format!("{id}:{:010}\n", out.len());
        out.extend_from_slice(line.as_bytes());
    }
    out.truncate(size);
    out
}

/// CGI over HTTPS: programs that stream their answers slowly while the
/// worker is killed, once after each program started. Every answer
/// arrives whole over its TLS session, and every program ran exactly once
/// (its ledger line): held channels work through `TlsConn`.
#[test]
fn cgi_over_https_runs_once_through_kills() {
    let pki = Pki::new();
    let tmp = TempDir::new("tls-cgi");
    let (www, cgi) = (tmp.path().join("www"), tmp.path().join("cgi"));
    std::fs::create_dir_all(&www).unwrap();
    std::fs::create_dir_all(&cgi).unwrap();
    let examples =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../services/hf-httpd/cgi-bin");
    std::fs::copy(examples.join("ledger.py"), cgi.join("ledger.py")).unwrap();
    let mut cmd = httpd_tls(&pki, &www, "ec");
    cmd.extend(["--cgi-dir".to_string(), cgi.display().to_string()]);
    let mut k = Keeper::start(&[], &s(&cmd));
    let port = k.addr.port();
    for i in 0..3 {
        let id = format!("tls{i}");
        let curl = Command::new("curl")
            .args(["-sS", "--fail", "--max-time", "60", "--cacert", &pki.path("ca.pem")])
            .arg("--resolve")
            .arg(format!("localhost:{port}:127.0.0.1"))
            .arg(format!(
                "https://localhost:{port}/cgi-bin/ledger.py?id={id}&size=300000&pieces=10&delay_ms=40&wait_ms=200"
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        hf_tests::eventually(Duration::from_secs(10), "the program to start", || {
            std::fs::read_to_string(cgi.join("ledger.txt"))
                .unwrap_or_default()
                .contains(&id)
                .then_some(())
        });
        k.kill_and_wait();
        let o = curl.wait_with_output().unwrap();
        assert!(
            o.status.success(),
            "{id}: curl {}\n{}",
            String::from_utf8_lossy(&o.stderr),
            tail(&k.log(), 30)
        );
        assert!(
            o.stdout == ledger_body(&id, 300_000),
            "{id}: body differs ({} bytes)",
            o.stdout.len()
        );
        let runs = std::fs::read_to_string(cgi.join("ledger.txt"))
            .unwrap()
            .lines()
            .filter(|l| *l == id)
            .count();
        assert_eq!(runs, 1, "{id} ran {runs} times");
    }
    assert_eq!(k.status().unwrap().restarts, 3);
}

/// A client that stalls in the middle of its TLS handshake is closed
/// after hf-httpd's `--header-timeout`, like one stalling in a request
/// head; the worker goes on.
#[test]
fn a_stalled_https_handshake_is_closed_after_the_header_timeout() {
    use std::io::{Read, Write};
    let pki = Pki::new();
    let site = TempDir::new("tls-stall");
    std::fs::write(site.path().join("a.txt"), "a\n").unwrap();
    let mut cmd = httpd_tls(&pki, site.path(), "ec");
    cmd.extend(["--header-timeout".to_string(), "300".to_string()]);
    let k = Keeper::start(&[], &s(&cmd));
    let mut sock = std::net::TcpStream::connect(k.addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // The start of a ClientHello record, and nothing more.
    sock.write_all(&[22, 3, 1, 0, 200, 1, 0]).unwrap();
    let t0 = Instant::now();
    let mut buf = [0u8; 64];
    let n = sock.read(&mut buf).expect("closed, not reset");
    let waited = t0.elapsed();
    assert_eq!(n, 0, "closed without an answer");
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(5),
        "closed after {waited:?}"
    );
    assert_eq!(k.status().unwrap().restarts, 0);
}

/// `--tls-cert` takes a chain: hf-httpd sends the leaf and the
/// intermediate, and curl, which trusts only the root, verifies it.
#[test]
fn https_serves_a_certificate_chain() {
    let pki = Pki::new();
    let site = TempDir::new("tls-chain");
    std::fs::write(site.path().join("a.txt"), "chained\n").unwrap();
    let k = Keeper::start(&[], &s(&httpd_tls(&pki, site.path(), "chain")));
    let port = k.addr.port();
    let (code, out, err) = run_cmd(
        Command::new("curl")
            .args([
                "-sS",
                "--max-time",
                "20",
                "--cacert",
                &pki.path("ca.pem"),
                "--resolve",
            ])
            .arg(format!("localhost:{port}:127.0.0.1"))
            .arg(format!("https://localhost:{port}/a.txt")),
    );
    assert_eq!((code, out.as_str()), (0, "chained\n"), "{err}");
}
