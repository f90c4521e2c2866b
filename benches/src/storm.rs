//! `hf-bench storm`: a crash storm, side by side — what clients lose.
//!
//! The same load (N keep-alive clients fetching files of several sizes,
//! every body checked byte for byte) runs three times while a worker is
//! SIGKILLed every `--every-ms`:
//! 1. hf-httpd under holdfast (the active worker is killed);
//! 2. nginx with two workers (a worker is killed; the master respawns it),
//!    when `nginx` is on PATH (`apt-get install nginx`);
//! 3. hf-httpd alone, restarted by a plain supervisor loop as soon as it
//!    dies (what `Restart=always` gives).
//!
//! A client that fails (reset, early EOF, refused connection, timeout, wrong
//! bytes) counts the failure by kind, reconnects and goes on.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rustix::process::Signal;

use crate::common::{
    active_pid, bin, free_port, signal, wait_listening, Keeper, Proc, Row, TempDir, LOG_FILTER,
};

#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    /// Seconds per contender.
    #[arg(long, default_value_t = 10)]
    pub secs: u64,
    /// Client connections.
    #[arg(long, default_value_t = 64)]
    pub conns: usize,
    /// A worker is killed this often (milliseconds).
    #[arg(long, default_value_t = 50)]
    pub every_ms: u64,
}

/// What one contender's clients saw.
#[derive(Default)]
struct Outcome {
    ok: u64,
    failures: BTreeMap<&'static str, u64>,
    kills: u64,
    /// Requests that took longer than [`STALL`], and the slowest one.
    stalls: u64,
    worst: Duration,
}

/// A request slower than this is a stall: the client noticed the crash.
const STALL: Duration = Duration::from_millis(100);

impl Outcome {
    /// A summary row with the counts as numbers: ok, failed, kills, and
    /// each kind of failure.
    fn row(&self, metric: &str) -> Row {
        let mut r = Row::new("storm", metric, self.describe())
            .num("ok", self.ok as f64)
            .num("failed", self.failed() as f64)
            .num("kills", self.kills as f64)
            .num("stalls", self.stalls as f64)
            .num("worst_ms", self.worst.as_secs_f64() * 1e3);
        for (k, v) in &self.failures {
            r = r.num(*k, *v as f64);
        }
        r
    }
    fn failed(&self) -> u64 {
        self.failures.values().sum()
    }
    fn describe(&self) -> String {
        let kinds: Vec<String> = self
            .failures
            .iter()
            .map(|(k, v)| format!("{v} {k}"))
            .collect();
        format!(
            "{} ok, {} failed{}; {} kills; {} stalls over {} ms (slowest {:.0} ms)",
            self.ok,
            self.failed(),
            if kinds.is_empty() {
                String::new()
            } else {
                format!(" ({})", kinds.join(", "))
            },
            self.kills,
            self.stalls,
            STALL.as_millis(),
            self.worst.as_secs_f64() * 1e3
        )
    }
}

pub(crate) const SIZES: [usize; 4] = [1024, 16 * 1024, 100 * 1024, 512 * 1024];

pub(crate) fn write_site(dir: &Path) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    SIZES
        .iter()
        .enumerate()
        .map(|(i, &len)| {
            let name = format!("f{len}.bin");
            let data = hf_tests::http::content(len, i as u64 + 7);
            std::fs::write(dir.join(&name), &data)?;
            Ok((format!("/{name}"), data))
        })
        .collect()
}

pub(crate) fn classify(e: &std::io::Error) -> &'static str {
    use std::io::ErrorKind::*;
    match e.kind() {
        ConnectionReset | BrokenPipe => "resets",
        ConnectionRefused => "refused connections",
        UnexpectedEof => "cut-short responses",
        WouldBlock | TimedOut => "timeouts",
        InvalidData => "bad responses",
        _ => "other errors",
    }
}

/// Runs the clients for `secs` while `kill` is called every `every`.
fn load(
    addr: SocketAddr,
    files: &Arc<Vec<(String, Vec<u8>)>>,
    a: &Args,
    mut kill: impl FnMut() -> bool,
) -> Outcome {
    let stop = Arc::new(AtomicBool::new(false));
    let out = Arc::new(Mutex::new(Outcome::default()));
    let clients: Vec<_> = (0..a.conns)
        .map(|c| {
            let (files, stop, out) = (files.clone(), stop.clone(), out.clone());
            std::thread::spawn(move || {
                let mut conn: Option<hf_tests::http::Client> = None;
                let mut i = c;
                let (mut ok, mut fails): (u64, BTreeMap<&'static str, u64>) = (0, BTreeMap::new());
                let (mut stalls, mut worst) = (0u64, Duration::ZERO);
                while !stop.load(Ordering::Relaxed) {
                    let (path, want) = &files[i % files.len()];
                    let started = Instant::now();
                    i = i.wrapping_mul(5).wrapping_add(1);
                    let r = match conn.as_mut() {
                        Some(cl) => cl.get(path),
                        None => hf_tests::http::Client::connect(addr).and_then(|mut cl| {
                            let r = cl.get(path);
                            conn = Some(cl);
                            r
                        }),
                    };
                    let took = started.elapsed();
                    worst = worst.max(took);
                    if took > STALL {
                        stalls += 1;
                    }
                    match r {
                        Ok(resp) if resp.status == 200 && resp.body == *want => ok += 1,
                        Ok(_) => {
                            *fails.entry("wrong bytes").or_default() += 1;
                            conn = None;
                        }
                        Err(e) => {
                            *fails.entry(classify(&e)).or_default() += 1;
                            conn = None;
                            std::thread::sleep(Duration::from_millis(1));
                        }
                    }
                }
                let mut o = out.lock().expect("outcome");
                o.ok += ok;
                o.stalls += stalls;
                o.worst = o.worst.max(worst);
                for (k, v) in fails {
                    *o.failures.entry(k).or_default() += v;
                }
            })
        })
        .collect();
    let t0 = Instant::now();
    let mut kills = 0;
    while t0.elapsed() < Duration::from_secs(a.secs) {
        std::thread::sleep(Duration::from_millis(a.every_ms));
        if kill() {
            kills += 1;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        let _ = c.join();
    }
    let mut o = std::mem::take(&mut *out.lock().expect("outcome"));
    o.kills = kills;
    o
}

fn holdfast(a: &Args, site: &Path, files: &Arc<Vec<(String, Vec<u8>)>>) -> anyhow::Result<Outcome> {
    let httpd = bin("hf-httpd")?;
    let mut k = Keeper::start(1, &[httpd.as_os_str(), "--root".as_ref(), site.as_os_str()])?;
    let addr = k.addr;
    let control = k.control.clone();
    let o = load(addr, files, a, || {
        match hf_keeper::status::query(&control)
            .ok()
            .as_ref()
            .and_then(active_pid)
        {
            Some(pid) => {
                signal(pid, Signal::KILL);
                true
            }
            None => false,
        }
    });
    k.wait_for("still serving", Duration::from_secs(10), |s| {
        active_pid(s).is_some()
    })?;
    Ok(o)
}

/// The pids of `pid`'s children (its workers, for an nginx master).
pub(crate) fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// The `nginx` binary on PATH (or in /usr/sbin, /sbin), if installed.
pub(crate) fn find_nginx() -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .chain(["/usr/sbin".into(), "/sbin".into()])
            .map(|d| d.join("nginx"))
            .find(|p| p.exists())
    })
}

/// Writes `dir/nginx.conf`: 2 workers serving `root` on `addr`, long
/// keep-alive, no access log, pid file and temp paths in `dir`; returns its
/// path. `daemon`: whether the master detaches (its binary upgrade needs it).
pub(crate) fn write_nginx_conf(
    dir: &Path,
    addr: SocketAddr,
    root: &Path,
    daemon: bool,
) -> anyhow::Result<PathBuf> {
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "worker_processes 2;\ndaemon {daemon};\npid {pid};\nerror_log {log} crit;\n\
             events {{ worker_connections 4096; }}\n\
             http {{ access_log off; keepalive_requests 1000000; keepalive_timeout 60s;\n\
             client_body_temp_path {tmp}; proxy_temp_path {tmp}; fastcgi_temp_path {tmp}; uwsgi_temp_path {tmp}; scgi_temp_path {tmp};\n\
             server {{ listen {addr}; root {root}; }} }}\n",
            daemon = if daemon { "on" } else { "off" },
            pid = dir.join("nginx.pid").display(),
            log = dir.join("error.log").display(),
            tmp = dir.display(),
            root = root.display(),
        ),
    )?;
    Ok(conf)
}

fn nginx(
    a: &Args,
    site: &Path,
    files: &Arc<Vec<(String, Vec<u8>)>>,
) -> anyhow::Result<Option<Outcome>> {
    let Some(nginx) = find_nginx() else {
        return Ok(None);
    };
    let dir = TempDir::new("nginx");
    let addr = free_port()?;
    let conf = write_nginx_conf(dir.path(), addr, site, false)?;
    let mut p = Proc::spawn(
        Command::new(&nginx)
            .arg("-c")
            .arg(&conf)
            .arg("-p")
            .arg(dir.path()),
        &dir.path().join("stderr.log"),
    )?;
    wait_listening(addr, &mut p, "nginx", Duration::from_secs(10))?;
    let master = p.pid();
    let mut n = 0usize;
    let o = load(addr, files, a, || {
        let workers = children(master);
        n += 1;
        match workers.get(n % workers.len().max(1)) {
            Some(&w) => {
                signal(w, Signal::KILL);
                true
            }
            None => false,
        }
    });
    Ok(Some(o))
}

fn supervised(
    a: &Args,
    site: &Path,
    files: &Arc<Vec<(String, Vec<u8>)>>,
) -> anyhow::Result<Outcome> {
    let httpd = bin("hf-httpd")?;
    let dir = TempDir::new("plain");
    let addr = free_port()?;
    let start = || -> anyhow::Result<Proc> {
        Proc::spawn(
            Command::new(&httpd)
                .arg("--root")
                .arg(site)
                .arg("--listen")
                .arg(addr.to_string())
                .env("HOLDFAST_LOG", LOG_FILTER),
            &dir.path().join("httpd.log"),
        )
    };
    let current = Arc::new(Mutex::new(start()?));
    {
        let mut p = current.lock().expect("proc");
        wait_listening(addr, &mut p, "hf-httpd", Duration::from_secs(10))?;
    }
    // The supervisor: restart the server the moment it is gone.
    let stop = Arc::new(AtomicBool::new(false));
    let sup = {
        let (current, stop) = (current.clone(), stop.clone());
        let httpd = httpd.clone();
        let site = site.to_owned();
        let log = dir.path().join("httpd.log");
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                {
                    let mut p = current.lock().expect("proc");
                    if p.check_alive("hf-httpd").is_err() {
                        if let Ok(np) = Proc::spawn(
                            Command::new(&httpd)
                                .arg("--root")
                                .arg(&site)
                                .arg("--listen")
                                .arg(addr.to_string())
                                .env("HOLDFAST_LOG", LOG_FILTER),
                            &log,
                        ) {
                            *p = np;
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    let o = load(addr, files, a, || {
        let pid = current.lock().expect("proc").pid();
        signal(pid, Signal::KILL);
        true
    });
    stop.store(true, Ordering::Relaxed);
    let _ = sup.join();
    Ok(o)
}

pub fn run(a: &Args) -> anyhow::Result<Vec<Row>> {
    if a.conns == 0 || a.secs == 0 || a.every_ms == 0 {
        bail!("--conns, --secs and --every-ms must be at least 1");
    }
    println!(
        "== storm: {} keep-alive clients, files of {:?} bytes checked byte for byte, a worker SIGKILLed every {} ms for {} s ==",
        a.conns, SIZES, a.every_ms, a.secs
    );
    let site = TempDir::new("storm-site");
    let files = Arc::new(write_site(site.path()).context("writing the site")?);
    let mut rows = Vec::new();
    let h = holdfast(a, site.path(), &files)?;
    println!("  holdfast + hf-httpd:        {}", h.describe());
    rows.push(h.row("holdfast + hf-httpd"));
    match nginx(a, site.path(), &files)? {
        Some(n) => {
            println!("  nginx, 2 workers:           {}", n.describe());
            rows.push(n.row("nginx (2 workers)"));
        }
        None => {
            println!("  nginx: not found on PATH (apt-get install nginx), skipped");
            rows.push(Row::new("storm", "nginx", "not on PATH, skipped"));
        }
    }
    let p = supervised(a, site.path(), &files)?;
    println!("  hf-httpd + plain restart:   {}", p.describe());
    rows.push(p.row("hf-httpd, restarted on death"));
    Ok(rows)
}
