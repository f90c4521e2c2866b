//! `hf-bench recovery`: SIGKILL the active worker while it is provably in
//! the middle of an answer on every connection, and time crash → first
//! replayed byte at the client.
//!
//! One client thread per connection. Each round every connection sends
//! `HOLD <id> <len>` to hf-testsvc, which writes the first half of its
//! answer and then blocks until it is killed. Once every client has its
//! first half, the coordinator takes `t0` and SIGKILLs the active worker;
//! each client thread takes `Instant::now()` as soon as `read()` returns the
//! first byte of the second half (written by the standby that took over),
//! reads the rest and checks the whole answer byte for byte. Before the next
//! round the coordinator waits until the keeper reports the restart, a new
//! active worker and a *ready* standby again, so every round measures a hot
//! standby takeover; it then samples the keeper's own `last_recovery_us`.
//! The coordinator also watches the killed worker through its own pidfd
//! (kill → process gone), which splits the client-side figure into: the
//! kernel tearing the worker down, the keeper's hand-over, and the new
//! worker's replay plus the trip to the client.
//!
//! How the client acknowledges the first half matters: with the kernel's
//! default delayed ACK, the first half may still be unacknowledged when the
//! standby sends the replayed tail, and without TCP_NODELAY on the service's
//! socket Nagle holds that small segment until the ACK (up to ~40 ms). By
//! default rounds alternate between clients that ACK at once (TCP_QUICKACK)
//! and clients that leave it to the kernel, and both are reported.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rustix::process::Signal;

use crate::common::{active_pid, signal, standby_ready, us, Dist, Keeper, Row};

#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    /// Worker kills (rounds).
    #[arg(long, default_value_t = 1000)]
    pub kills: usize,
    /// Client connections, each mid-answer at every kill.
    #[arg(long, default_value_t = 64)]
    pub conns: usize,
    /// Pattern bytes in each answer.
    #[arg(long, default_value_t = 200)]
    pub len: usize,
    /// Stop after this many seconds even if fewer kills were done.
    #[arg(long, default_value_t = 100)]
    pub max_secs: u64,
    /// How the clients acknowledge the first half before the kill: `quick`
    /// (TCP_QUICKACK: the ACK leaves at once), `delayed` (the kernel's
    /// default delayed ACK), or `both`, alternating round by round.
    #[arg(long, value_enum, default_value_t = Ack::Both)]
    pub ack: Ack,
    /// Run hf-testsvc on the blocking flavour (a thread per connection)
    /// instead of the tokio flavour (one thread). A worker with 65 threads
    /// takes the kernel several times longer to tear down.
    #[arg(long)]
    pub blocking: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ack {
    Both,
    Quick,
    Delayed,
}

/// The whole answer hf-testsvc sends to `HOLD id len` (the test harness's
/// independent copy of the service's generator).
fn answer(id: u64, len: usize) -> Vec<u8> {
    hf_tests::testsvc::answer(id, len, 0)
}

enum ToConn {
    /// Request id, and whether to ACK the first half at once.
    Go(u64, bool),
    Stop,
}

enum FromConn {
    /// Has the first half, nothing more.
    Ready(usize),
    /// When the first byte of the second half arrived (answer verified), or
    /// what went wrong.
    Done(usize, Result<Instant, String>),
}

fn conn_thread(
    idx: usize,
    mut s: TcpStream,
    len: usize,
    rx: mpsc::Receiver<ToConn>,
    tx: mpsc::Sender<FromConn>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(ToConn::Go(id, quickack)) = rx.recv() {
        let expect = answer(id, len);
        let half = expect.len() / 2;
        let mut got: Vec<u8> = Vec::with_capacity(expect.len());
        let r = (|| -> Result<Instant, String> {
            s.write_all(format!("HOLD {id} {len}\n").as_bytes())
                .map_err(|e| format!("write: {e}"))?;
            while got.len() < half {
                match s.read(&mut buf) {
                    Ok(0) => {
                        return Err(format!("EOF after {} bytes of the first half", got.len()))
                    }
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(e) => return Err(format!("reading the first half: {e}")),
                }
            }
            if got.len() > half {
                return Err(format!(
                    "got {} bytes before the kill, expected exactly the first half ({half})",
                    got.len()
                ));
            }
            if got[..] != expect[..half] {
                return Err("first half differs from the expected answer".into());
            }
            if quickack {
                rustix::net::sockopt::set_tcp_quickack(&s, true)
                    .map_err(|e| format!("TCP_QUICKACK: {e}"))?;
            }
            if tx.send(FromConn::Ready(idx)).is_err() {
                return Err("coordinator gone".into());
            }
            let first = match s.read(&mut buf) {
                Ok(0) => {
                    return Err("EOF instead of the replayed second half (connection lost)".into())
                }
                Ok(n) => {
                    let t = Instant::now();
                    got.extend_from_slice(&buf[..n]);
                    t
                }
                Err(e) => return Err(format!("waiting for the second half: {e}")),
            };
            while got.len() < expect.len() {
                match s.read(&mut buf) {
                    Ok(0) => {
                        return Err(format!("EOF after {} of {} bytes", got.len(), expect.len()))
                    }
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(e) => return Err(format!("reading the second half: {e}")),
                }
            }
            if got != expect {
                let at = got
                    .iter()
                    .zip(&expect)
                    .position(|(a, b)| a != b)
                    .unwrap_or(expect.len());
                return Err(format!(
                    "answer differs at byte {at} of {} ({} received)",
                    expect.len(),
                    got.len()
                ));
            }
            Ok(first)
        })();
        let failed = r.is_err();
        if tx.send(FromConn::Done(idx, r)).is_err() || failed {
            return;
        }
    }
}

pub fn run(a: &Args) -> anyhow::Result<Vec<Row>> {
    if a.conns == 0 || a.kills == 0 {
        bail!("--conns and --kills must be at least 1");
    }
    println!(
        "== recovery: SIGKILL the active worker mid-answer on {} connections, {} kills ==",
        a.conns, a.kills
    );
    let testsvc = crate::common::bin("hf-testsvc")?;
    let flavour = if a.blocking { "blocking" } else { "tokio" };
    let mut cmd = vec![testsvc.as_os_str()];
    if !a.blocking {
        cmd.push(std::ffi::OsStr::new("--tokio"));
    }
    let mut keeper = Keeper::start(1, &cmd)?;
    println!(
        "keeper pid {} on {}, hf-testsvc workers ({flavour} flavour), --standby 1, answers of {} pattern bytes",
        keeper.pid(),
        keeper.addr,
        a.len
    );

    let (tx, rx) = mpsc::channel::<FromConn>();
    let mut to = Vec::with_capacity(a.conns);
    let mut socks = Vec::with_capacity(a.conns);
    let mut threads = Vec::with_capacity(a.conns);
    for i in 0..a.conns {
        let s = TcpStream::connect(keeper.addr)
            .with_context(|| format!("connect #{i} to {}", keeper.addr))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(15)))?;
        socks.push(s.try_clone()?);
        let (ctx, crx) = mpsc::channel();
        to.push(ctx);
        let tx = tx.clone();
        let len = a.len;
        threads.push(
            std::thread::Builder::new()
                .name(format!("conn{i}"))
                .stack_size(256 * 1024)
                .spawn(move || conn_thread(i, s, len, crx, tx))?,
        );
    }
    drop(tx);

    let result = rounds(a, &mut keeper, &to, &rx);

    for s in &socks {
        let _ = s.shutdown(Shutdown::Both);
    }
    for t in &to {
        let _ = t.send(ToConn::Stop);
    }
    for t in threads {
        let _ = t.join();
    }
    keeper.stop();
    result
}

/// Samples of one acknowledgement mode, in nanoseconds.
#[derive(Default)]
struct Acc {
    /// Every (kill, connection): kill → first replayed byte read.
    all: Vec<u64>,
    /// Per kill: the first connection answered.
    first: Vec<u64>,
    /// Per kill: the last connection answered.
    last: Vec<u64>,
    /// Per kill: kill → the worker's pidfd readable in this process.
    dead: Vec<u64>,
    /// Per kill: the keeper's `last_recovery_us`.
    keeper: Vec<u64>,
    /// Every (kill, connection): worker gone (pidfd readable here) → first
    /// replayed byte read — the part holdfast, not the kernel's teardown of
    /// the dead process, is responsible for.
    after_death: Vec<u64>,
}

fn rounds(
    a: &Args,
    keeper: &mut Keeper,
    to: &[mpsc::Sender<ToConn>],
    rx: &mpsc::Receiver<FromConn>,
) -> anyhow::Result<Vec<Row>> {
    let n = a.conns;
    let started = Instant::now();
    let budget = Duration::from_secs(a.max_secs);
    let mut acc = [Acc::default(), Acc::default()]; // [delayed, quick]
    let mut settle: Vec<u64> = Vec::with_capacity(a.kills);
    let mut snap = keeper.wait_for(
        "an active worker and a ready standby",
        Duration::from_secs(20),
        |s| active_pid(s).is_some() && standby_ready(s),
    )?;
    let mut done = 0;
    let mut samples = vec![0u64; n];
    while done < a.kills {
        if started.elapsed() > budget {
            println!(
                "time budget of {} s reached after {done} kills; stopping early",
                a.max_secs
            );
            break;
        }
        let quick = match a.ack {
            Ack::Quick => true,
            Ack::Delayed => false,
            Ack::Both => done % 2 == 1,
        };
        let pid = active_pid(&snap).context("no active worker")?;
        let restarts = snap.restarts;
        for (i, t) in to.iter().enumerate() {
            let id = (done * n + i + 1) as u64;
            t.send(ToConn::Go(id, quick))
                .map_err(|_| anyhow::anyhow!("client thread {i} gone"))?;
        }
        let mut ready = 0;
        while ready < n {
            match rx.recv_timeout(Duration::from_secs(20)) {
                Ok(FromConn::Ready(_)) => ready += 1,
                Ok(FromConn::Done(i, Err(e))) => {
                    bail!("round {done}, connection {i}, before the kill: {e}")
                }
                Ok(FromConn::Done(i, Ok(_))) => {
                    bail!("round {done}, connection {i}: answer completed before the kill")
                }
                Err(_) => bail!(
                    "round {done}: only {ready}/{n} connections got their first half within 20 s"
                ),
            }
        }
        // Watch the worker die from here too: kill → pidfd readable.
        let pidfd = rustix::process::Pid::from_raw(pid as i32).and_then(|p| {
            rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()).ok()
        });
        // Every connection has exactly the first half: the worker is mid-answer on all.
        let t0 = Instant::now();
        signal(pid, Signal::KILL);
        let mut dead_at = None;
        if let Some(fd) = &pidfd {
            let mut fds = [rustix::event::PollFd::new(fd, rustix::event::PollFlags::IN)];
            let timeout = rustix::event::Timespec {
                tv_sec: 5,
                tv_nsec: 0,
            };
            if matches!(rustix::event::poll(&mut fds, Some(&timeout)), Ok(1)) {
                let d = t0.elapsed().as_nanos() as u64;
                acc[usize::from(quick)].dead.push(d);
                dead_at = Some(d);
            }
        }
        let mut got = 0;
        while got < n {
            match rx.recv_timeout(Duration::from_secs(20)) {
                Ok(FromConn::Done(i, Ok(t))) => {
                    samples[i] = t.checked_duration_since(t0).map(|d| d.as_nanos() as u64).unwrap_or(0);
                    got += 1;
                }
                Ok(FromConn::Done(i, Err(e))) => bail!("round {done}, connection {i}, after the kill: {e}"),
                Ok(FromConn::Ready(i)) => bail!("round {done}: connection {i} ready twice"),
                Err(_) => bail!("round {done}: only {got}/{n} connections were answered within 20 s of the kill"),
            }
        }
        let t_answered = Instant::now();
        let ac = &mut acc[usize::from(quick)];
        ac.all.extend_from_slice(&samples);
        if let Some(d) = dead_at {
            ac.after_death
                .extend(samples.iter().map(|s| s.saturating_sub(d)));
        }
        let f = *samples.iter().min().unwrap_or(&0);
        let l = *samples.iter().max().unwrap_or(&0);
        ac.first.push(f);
        ac.last.push(l);
        snap = keeper.wait_for(
            "the restart, a new active worker and a ready standby",
            Duration::from_secs(20),
            |s| {
                s.restarts > restarts && active_pid(s).is_some_and(|p| p != pid) && standby_ready(s)
            },
        )?;
        settle.push(t_answered.elapsed().as_nanos() as u64);
        if let Some(k) = snap.last_recovery_us {
            ac.keeper.push(k * 1000);
        }
        done += 1;
        if done % 100 == 0 || done == a.kills {
            println!(
                "  {done:>5} kills  {:>5.1} s  last kill ({} ACK): first client byte {} µs, last {} µs, keeper {} µs",
                started.elapsed().as_secs_f64(),
                if quick { "quick" } else { "delayed" },
                us(f),
                us(l),
                snap.last_recovery_us.map(|v| v.to_string()).unwrap_or("-".into())
            );
        }
    }
    if done == 0 {
        bail!("no kill done");
    }
    println!();
    println!(
        "recovery: {done} kills × {n} connections = {} answers, all byte-exact; the keeper counted {} restarts, {} connections recovered",
        done * n,
        snap.restarts,
        snap.recovered_connections
    );
    let mut rows = vec![Row::new(
        "recovery",
        "kills × conns (all answers byte-exact)",
        format!("{done} × {n}"),
    )];
    let mut p50s = [None, None];
    for (qi, name) in [(1usize, "quick"), (0, "delayed")] {
        let ac = &acc[qi];
        let (Some(dall), Some(dfirst), Some(dlast)) =
            (Dist::of(&ac.all), Dist::of(&ac.first), Dist::of(&ac.last))
        else {
            continue;
        };
        p50s[qi] = Some(dfirst.p50);
        println!();
        println!(
            "client ACKs the first half {} ({} kills) — SIGKILL sent → first replayed byte read at the client:",
            if qi == 1 { "at once (TCP_QUICKACK)" } else { "the kernel's default way (delayed ACK)" },
            ac.first.len()
        );
        println!("{}", dall.row_us("all (kill, connection) samples"));
        println!("{}", dfirst.row_us("first connection answered, per kill"));
        println!("{}", dlast.row_us("last connection answered, per kill"));
        if let Some(d) = Dist::of(&ac.dead) {
            println!("{}", d.row_us("kill → worker pidfd readable (here)"));
            rows.push(Row::new(
                "recovery",
                format!("{name} ACK: kill→worker gone (pidfd) p50/p99/max"),
                d.short_us(),
            ));
        }
        if let Some(d) = Dist::of(&ac.keeper) {
            println!("{}", d.row_us("keeper last_recovery_us (noticed → handed)"));
            rows.push(Row::new(
                "recovery",
                format!("{name} ACK: keeper last_recovery_us p50/p99/max"),
                d.short_us(),
            ));
        }
        rows.push(Row::new(
            "recovery",
            format!("{name} ACK: kill→1st byte, all p50/p99/max"),
            dall.short_us(),
        ));
        if let Some(d) = Dist::of(&ac.after_death) {
            println!(
                "{}",
                d.row_us("worker gone (pidfd) → 1st byte, all samples")
            );
            rows.push(Row::new(
                "recovery",
                format!("{name} ACK: worker gone→1st byte, all p50/p99/max"),
                d.short_us(),
            ));
        }
        rows.push(Row::new(
            "recovery",
            format!("{name} ACK: kill→1st byte, 1st conn/kill p50/p99/max"),
            dfirst.short_us(),
        ));
        rows.push(Row::new(
            "recovery",
            format!("{name} ACK: kill→1st byte, last conn/kill p50/p99/max"),
            dlast.short_us(),
        ));
    }
    if let (Some(d), Some(q)) = (p50s[0], p50s[1]) {
        println!();
        println!(
            "delayed / quick ACK, median first byte: {:.1}× (the replayed tail is a second small write; without TCP_NODELAY, Nagle holds it until the client ACKs the first half)",
            d as f64 / q.max(1) as f64
        );
    }
    if let Some(d) = Dist::of(&settle) {
        println!("{}", d.row_us("answered → new standby ready (not latency)"));
    }
    Ok(rows)
}
