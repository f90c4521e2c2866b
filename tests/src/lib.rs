//! # hf-tests — the harness behind holdfast's integration tests
//!
//! Tests here start the real `holdfast` keeper with real services
//! (`hf-httpd`, `hf-testsvc`), drive them with real clients, SIGKILL workers
//! at awkward moments and check every byte. Helpers wait for events
//! (`eventually`) instead of sleeping blindly.
//!
//! The binaries are taken from the cargo target directory the tests run
//! from, so build the workspace first (`cargo test --workspace` does).

#![forbid(unsafe_code)]

pub mod http;
pub mod pki;
pub mod site;
pub mod testsvc;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub use hf_keeper::status::{Phase, Role, Snapshot};

/// Path of a workspace binary, next to the test executable's directory.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} not built (run `cargo build --workspace` with the same profile)",
        p.display()
    );
    p
}

/// The Python that has the test clients' libraries (`websockets`):
/// `$HOLDFAST_PYTHON`, else the venv `.ci/run` makes in `target/pyenv`,
/// else `python3`.
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("HOLDFAST_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/pyenv/bin/python3");
    if venv.exists() {
        return venv;
    }
    PathBuf::from("python3")
}

/// Waits (at most 60 s) for a verifying client that prints `ok …` and
/// exits 0; panics with its output and the keeper's log tail otherwise.
/// Returns its stdout.
pub fn finish_client(mut child: Child, k: &Keeper) -> String {
    let status = wait_exit(&mut child, Duration::from_secs(60)).expect("client ends");
    let mut out = String::new();
    let mut err = String::new();
    if let Some(mut o) = child.stdout.take() {
        let _ = std::io::Read::read_to_string(&mut o, &mut out);
    }
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut err);
    }
    assert!(
        status.success() && out.starts_with("ok"),
        "client failed: {status}\nstdout: {out}\nstderr: {err}\nkeeper log tail:\n{}",
        tail(&k.log(), 40)
    );
    out
}

/// The last `n` lines of `s`.
pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A script of `tests/py`.
pub fn py_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("py").join(name)
}

/// Polls `cond` until it returns `Some`, or panics with `what` after `timeout`.
pub fn eventually<T>(timeout: Duration, what: &str, mut cond: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = cond() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for: {what}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A directory removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "hf-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running keeper with its worker command; killed (with its workers) on drop.
pub struct Keeper {
    child: Child,
    pub control: PathBuf,
    pub addr: SocketAddr,
    _dir: TempDir,
    log: PathBuf,
}

impl Keeper {
    /// Starts `holdfast run --listen 127.0.0.1:0 EXTRA... -- CMD...` and waits
    /// until a worker serves.
    pub fn start(extra: &[&str], cmd: &[&str]) -> Keeper {
        Keeper::start_with(None, extra, cmd)
    }

    /// [`Keeper::start`] with the control socket at `control` (default: in
    /// the keeper's temporary directory).
    pub fn start_with(control: Option<PathBuf>, extra: &[&str], cmd: &[&str]) -> Keeper {
        let dir = TempDir::new("keeper");
        let control = control.unwrap_or_else(|| dir.path().join("control.sock"));
        let log = dir.path().join("keeper.log");
        let logf = std::fs::File::create(&log).expect("log file");
        let child = Command::new(bin("holdfast"))
            .arg("run")
            .args(["--listen", "127.0.0.1:0", "--control"])
            .arg(&control)
            .args(extra)
            .arg("--")
            .args(cmd)
            .env("HOLDFAST_LOG", "info,holdfast=debug")
            .stdin(Stdio::null())
            .stdout(logf.try_clone().expect("log"))
            .stderr(logf)
            .spawn()
            .expect("start holdfast");
        let mut k = Keeper {
            child,
            control,
            addr: "127.0.0.1:1".parse().unwrap(),
            _dir: dir,
            log,
        };
        let snap = k.wait_for("a serving worker", |s| s.phase == Phase::Serving);
        k.addr = snap.listeners[0].parse().expect("listener address");
        k
    }

    pub fn status(&self) -> std::io::Result<Snapshot> {
        hf_keeper::status::query(&self.control)
    }

    /// Waits until the keeper's snapshot satisfies `cond`, and returns it.
    pub fn wait_for(&mut self, what: &str, cond: impl Fn(&Snapshot) -> bool) -> Snapshot {
        let timeout = Duration::from_secs(20);
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!(
                    "keeper exited ({st}) while waiting for {what}; log:\n{}",
                    self.log()
                );
            }
            if let Ok(s) = self.status() {
                if cond(&s) {
                    return s;
                }
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Pid of the active worker.
    pub fn active_pid(&mut self) -> u32 {
        let s = self.wait_for("an active worker", |s| {
            s.workers.iter().any(|w| w.role == Role::Active)
        });
        s.workers
            .iter()
            .find(|w| w.role == Role::Active)
            .map(|w| w.pid)
            .expect("active")
    }

    /// SIGKILLs the active worker; returns its pid.
    pub fn kill_active(&mut self) -> u32 {
        let pid = self.active_pid();
        kill9(pid);
        pid
    }

    /// Kills the active worker and waits until another one is active.
    pub fn kill_and_wait(&mut self) -> u32 {
        let pid = self.kill_active();
        self.wait_for("a new active worker", |s| {
            s.workers
                .iter()
                .any(|w| w.role == Role::Active && w.pid != pid)
        });
        pid
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs `holdfast upgrade --control … ARGS [-- CMD…]` to its end:
    /// (exit code, stdout, stderr).
    pub fn upgrade(&self, args: &[&str], cmd: &[&str]) -> (i32, String, String) {
        let mut c = Command::new(bin("holdfast"));
        c.arg("upgrade")
            .arg("--control")
            .arg(&self.control)
            .args(args);
        if !cmd.is_empty() {
            c.arg("--").args(cmd);
        }
        run_cmd(&mut c)
    }

    /// The keeper's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits up to `timeout` for the keeper to exit by itself; panics with
    /// its log if it is still running then.
    pub fn exit_within(&mut self, timeout: Duration) -> std::process::ExitStatus {
        wait_exit(&mut self.child, timeout).unwrap_or_else(|| {
            panic!(
                "keeper still running after {timeout:?}; log:\n{}",
                self.log()
            )
        })
    }

    /// Whether the keeper process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends SIGTERM and waits for the keeper to exit.
    pub fn stop(mut self) -> std::process::ExitStatus {
        let _ = rustix::process::kill_process(
            rustix::process::Pid::from_raw(self.child.id() as i32).expect("pid"),
            rustix::process::Signal::TERM,
        );
        self.child.wait().expect("wait keeper")
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// SIGKILL to `pid` (ignores a process already gone).
pub fn kill9(pid: u32) {
    if let Some(p) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
    }
}

/// Runs a command to completion, returning (exit code, stdout, stderr).
pub fn run_cmd(cmd: &mut Command) -> (i32, String, String) {
    let out = cmd.stdin(Stdio::null()).output().expect("run command");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Starts a service without a keeper and returns it with the address it
/// printed on stderr (`... listening on ADDR` or `listen=ADDR`).
pub fn start_pass_through(cmd: &mut Command) -> (Child, SocketAddr) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("service exited before listening")
            .expect("read stderr");
        // Log lines may be coloured (`listen\x1b[0m\x1b[2m=\x1b[0mADDR`):
        // strip the escapes before looking for the address.
        let line = strip_ansi(&line);
        let tail = line
            .rsplit_once("listening on ")
            .map(|(_, a)| a)
            .or_else(|| {
                line.split_once("listen=")
                    .map(|(_, a)| a.split_whitespace().next().unwrap_or(""))
            });
        if let Some(a) = tail.and_then(|a| strip_ansi(a).parse().ok()) {
            break a;
        }
    };
    // Keep draining stderr so the service never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (child, addr)
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::new();
    let mut esc = false;
    for ch in s.chars() {
        match (esc, ch) {
            (false, '\x1b') => esc = true,
            (true, 'm') => esc = false,
            (true, _) => {}
            (false, c) => out.push(c),
        }
    }
    out.trim().to_owned()
}

/// Asks the keeper at `control` until its snapshot satisfies `cond`.
pub fn wait_status(
    control: &Path,
    what: &str,
    timeout: Duration,
    cond: impl Fn(&Snapshot) -> bool,
) -> Snapshot {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match hf_keeper::status::query(control) {
            Ok(s) if cond(&s) => return s,
            r => r,
        };
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}; last status: {last:?}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// Connects with a small receive buffer (set before the handshake, so the
/// window stays small): the server's writes then block early, which keeps a
/// large response genuinely in flight while a test kills the worker.
pub fn connect_small_rcvbuf(
    addr: SocketAddr,
    rcvbuf: usize,
) -> std::io::Result<std::net::TcpStream> {
    use rustix::net::{connect, socket, sockopt, AddressFamily, SocketType};
    let fam = if addr.is_ipv4() {
        AddressFamily::INET
    } else {
        AddressFamily::INET6
    };
    let fd = socket(fam, SocketType::STREAM, None)?;
    sockopt::set_socket_recv_buffer_size(&fd, rcvbuf)?;
    connect(&fd, &addr)?;
    let s = std::net::TcpStream::from(fd);
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    Ok(s)
}

/// Closes `s` abortively: SO_LINGER 0 makes the close send an RST.
pub fn reset(s: std::net::TcpStream) {
    rustix::net::sockopt::set_socket_linger(&s, Some(Duration::ZERO)).expect("SO_LINGER");
    drop(s);
}

/// Waits up to `timeout` for `child` to exit.
pub fn wait_exit(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            return Some(st);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Runs `cmd` (stdin null, stdout dropped) until it exits, at most
/// `timeout`, and returns its exit status and stderr. Panics with `what` if
/// it is still running then (it is killed).
pub fn exit_and_stderr(
    cmd: &mut Command,
    timeout: Duration,
    what: &str,
) -> (std::process::ExitStatus, String) {
    let mut p = Proc(
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn"),
    );
    let st = wait_exit(&mut p.0, timeout)
        .unwrap_or_else(|| panic!("{what}: still running after {timeout:?}"));
    let mut err = String::new();
    if let Some(mut e) = p.0.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut err);
    }
    (st, err)
}

/// Sends SIGTERM to `pid`.
pub fn term(pid: u32) {
    if let Some(p) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(p, rustix::process::Signal::TERM);
    }
}

/// Sends SIGINT to `pid`.
pub fn interrupt(pid: u32) {
    if let Some(p) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(p, rustix::process::Signal::INT);
    }
}

/// A child process killed (and reaped) when dropped, so a failing test
/// leaves nothing running.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One snapshot from the keeper at `control` (panics if none answers).
pub fn status_of(control: &Path) -> Snapshot {
    hf_keeper::status::query(control)
        .unwrap_or_else(|e| panic!("status from {}: {e}", control.display()))
}

/// Reads `s` to its end at about `rate` bytes a second, publishing how much
/// has arrived in `progress`. Errors say how the stream ended and where.
pub fn paced_read_to_end(
    mut s: std::net::TcpStream,
    rate: f64,
    progress: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let mut got = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let t0 = Instant::now();
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Ok(got),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("{e} ({:?}) after {} bytes", e.kind(), got.len())),
        }
        progress.store(got.len(), Ordering::Relaxed);
        let due = Duration::from_secs_f64(got.len() as f64 / rate);
        if let Some(wait) = due.checked_sub(t0.elapsed()) {
            std::thread::sleep(wait);
        }
    }
}

/// A network namespace of the test's own (`ip netns add`), removed when
/// dropped: for tests that need TCP settings of their own (a small send
/// buffer, say) without touching the machine's.
pub struct NetNs(String);

impl NetNs {
    /// A new namespace with loopback up and `sysctls` (`name=value`) set.
    pub fn new(tag: &str, sysctls: &[&str]) -> NetNs {
        static N: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "hf-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let ok = |c: &mut Command| {
            let (code, out, err) = run_cmd(c);
            assert_eq!(code, 0, "{c:?}: {out}{err}");
        };
        ok(Command::new("ip").args(["netns", "add", &name]));
        let ns = NetNs(name);
        ok(Command::new("ip").args(["-n", &ns.0, "link", "set", "lo", "up"]));
        for s in sysctls {
            ok(Command::new("ip").args(["netns", "exec", &ns.0, "sysctl", "-qw", s]));
        }
        ns
    }

    /// Moves the calling thread into the namespace: sockets it opens and
    /// processes it starts from now on live there.
    pub fn enter(&self) {
        let f = std::fs::File::open(format!("/var/run/netns/{}", self.0)).expect("netns file");
        rustix::thread::move_into_link_name_space(
            std::os::fd::AsFd::as_fd(&f),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )
        .expect("setns");
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.0])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
