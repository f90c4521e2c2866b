//! hf-ftpd under the keeper with real FTP clients (Python's ftplib, curl):
//! the protocol, workers SIGKILLed in the middle of downloads, uploads and
//! command sequences, and hostile input.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hf_tests::{bin, eventually, start_pass_through, wait_exit, Keeper, Proc, TempDir};

/// The ftplib side of the tests; `python3 ftp.py MODE ...`.
const DRIVER: &str = r#"
import ftplib, hashlib, io, os, random, socket, sys, threading, time, traceback

def connect(port, user='alice', pw='secret'):
    f = ftplib.FTP(timeout=15)
    f.connect('127.0.0.1', int(port))
    f.login(user, pw)
    return f

def use(f, mode):
    # ftplib picks EPSV/EPRT from the address family, PORT/PASV otherwise.
    f.set_pasv(mode != 'port')
    f.af = socket.AF_INET6 if mode == 'epsv' else socket.AF_INET

def get(f, name, rest=None):
    b = io.BytesIO()
    f.retrbinary('RETR ' + name, b.write, rest=rest)
    return b.getvalue()

def expect_error(code, fn, *a):
    try:
        fn(*a)
    except ftplib.all_errors as e:
        assert str(e).startswith(code), f'{fn.__name__}{a}: {e!r}, want {code}'
        return
    raise AssertionError(f'{fn.__name__}{a}: succeeded, want {code}')

def session(port, root):
    f = connect(port)
    assert f.getwelcome().startswith('220'), f.getwelcome()
    assert f.sendcmd('SYST').startswith('215')
    feat = f.sendcmd('FEAT')
    for x in ('EPSV', 'MLST', 'REST STREAM', 'SIZE', 'MDTM', 'UTF8'):
        assert x in feat, feat
    assert f.sendcmd('OPTS UTF8 ON').startswith('200')
    assert f.pwd() == '/'
    assert f.mkd('docs') == '/docs'
    f.cwd('docs'); assert f.pwd() == '/docs'
    f.sendcmd('CDUP'); assert f.pwd() == '/'
    rnd = random.Random(7)
    files = {}
    for mode in ('pasv', 'epsv', 'port'):
        use(f, mode)
        data = rnd.randbytes(1_500_000 + len(mode))
        name = f'up-{mode}.bin'
        f.storbinary('STOR ' + name, io.BytesIO(data))
        with open(os.path.join(root, name), 'rb') as fh:
            assert fh.read() == data, f'{mode}: stored file differs'
        back = get(f, name)
        assert hashlib.sha256(back).digest() == hashlib.sha256(data).digest(), f'{mode}: RETR differs'
        assert f.size(name) == len(data)
        assert len(f.sendcmd('MDTM ' + name).split()[1]) == 14
        files[name] = data
        names = f.nlst()
        assert set(names) >= set(files) | {'docs', 'hello.txt'}, names
        lines = []
        f.retrlines('LIST', lines.append)
        assert any(l.startswith('d') and l.endswith(' docs') for l in lines), lines
        assert any(l.endswith(' ' + name) and str(len(data)) in l for l in lines), lines
        facts = dict(f.mlsd())
        assert facts[name]['type'] == 'file' and int(facts[name]['size']) == len(data), facts
        assert facts['docs']['type'] == 'dir', facts
    use(f, 'pasv')
    # REST + RETR, APPE, TYPE A (bytes unchanged), MLST.
    assert get(f, 'up-pasv.bin', rest=1000) == files['up-pasv.bin'][1000:]
    f.storbinary('APPE up-pasv.bin', io.BytesIO(b'tail'))
    assert get(f, 'up-pasv.bin') == files['up-pasv.bin'] + b'tail'
    f.voidcmd('TYPE A')
    assert get(f, 'hello.txt') == b'hello\nworld\n'
    f.voidcmd('TYPE I')
    assert 'type=file;size=12;' in f.sendcmd('MLST hello.txt')
    # EPRT by hand (ftplib would send it with the IPv6 family number).
    ls = socket.socket(); ls.bind(('127.0.0.1', 0)); ls.listen(1)
    assert f.sendcmd(f'EPRT |1|127.0.0.1|{ls.getsockname()[1]}|').startswith('200')
    assert f.sendcmd('RETR hello.txt').startswith('150')
    c, _ = ls.accept()
    got = b''
    while (b := c.recv(4096)):
        got += b
    c.close(); ls.close()
    assert got == b'hello\nworld\n', got
    assert f.voidresp().startswith('226')
    # Rename, delete, remove a directory.
    f.rename('up-port.bin', 'docs/moved.bin')
    assert f.nlst('docs') == ['moved.bin'], f.nlst('docs')
    expect_error('550', f.size, 'up-port.bin')
    f.delete('docs/moved.bin')
    expect_error('550', f.rmd, 'nothere')
    f.rmd('docs')
    assert not os.path.exists(os.path.join(root, 'docs'))
    expect_error('550', f.delete, 'docs')
    assert f.quit().startswith('221')

    # Anonymous: reads, never writes.
    a = connect(port, 'anonymous', 'guest@example.org')
    assert get(a, 'hello.txt') == b'hello\nworld\n'
    expect_error('550', a.storbinary, 'STOR x.bin', io.BytesIO(b'x'))
    expect_error('550', a.mkd, 'x')
    expect_error('550', a.delete, 'hello.txt')
    expect_error('550', a.rename, 'hello.txt', 'y')
    assert 'perm=r;' in a.sendcmd('MLST hello.txt')
    a.quit()
    expect_error('530', connect, port, 'alice', 'wrong')
    expect_error('530', connect, port, 'mallory', 'secret')
    print('ok')

def pace(n, rate, t0):
    due = n / rate - (time.time() - t0)
    if due > 0:
        time.sleep(due)

def retr_slow(port, name, rate, path):
    rate = float(rate)
    f = connect(port)
    f.voidcmd('TYPE I')
    s = f.transfercmd('RETR ' + name)
    h = hashlib.sha256(); n = 0; last = 0; t0 = time.time()
    while (b := s.recv(65536)):
        h.update(b); n += len(b)
        if n - last >= 1 << 20:
            print('progress', n, flush=True); last = n
        pace(n, rate, t0)
    s.close()
    assert f.voidresp().startswith('226')
    with open(path, 'rb') as fh:
        want = fh.read()
    assert n == len(want), f'got {n} bytes, want {len(want)}'
    assert h.digest() == hashlib.sha256(want).digest(), 'downloaded bytes differ'
    f.quit()
    print('ok', n, flush=True)

def stor_slow(port, name, rate, path):
    rate = float(rate)
    with open(path, 'rb') as fh:
        data = fh.read()
    f = connect(port)
    f.voidcmd('TYPE I')
    s = f.transfercmd('STOR ' + name)
    n = 0; last = 0; t0 = time.time()
    while n < len(data):
        n += s.send(data[n:n + 65536])
        if n - last >= 1 << 20:
            print('progress', n, flush=True); last = n
        pace(n, rate, t0)
    s.close()
    assert f.voidresp().startswith('226')
    f.quit()
    print('ok', n, flush=True)

def chaos(port, secs, sessions):
    deadline = time.time() + float(secs)
    errors, done = [], [0] * int(sessions)
    def run(i):
        n = 0
        try:
            rnd = random.Random(i)
            f = connect(port)
            d = f'c{i}'
            assert f.mkd(d) == '/' + d
            f.cwd(d)
            # Half the sessions passive, half active: the keeper accepts a
            # passive data connection and holds it in one step, an active
            # one is held before it connects; no kill instant loses either.
            use(f, 'pasv' if i % 2 else 'port')
            while time.time() < deadline:
                name = f'f{n}'
                data = rnd.randbytes(rnd.randint(0, 300_000))
                f.storbinary('STOR ' + name, io.BytesIO(data))
                assert f.size(name) == len(data)
                assert get(f, name) == data, 'RETR differs'
                assert name in f.nlst()
                lines = []
                f.retrlines('LIST', lines.append)
                assert any(l.endswith(' ' + name) for l in lines), lines
                f.mkd('sub')
                f.rename(name, 'sub/g')
                f.cwd('sub')
                assert f.pwd() == f'/{d}/sub'
                f.delete('g')
                f.cwd('..')
                f.rmd('sub')
                f.voidcmd('NOOP')
                n += 1
            f.quit()
            done[i] = n
        except Exception as e:
            errors.append(f'session {i} after {n} rounds: {e!r}\n{traceback.format_exc()}')
    ts = [threading.Thread(target=run, args=(i,)) for i in range(int(sessions))]
    for t in ts: t.start()
    for t in ts: t.join()
    if errors:
        sys.exit('\n'.join(errors))
    print('ok', sum(done), flush=True)

globals()[sys.argv[1]](*sys.argv[2:])
"#;

/// A served directory, a users file and the driver script.
struct Site {
    dir: TempDir,
}

impl Site {
    fn new(tag: &str) -> Site {
        let dir = TempDir::new(tag);
        std::fs::create_dir(dir.path().join("root")).unwrap();
        std::fs::write(dir.path().join("root/hello.txt"), b"hello\nworld\n").unwrap();
        std::fs::write(dir.path().join("users"), "# test accounts\nalice:secret\n").unwrap();
        std::fs::write(dir.path().join("ftp.py"), DRIVER).unwrap();
        Site { dir }
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    fn ftpd_args(&self) -> Vec<String> {
        vec![
            "--root".into(),
            self.root().display().to_string(),
            "--users".into(),
            self.dir.path().join("users").display().to_string(),
            "--anonymous".into(),
        ]
    }

    /// hf-ftpd under `holdfast run`.
    fn keeper(&self) -> Keeper {
        let mut cmd = vec![bin("hf-ftpd").display().to_string()];
        cmd.extend(self.ftpd_args());
        let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
        Keeper::start(&[], &cmd)
    }

    /// A file of `len` pseudo-random bytes in the root.
    fn make_file(&self, name: &str, len: usize) -> Vec<u8> {
        let data = pattern(len, name.len() as u64);
        std::fs::write(self.root().join(name), &data).unwrap();
        data
    }

    /// Starts the ftplib driver: `python3 ftp.py MODE ARGS...`.
    fn driver(&self, args: &[&str]) -> Driver {
        let mut child = Command::new("python3")
            .arg(self.dir.path().join("ftp.py"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("python3");
        let progress = Arc::new(AtomicUsize::new(0));
        let out = Arc::new(Mutex::new(String::new()));
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        {
            let (progress, out) = (progress.clone(), out.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if let Some(n) = line.strip_prefix("progress ") {
                        progress.store(n.trim().parse().unwrap_or(0), Ordering::Relaxed);
                    }
                    out.lock().unwrap().push_str(&(line + "\n"));
                }
            });
        }
        let err = Arc::new(Mutex::new(String::new()));
        {
            let err = err.clone();
            std::thread::spawn(move || {
                let mut s = String::new();
                let _ = BufReader::new(stderr).read_to_string(&mut s);
                *err.lock().unwrap() = s;
            });
        }
        Driver {
            child: Proc(child),
            progress,
            out,
            err,
        }
    }
}

struct Driver {
    child: Proc,
    progress: Arc<AtomicUsize>,
    out: Arc<Mutex<String>>,
    err: Arc<Mutex<String>>,
}

impl Driver {
    fn progress(&self) -> usize {
        self.progress.load(Ordering::Relaxed)
    }

    fn running(&mut self) -> bool {
        matches!(self.child.0.try_wait(), Ok(None))
    }

    /// Waits for the driver to exit and panics, with its output and `log`,
    /// unless it printed `ok`; returns its last line.
    fn success(mut self, timeout: Duration, log: impl Fn() -> String) -> String {
        let st = wait_exit(&mut self.child.0, timeout);
        // Let the reader threads drain the pipes.
        std::thread::sleep(Duration::from_millis(50));
        let out = self.out.lock().unwrap().clone();
        let err = self.err.lock().unwrap().clone();
        let last = out.lines().last().unwrap_or("").to_owned();
        if !matches!(st, Some(s) if s.success()) || !last.starts_with("ok") {
            panic!(
                "ftplib driver failed ({st:?})\nstdout:\n{out}\nstderr:\n{err}\nserver log:\n{}",
                log()
            );
        }
        last
    }
}

/// Deterministic pseudo-random bytes (xorshift).
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15 ^ seed.wrapping_mul(0x2545_F491_4F6C_DD1D);
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

fn port(a: SocketAddr) -> String {
    a.port().to_string()
}

/// Every command ftplib uses, both login kinds, PASV, EPSV, PORT and EPRT,
/// with every transferred byte compared.
#[test]
fn ftplib_session_under_keeper() {
    let site = Site::new("ftp-session");
    let k = site.keeper();
    let root = site.root().display().to_string();
    site.driver(&["session", &port(k.addr), &root])
        .success(Duration::from_secs(20), || k.log());
    assert_eq!(k.status().unwrap().restarts, 0);
}

/// The same binary alone (pass-through mode) serves the same session.
#[test]
fn ftplib_session_without_keeper() {
    let site = Site::new("ftp-alone");
    let (child, addr) = start_pass_through(
        Command::new(bin("hf-ftpd"))
            .args(site.ftpd_args())
            .args(["--listen", "127.0.0.1:0"]),
    );
    let _child = Proc(child);
    let root = site.root().display().to_string();
    site.driver(&["session", &port(addr), &root])
        .success(Duration::from_secs(20), String::new);
}

/// curl downloads and uploads, passive and active.
#[test]
fn curl_downloads_and_uploads() {
    if Command::new("curl").arg("--version").output().is_err() {
        eprintln!("curl not installed; skipped");
        return;
    }
    let site = Site::new("ftp-curl");
    let want = site.make_file("file.bin", 3_000_000);
    let k = site.keeper();
    let base = format!("ftp://alice:secret@127.0.0.1:{}", k.addr.port());
    let out = site.dir.path().join("out.bin");
    let src = site.dir.path().join("src.bin");
    let up = pattern(2_000_001, 99);
    std::fs::write(&src, &up).unwrap();
    for (i, extra) in [&[][..], &["--ftp-port", "127.0.0.1"][..]]
        .iter()
        .enumerate()
    {
        let run = |args: &[&str]| {
            let o = Command::new("curl")
                .args(["-sS", "--max-time", "15"])
                .args(*extra)
                .args(args)
                .output()
                .expect("curl");
            assert!(
                o.status.success(),
                "curl {args:?} {extra:?}: {}\nserver log:\n{}",
                String::from_utf8_lossy(&o.stderr),
                k.log()
            );
            o.stdout
        };
        run(&[&format!("{base}/file.bin"), "-o", out.to_str().unwrap()]);
        assert!(std::fs::read(&out).unwrap() == want, "download {i} differs");
        let name = format!("up{i}.bin");
        run(&["-T", src.to_str().unwrap(), &format!("{base}/{name}")]);
        assert!(
            std::fs::read(site.root().join(&name)).unwrap() == up,
            "upload {i} differs"
        );
        let list = String::from_utf8(run(&["-l", &format!("{base}/")])).unwrap();
        assert!(list.lines().any(|l| l == name), "NLST: {list}");
    }
    // Anonymous, through curl's default login.
    let anon = format!("ftp://127.0.0.1:{}/hello.txt", k.addr.port());
    let o = Command::new("curl").args(["-sS", &anon]).output().unwrap();
    assert_eq!(o.stdout, b"hello\nworld\n");
    assert_eq!(k.status().unwrap().restarts, 0);
}

/// Kills the active worker each time `driver`'s progress passes one of
/// `marks`, checking that the kill lands before the end (`total`).
fn kill_at(k: &mut Keeper, d: &Driver, marks: &[usize], total: usize) {
    for &at in marks {
        eventually(Duration::from_secs(15), "transfer progress", || {
            (d.progress() >= at).then_some(())
        });
        k.kill_and_wait();
        let now = d.progress();
        assert!(
            now < total - (4 << 20),
            "killed too late to interrupt the transfer ({now} of {total} bytes)"
        );
    }
}

/// A 64 MiB download read slowly while the worker is killed four times:
/// the client never sees an error and gets the file byte for byte — the
/// new workers continue from the data connection's position, they do not
/// start over (that would repeat bytes).
#[test]
fn download_survives_kills() {
    let site = Site::new("ftp-retr");
    const LEN: usize = 64 << 20;
    site.make_file("big.bin", LEN);
    let mut k = site.keeper();
    let path = site.root().join("big.bin").display().to_string();
    let d = site.driver(&["retr_slow", &port(k.addr), "big.bin", "25e6", &path]);
    kill_at(&mut k, &d, &[6 << 20, 20 << 20, 34 << 20, 48 << 20], LEN);
    d.success(Duration::from_secs(15), || k.log());
    let s = k.status().unwrap();
    assert_eq!(s.restarts, 4);
    assert!(s.recovered_connections >= 4, "{}", s.recovered_connections);
}

/// A 64 MiB upload sent slowly while the worker is killed four times: the
/// stored file is exact — every byte the dead workers wrote is kept, the
/// rest is received by the next.
#[test]
fn upload_survives_kills() {
    let site = Site::new("ftp-stor");
    const LEN: usize = 64 << 20;
    let src = site.dir.path().join("src.bin");
    let data = pattern(LEN, 5);
    std::fs::write(&src, &data).unwrap();
    let mut k = site.keeper();
    let d = site.driver(&[
        "stor_slow",
        &port(k.addr),
        "up.bin",
        "25e6",
        src.to_str().unwrap(),
    ]);
    kill_at(&mut k, &d, &[6 << 20, 20 << 20, 34 << 20, 48 << 20], LEN);
    d.success(Duration::from_secs(15), || k.log());
    let got = std::fs::read(site.root().join("up.bin")).unwrap();
    assert_eq!(got.len(), LEN, "stored length");
    assert!(got == data, "stored bytes differ");
    assert_eq!(k.status().unwrap().restarts, 4);
}

/// Eight ftplib sessions run command sequences (uploads, downloads,
/// listings, renames, deletes) while the active worker is killed every
/// 150–250 ms: every session completes without a single error. Half the
/// sessions use passive data connections (the keeper accepts and holds
/// them in one step), half active ones (held before they connect).
#[test]
fn concurrent_sessions_survive_kills_between_and_during_commands() {
    let site = Site::new("ftp-chaos");
    let mut k = site.keeper();
    let mut d = site.driver(&["chaos", &port(k.addr), "6", "8"]);
    let t0 = Instant::now();
    let mut seed = 0x5eed_u64;
    while d.running() && t0.elapsed() < Duration::from_secs(8) {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(Duration::from_millis(150 + seed % 101));
        k.kill_active();
    }
    let last = d.success(Duration::from_secs(15), || k.log());
    let rounds: usize = last.trim_start_matches("ok").trim().parse().unwrap();
    let s = k.status().unwrap();
    eprintln!(
        "{rounds} rounds, {} restarts, {} connections recovered",
        s.restarts, s.recovered_connections
    );
    assert!(s.restarts >= 15, "only {} restarts", s.restarts);
    assert!(s.recovered_connections > 0);
    assert!(rounds >= 40, "only {rounds} rounds completed");
}

/// A raw control connection, for input no real client sends.
struct Raw {
    r: BufReader<TcpStream>,
}

impl Raw {
    fn connect(addr: SocketAddr) -> Raw {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut c = Raw {
            r: BufReader::new(s),
        };
        assert_eq!(c.reply().0, 220);
        c
    }

    /// One reply: its code and its text (all lines).
    fn reply(&mut self) -> (u16, String) {
        let mut text = String::new();
        loop {
            let mut line = String::new();
            let n = self.r.read_line(&mut line).expect("reply");
            assert!(n > 0, "connection closed; so far: {text:?}");
            text.push_str(&line);
            let b = line.as_bytes();
            // The last line of a reply: three digits and a space.
            if b.len() >= 4 && b[..3].iter().all(u8::is_ascii_digit) && b[3] == b' ' {
                return (line[..3].parse().unwrap(), text);
            }
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.r.get_mut().write_all(bytes).unwrap();
    }

    /// Sends `line` and returns the reply's code (asserting it is `want`).
    fn cmd(&mut self, line: &str, want: u16) -> String {
        self.send(format!("{line}\r\n").as_bytes());
        let (code, text) = self.reply();
        assert_eq!(code, want, "{line:?} → {text:?}");
        text
    }

    /// `PASV` and the data connection to it.
    fn pasv(&mut self) -> TcpStream {
        let text = self.cmd("PASV", 227);
        let inner = &text[text.find('(').unwrap() + 1..text.find(')').unwrap()];
        let n: Vec<u16> = inner.split(',').map(|x| x.parse().unwrap()).collect();
        let s = TcpStream::connect(("127.0.0.1", n[4] << 8 | n[5])).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    }
}

/// Path traversal, symlinks out of the root, commands out of order and
/// garbage: clear protocol errors, nothing outside the root read or
/// written, and the server — same worker, no crash — keeps serving.
#[test]
fn hostile_input_gets_protocol_errors_and_never_escapes_the_root() {
    let site = Site::new("ftp-hostile");
    let outside = site.dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("secret"), b"top secret").unwrap();
    let root = site.root();
    std::os::unix::fs::symlink(outside.join("secret"), root.join("link")).unwrap();
    std::os::unix::fs::symlink(&outside, root.join("outdir")).unwrap();
    std::os::unix::fs::symlink(outside.join("new"), root.join("dangling")).unwrap();
    let k = site.keeper();
    let mut c = Raw::connect(k.addr);

    // Before login.
    c.cmd("RETR hello.txt", 530);
    c.cmd("CWD /", 530);
    c.cmd("PASS x", 503);
    c.cmd("FOO bar", 502);
    c.cmd("SYST", 215);
    c.cmd("USER alice", 331);
    c.cmd("PASS secret", 230);

    // Out of order and bad arguments.
    c.cmd("RNTO x", 503);
    c.cmd("XYZZY", 502);
    c.cmd("TYPE", 501);
    c.cmd("TYPE Q", 504);
    c.cmd("MODE B", 504);
    c.cmd("REST -1", 501);
    c.cmd("PORT 1,2,3", 501);
    c.cmd("PORT 10,9,8,7,100,100", 501); // someone else's address: no bounce
    c.cmd("EPRT |9|x|1|", 501);
    c.cmd("RETR hello.txt", 425); // no PORT or PASV yet
    c.cmd("RETR", 501);
    c.cmd("MKD", 501);
    c.cmd("DELE", 501);
    c.cmd("1234", 500);
    c.send(b"RETR \xff\xfe\r\n");
    assert_eq!(c.reply().0, 501);
    c.send(b"\x00\x01\x02\r\n");
    assert_eq!(c.reply().0, 500);
    // An overlong line, in one piece and trickled: one 500 each, then on.
    c.send(&[b'A'; 10_000]);
    c.send(b"\r\n");
    assert_eq!(c.reply().0, 500);
    c.cmd("NOOP", 200);
    c.send(b"NOOP ");
    for _ in 0..20 {
        c.send(&[b'x'; 1000]);
    }
    c.send(b"\r\nNOOP\r\n");
    assert_eq!(c.reply().0, 500);
    assert_eq!(c.reply().0, 200);

    // Traversal: lexically clamped at the root.
    c.cmd("CWD ../../../..", 250);
    assert!(c.cmd("PWD", 257).contains("\"/\""));
    c.cmd("SIZE ../../etc/passwd", 550);
    c.cmd("SIZE /etc/passwd", 550);
    c.cmd("MDTM ../users", 550);
    c.cmd("RETR ../../../../etc/passwd", 550);
    c.cmd("RETR /etc/passwd", 550);
    // Symlinks out of the root lead nowhere.
    c.cmd("RETR link", 550);
    c.cmd("SIZE link", 550);
    c.cmd("CWD outdir", 550);
    c.cmd("RETR outdir/secret", 550);
    c.cmd("MLST outdir/secret", 550);
    c.cmd("STOR outdir/evil", 553);
    c.cmd("STOR dangling", 553);
    c.cmd("STOR link", 553);
    c.cmd("MKD outdir/x", 550);
    c.cmd("RNFR hello.txt", 350);
    c.cmd("RNTO outdir/stolen", 550);
    c.cmd("RMD outdir/..", 550);
    c.cmd("RMD /", 550);
    assert_eq!(
        std::fs::read(outside.join("secret")).unwrap(),
        b"top secret"
    );
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 1);
    assert!(!outside.join("new").exists());
    assert!(root.join("hello.txt").exists());

    // A listing shows the links, nothing about what they point to.
    let mut d = c.pasv();
    c.cmd("LIST", 150);
    let mut list = String::new();
    d.read_to_string(&mut list).unwrap();
    assert_eq!(c.reply().0, 226);
    assert!(
        list.contains("hello.txt") && list.contains("link"),
        "{list}"
    );
    assert!(
        !list.contains(" 10 "),
        "size of the outside file leaked: {list}"
    );

    // Still the same worker, still serving.
    c.cmd("NOOP", 200);
    let mut d = c.pasv();
    c.cmd("RETR hello.txt", 150);
    let mut got = Vec::new();
    d.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"hello\nworld\n");
    assert_eq!(c.reply().0, 226);
    c.cmd("QUIT", 221);
    let s = k.status().unwrap();
    assert_eq!(s.restarts, 0, "a worker died:\n{}", k.log());
}

/// The session is in the committed state blob: a new worker knows the
/// login, directory, type and a pending RNFR and REST without being told.
#[test]
fn session_state_survives_a_kill_between_commands() {
    let site = Site::new("ftp-state");
    site.make_file("data.bin", 100_000);
    std::fs::create_dir(site.root().join("sub")).unwrap();
    std::fs::write(site.root().join("sub/a.txt"), b"0123456789").unwrap();
    let mut k = site.keeper();
    let mut c = Raw::connect(k.addr);
    c.cmd("USER alice", 331);
    k.kill_and_wait();
    c.cmd("PASS secret", 230);
    c.cmd("CWD sub", 250);
    c.cmd("TYPE I", 200);
    c.cmd("RNFR a.txt", 350);
    k.kill_and_wait();
    c.cmd("RNTO b.txt", 250);
    assert!(c.cmd("PWD", 257).contains("\"/sub\""));
    c.cmd("REST 4", 350);
    let mut d = c.pasv();
    k.kill_and_wait();
    // The same passive listener, taken back by the new worker.
    c.cmd("RETR b.txt", 150);
    let mut got = Vec::new();
    d.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"456789");
    assert_eq!(c.reply().0, 226);
    c.cmd("QUIT", 221);
    assert_eq!(k.status().unwrap().restarts, 3);
}

/// `ABOR` in the middle of a download, sent plainly and the way ftplib
/// sends it (its last byte as TCP urgent data): `426` for the transfer,
/// `226` for the `ABOR`, and the session goes on.
#[test]
fn abor_stops_a_download_and_the_session_goes_on() {
    let site = Site::new("ftp-abor");
    site.make_file("big.bin", 64 << 20);
    let k = site.keeper();
    let mut c = Raw::connect(k.addr);
    c.cmd("USER alice", 331);
    c.cmd("PASS secret", 230);
    c.cmd("TYPE I", 200);
    for urgent in [false, true] {
        let mut d = c.pasv();
        c.cmd("RETR big.bin", 150);
        let mut buf = vec![0u8; 1 << 20];
        d.read_exact(&mut buf).unwrap();
        if urgent {
            c.send(b"ABOR\r");
            rustix::net::send(c.r.get_ref(), b"\n", rustix::net::SendFlags::OOB).unwrap();
        } else {
            c.send(b"ABOR\r\n");
        }
        assert_eq!(c.reply().0, 426, "urgent: {urgent}");
        assert_eq!(c.reply().0, 226, "urgent: {urgent}");
        drop(d);
        c.cmd("NOOP", 200);
    }
    let mut d = c.pasv();
    c.cmd("RETR hello.txt", 150);
    let mut got = Vec::new();
    d.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"hello\nworld\n");
    assert_eq!(c.reply().0, 226);
    c.cmd("QUIT", 221);
    assert_eq!(k.status().unwrap().restarts, 0);
}

/// An FTP session with a download in progress survives an upgrade to a new
/// version (the session moves at its next commit point, with its state
/// blob and data connection), then a kill of the new version.
#[test]
fn download_survives_an_upgrade_then_a_kill() {
    let site = Site::new("ftp-upgrade");
    const LEN: usize = 64 << 20;
    site.make_file("big.bin", LEN);
    let mut k = site.keeper();
    let path = site.root().join("big.bin").display().to_string();
    let d = site.driver(&["retr_slow", &port(k.addr), "big.bin", "25e6", &path]);
    eventually(Duration::from_secs(15), "transfer progress", || {
        (d.progress() >= 8 << 20).then_some(())
    });
    let mut cmd = vec![bin("hf-ftpd").display().to_string()];
    cmd.extend(site.ftpd_args());
    let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
    let (code, out, err) = k.upgrade(&["--drain-timeout", "300"], &cmd);
    assert_eq!(code, 0, "upgrade: {out}{err}");
    // The transfer outlived the drain timeout: it was taken over mid-RETR
    // like after a crash, and the old version is gone.
    let s = k.wait_for("the old version gone", |s| {
        s.workers.iter().all(|w| w.generation == 2)
    });
    assert!(
        d.progress() < LEN - (8 << 20),
        "the download ended before the upgrade finished"
    );
    assert_eq!(s.upgrades, 1);
    kill_at(&mut k, &d, &[d.progress() + (8 << 20)], LEN);
    d.success(Duration::from_secs(15), || k.log());
    assert!(k.status().unwrap().restarts >= 1);
}
