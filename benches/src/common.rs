//! What every benchmark needs: the binaries next to this one, a keeper run
//! as a child process (stopped on drop), temp directories, percentiles, the
//! summary table.

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hf_keeper::status::{Phase, Role, Snapshot};

/// Path of a workspace binary next to this executable (`target/release`).
pub fn bin(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the hf-bench executable")?;
    let p = exe.with_file_name(name);
    if !p.exists() {
        bail!(
            "{} not found next to {} (run `cargo build --release --workspace`)",
            name,
            exe.display()
        );
    }
    Ok(p)
}

/// Temp directories removed when dropped: the test harness's.
pub use hf_tests::TempDir;

pub fn signal(pid: u32, sig: rustix::process::Signal) {
    if let Some(p) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(p, sig);
    }
}

/// A child process this benchmark started: SIGTERM on drop, SIGKILL if it
/// has not exited within a few seconds.
pub struct Proc {
    child: Child,
}

impl Proc {
    pub fn spawn(cmd: &mut Command, log: &Path) -> anyhow::Result<Proc> {
        let logf =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf)
            .spawn()
            .with_context(|| format!("starting {:?}", cmd.get_program()))?;
        Ok(Proc { child })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Err if the process has already exited.
    pub fn check_alive(&mut self, what: &str) -> anyhow::Result<()> {
        if let Some(st) = self.child.try_wait()? {
            bail!("{what} exited ({st})");
        }
        Ok(())
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub fn stop(&mut self, grace: Duration) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        signal(self.child.id(), rustix::process::Signal::TERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}

/// The log filter given to the keeper and to every service: per-event info
/// lines would be part of what is measured otherwise.
pub const LOG_FILTER: &str = "warn";

/// `holdfast run` as a child: listens on 127.0.0.1:0, control socket in a
/// temp dir. Stopped with SIGTERM on drop (its workers with it).
pub struct Keeper {
    proc_: Proc,
    pub control: PathBuf,
    pub addr: SocketAddr,
    log: PathBuf,
    _dir: TempDir,
}

impl Keeper {
    pub fn start(standby: usize, cmd: &[&std::ffi::OsStr]) -> anyhow::Result<Keeper> {
        Keeper::start_with(standby, &[], cmd)
    }

    /// [`Keeper::start`] with more `holdfast run` options.
    pub fn start_with(
        standby: usize,
        extra: &[&str],
        cmd: &[&std::ffi::OsStr],
    ) -> anyhow::Result<Keeper> {
        let dir = TempDir::new("keeper");
        let control = dir.path().join("control.sock");
        let log = dir.path().join("keeper.log");
        let mut c = Command::new(bin("holdfast")?);
        c.arg("run")
            .args([
                "--listen",
                "127.0.0.1:0",
                "--standby",
                &standby.to_string(),
                "--control",
            ])
            .arg(&control)
            .args(extra)
            .arg("--")
            .args(cmd)
            .env("HOLDFAST_LOG", LOG_FILTER);
        let proc_ = Proc::spawn(&mut c, &log)?;
        let mut k = Keeper {
            proc_,
            control,
            addr: "127.0.0.1:1".parse()?,
            log,
            _dir: dir,
        };
        let s = k.wait_for(
            "a serving worker and a ready standby",
            Duration::from_secs(20),
            |s| s.phase == Phase::Serving && (standby == 0 || standby_ready(s)),
        )?;
        k.addr = s
            .listeners
            .first()
            .context("keeper reports no listener")?
            .parse()
            .context("listener address")?;
        Ok(k)
    }

    pub fn pid(&self) -> u32 {
        self.proc_.pid()
    }

    pub fn status(&self) -> std::io::Result<Snapshot> {
        hf_keeper::status::query(&self.control)
    }

    /// Waits until the keeper holds exactly `n` connections, all with the
    /// active worker and none waiting.
    pub fn wait_held(&mut self, n: usize) -> anyhow::Result<Snapshot> {
        self.wait_for(
            &format!("{n} connections held by the active worker"),
            Duration::from_secs(30),
            |s| {
                s.connections == n
                    && s.waiting == 0
                    && s.workers
                        .iter()
                        .any(|w| w.role == hf_keeper::status::Role::Active && w.connections == n)
            },
        )
    }

    pub fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        cond: impl Fn(&Snapshot) -> bool,
    ) -> anyhow::Result<Snapshot> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Err(e) = self.proc_.check_alive("keeper") {
                bail!("{e} while waiting for {what}; log:\n{}", self.log_tail());
            }
            if let Ok(s) = self.status() {
                if cond(&s) {
                    return Ok(s);
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "timed out after {timeout:?} waiting for {what}; log:\n{}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_micros(500));
        }
    }

    pub fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// SIGTERM (the keeper stops its workers), SIGKILL after 5 s.
    pub fn stop(mut self) {
        self.proc_.stop(Duration::from_secs(5));
    }
}

pub fn active_pid(s: &Snapshot) -> Option<u32> {
    s.workers
        .iter()
        .find(|w| w.role == Role::Active)
        .map(|w| w.pid)
}

pub fn standby_ready(s: &Snapshot) -> bool {
    s.workers.iter().any(|w| w.role == Role::Standby)
}

/// A loopback port free right now (bound to port 0, then released).
pub fn free_port() -> anyhow::Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?)
}

/// Waits until something accepts connections on `addr`.
pub fn wait_listening(
    addr: SocketAddr,
    p: &mut Proc,
    what: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        p.check_alive(what)?;
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{what} does not accept connections on {addr} after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Raises this process's open-files soft limit to the hard one; returns it.
pub fn raise_nofile() -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut lim = getrlimit(Resource::Nofile);
    if lim.current != lim.maximum {
        lim.current = lim.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, lim) {
            eprintln!("warning: cannot raise RLIMIT_NOFILE: {e}");
        }
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// Nearest-rank percentile of sorted values (`p` in 0..=100).
pub fn pct<T: Copy>(sorted: &[T], p: f64) -> T {
    assert!(!sorted.is_empty());
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub fn median_f(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    if s.is_empty() {
        return f64::NAN;
    }
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// p50/p90/p99/max of durations in nanoseconds, printed in µs.
pub struct Dist {
    pub n: usize,
    pub min: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub max: u64,
}

impl Dist {
    pub fn of(v: &[u64]) -> Option<Dist> {
        if v.is_empty() {
            return None;
        }
        let mut s = v.to_vec();
        s.sort_unstable();
        Some(Dist {
            n: s.len(),
            min: s[0],
            p50: pct(&s, 50.0),
            p90: pct(&s, 90.0),
            p99: pct(&s, 99.0),
            max: s[s.len() - 1],
        })
    }
    /// "p50 / p99 / max" in µs (values in ns).
    pub fn short_us(&self) -> String {
        format!("{} / {} / {} µs", us(self.p50), us(self.p99), us(self.max))
    }
    pub fn row_us(&self, label: &str) -> String {
        format!(
            "  {label:<44} n={:<6} min {:>9}  p50 {:>9}  p90 {:>9}  p99 {:>9}  max {:>9}  (µs)",
            self.n,
            us(self.min),
            us(self.p50),
            us(self.p90),
            us(self.p99),
            us(self.max)
        )
    }
}

/// Nanoseconds as microseconds with one decimal.
pub fn us(ns: u64) -> String {
    format!("{:.1}", ns as f64 / 1000.0)
}

pub fn kib(bytes: u64) -> String {
    format!("{:.1} KiB", bytes as f64 / 1024.0)
}

/// One line of the final summary.
pub struct Row {
    pub bench: &'static str,
    pub metric: String,
    pub value: String,
    /// The figures behind `value` as numbers (name, value), for
    /// `hf-bench report`'s targets, plots and rows.json; never printed.
    pub nums: Vec<(String, f64)>,
}

impl Row {
    pub fn new(bench: &'static str, metric: impl Into<String>, value: impl Into<String>) -> Row {
        Row {
            bench,
            metric: metric.into(),
            value: value.into(),
            nums: Vec::new(),
        }
    }

    /// Adds a number behind the text.
    pub fn num(mut self, name: impl Into<String>, v: f64) -> Row {
        self.nums.push((name.into(), v));
        self
    }

    /// Adds a distribution's n, p50, p99 and max, in µs.
    pub fn dist_us(self, d: &Dist) -> Row {
        self.num("n", d.n as f64)
            .num("p50_us", d.p50 as f64 / 1e3)
            .num("p99_us", d.p99 as f64 / 1e3)
            .num("max_us", d.max as f64 / 1e3)
    }

    /// Adds `values` as `name1`, `name2`, ...
    pub fn nums_list(mut self, name: &str, values: &[f64]) -> Row {
        for (i, v) in values.iter().enumerate() {
            self = self.num(format!("{name}{}", i + 1), *v);
        }
        self
    }

    /// The numbers `name1`, `name2`, ... in order.
    pub fn list(&self, name: &str) -> Vec<f64> {
        (1..)
            .map_while(|i| self.get(&format!("{name}{i}")))
            .collect()
    }

    /// The number named `name`, if attached.
    pub fn get(&self, name: &str) -> Option<f64> {
        self.nums.iter().find(|(k, _)| k == name).map(|(_, v)| *v)
    }
}

pub fn print_summary(rows: &[Row]) {
    let wb = rows.iter().map(|r| r.bench.len()).max().unwrap_or(5).max(5);
    let wm = rows
        .iter()
        .map(|r| r.metric.chars().count())
        .max()
        .unwrap_or(6)
        .max(6);
    let mut out = String::new();
    let _ = writeln!(out, "\n=== summary ===");
    let _ = writeln!(out, "{:<wb$}  {:<wm$}  value", "bench", "metric");
    let _ = writeln!(
        out,
        "{}  {}  {}",
        "-".repeat(wb),
        "-".repeat(wm),
        "-".repeat(30)
    );
    for r in rows {
        let pad = wm - r.metric.chars().count();
        let _ = writeln!(
            out,
            "{:<wb$}  {}{}  {}",
            r.bench,
            r.metric,
            " ".repeat(pad),
            r.value
        );
    }
    print!("{out}");
}
