//! `hf-bench recovery`: SIGKILL the active worker while it is provably in
//! the middle of an answer on every connection, and time crash → first
//! replayed byte at the client.
//!
//! Each round every connection sends `HOLD <id> <len>` to hf-testsvc, which
//! writes the first half of its answer and then blocks until it is killed.
//! Once every client has its first half, the coordinator takes `t0` and
//! SIGKILLs the active worker; each connection's sample is the moment the
//! first byte of the second half (written by the standby that took over) is
//! seen; the rest is read and the whole answer checked byte for byte.
//! Before the next round the coordinator waits until the keeper reports the
//! restart, a new active worker and a *ready* standby again, so every round
//! measures a hot standby takeover; it then samples the keeper's own
//! `last_recovery_us`. The coordinator also watches the killed worker
//! through its own pidfd (kill → process gone), which splits the
//! client-side figure into: the kernel tearing the worker down, the keeper's
//! hand-over, and the new worker's replay plus the trip to the client.
//!
//! Two ways to be the clients (`--client`): a blocking thread per
//! connection, which takes `Instant::now()` as soon as its `read()` returns
//! (the default up to 1,000 connections), or one thread with every
//! connection in an epoll set, which stamps each connection with the moment
//! the `epoll_wait` that reported it returned. That one thread can wake late
//! while both CPUs are busy (the standby replaying, the keeper starting the
//! next standby): at 64 connections the first-byte median is the same both
//! ways, but in some rounds a batch of connections is stamped together, up
//! to ~1.5 ms late. Above 1,000 connections it is the default all the same:
//! ten thousand threads woken at once on a 2-core machine would time the
//! scheduler, and take the CPU from the standby, far more than that.
//!
//! How the client acknowledges the first half matters: with the kernel's
//! default delayed ACK, the first half may still be unacknowledged when the
//! standby sends the replayed tail, and without TCP_NODELAY on the service's
//! socket Nagle holds that small segment until the ACK (up to ~40 ms). By
//! default rounds alternate between clients that ACK at once (TCP_QUICKACK)
//! and clients that leave it to the kernel, and both are reported.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rustix::event::epoll;
use rustix::process::Signal;

use crate::common::{active_pid, raise_nofile, signal, standby_ready, us, Dist, Keeper, Row};

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
    /// How this process reads the answers: `threads` (a blocking thread per
    /// connection), `epoll` (one thread, every connection in one epoll set),
    /// or `auto`: threads up to 1,000 connections, epoll above (for
    /// `--conns 10000`: that many threads woken at once would time the
    /// scheduler more than the recovery).
    #[arg(long, value_enum, default_value_t = Client::Auto)]
    pub client: Client,
    /// Each worker touches this many MiB before serving: the kernel frees a
    /// dead worker's memory before its pidfd becomes readable, so a big
    /// worker is noticed later.
    #[arg(long, default_value_t = 0)]
    pub worker_rss_mib: usize,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ack {
    Both,
    Quick,
    Delayed,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Client {
    Auto,
    Threads,
    Epoll,
}

/// Above this many connections `--client auto` uses epoll.
const AUTO_EPOLL_ABOVE: usize = 1000;

/// The whole answer hf-testsvc sends to `HOLD id len` (the test harness's
/// independent copy of the service's generator).
fn answer(id: u64, len: usize) -> Vec<u8> {
    hf_tests::testsvc::answer(id, len, 0)
}

/// How long a round may wait for every connection: 20 s, plus 1 ms a
/// connection (10,000 `HOLD`s are answered by a worker on one thread).
fn round_timeout(n: usize) -> Duration {
    Duration::from_secs(20) + Duration::from_millis(n as u64)
}

/// The benchmark's side of the connections, one round at a time.
trait Clients {
    /// Sends `HOLD` on connection `i` with id `first_id + i`, and returns
    /// once every connection has exactly the first half of its answer (and
    /// has acknowledged it at once, if `quick`).
    fn arm(&mut self, first_id: u64, quick: bool) -> anyhow::Result<()>;
    /// After the kill at `t0`: waits until every answer is complete and
    /// checked, with `samples[i]` = kill → first replayed byte on
    /// connection `i` (ns). Returns kill → `pidfd` readable (ns), if seen.
    fn collect(
        &mut self,
        t0: Instant,
        pidfd: Option<&OwnedFd>,
        samples: &mut [u64],
    ) -> anyhow::Result<Option<u64>>;
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

/// A blocking client thread per connection.
struct Threads {
    to: Vec<mpsc::Sender<ToConn>>,
    rx: mpsc::Receiver<FromConn>,
    socks: Vec<TcpStream>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Threads {
    fn start(conns: Vec<TcpStream>, len: usize) -> anyhow::Result<Threads> {
        let (tx, rx) = mpsc::channel::<FromConn>();
        let mut t = Threads {
            to: Vec::with_capacity(conns.len()),
            rx,
            socks: Vec::with_capacity(conns.len()),
            threads: Vec::with_capacity(conns.len()),
        };
        for (i, s) in conns.into_iter().enumerate() {
            s.set_read_timeout(Some(Duration::from_secs(15)))?;
            t.socks.push(s.try_clone()?);
            let (ctx, crx) = mpsc::channel();
            t.to.push(ctx);
            let tx = tx.clone();
            t.threads.push(
                std::thread::Builder::new()
                    .name(format!("conn{i}"))
                    .stack_size(256 * 1024)
                    .spawn(move || conn_thread(i, s, len, crx, tx))?,
            );
        }
        Ok(t)
    }
}

impl Clients for Threads {
    fn arm(&mut self, first_id: u64, quick: bool) -> anyhow::Result<()> {
        let n = self.to.len();
        for (i, t) in self.to.iter().enumerate() {
            t.send(ToConn::Go(first_id + i as u64, quick))
                .map_err(|_| anyhow::anyhow!("client thread {i} gone"))?;
        }
        let mut ready = 0;
        while ready < n {
            match self.rx.recv_timeout(round_timeout(n)) {
                Ok(FromConn::Ready(_)) => ready += 1,
                Ok(FromConn::Done(i, Err(e))) => bail!("connection {i}, before the kill: {e}"),
                Ok(FromConn::Done(i, Ok(_))) => {
                    bail!("connection {i}: answer completed before the kill")
                }
                Err(_) => bail!(
                    "only {ready}/{n} connections got their first half within {:?}",
                    round_timeout(n)
                ),
            }
        }
        Ok(())
    }

    fn collect(
        &mut self,
        t0: Instant,
        pidfd: Option<&OwnedFd>,
        samples: &mut [u64],
    ) -> anyhow::Result<Option<u64>> {
        let n = self.to.len();
        // The client threads read meanwhile; this one waits for the death.
        let mut dead_at = None;
        if let Some(fd) = pidfd {
            let mut fds = [rustix::event::PollFd::new(fd, rustix::event::PollFlags::IN)];
            let timeout = rustix::event::Timespec {
                tv_sec: 5,
                tv_nsec: 0,
            };
            if matches!(rustix::event::poll(&mut fds, Some(&timeout)), Ok(1)) {
                dead_at = Some(t0.elapsed().as_nanos() as u64);
            }
        }
        let mut got = 0;
        while got < n {
            match self.rx.recv_timeout(round_timeout(n)) {
                Ok(FromConn::Done(i, Ok(t))) => {
                    samples[i] = t
                        .checked_duration_since(t0)
                        .map(|d| d.as_nanos() as u64)
                        .unwrap_or(0);
                    got += 1;
                }
                Ok(FromConn::Done(i, Err(e))) => bail!("connection {i}, after the kill: {e}"),
                Ok(FromConn::Ready(i)) => bail!("connection {i} ready twice"),
                Err(_) => bail!(
                    "only {got}/{n} connections were answered within {:?} of the kill",
                    round_timeout(n)
                ),
            }
        }
        Ok(dead_at)
    }
}

impl Drop for Threads {
    fn drop(&mut self) {
        for s in &self.socks {
            let _ = s.shutdown(Shutdown::Both);
        }
        for t in &self.to {
            let _ = t.send(ToConn::Stop);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Every connection non-blocking in one epoll set, read by the
/// coordinator's own thread.
struct Epoll {
    ep: OwnedFd,
    conns: Vec<EConn>,
    len: usize,
    events: Vec<epoll::Event>,
    buf: Vec<u8>,
}

struct EConn {
    s: TcpStream,
    want: Vec<u8>,
    got: Vec<u8>,
    /// The answer is complete (after the kill).
    done: bool,
}

/// The epoll token of the killed worker's pidfd (connections are 0..n).
const PIDFD_TOKEN: u64 = u64::MAX;

impl Epoll {
    fn start(conns: Vec<TcpStream>, len: usize) -> anyhow::Result<Epoll> {
        let ep = epoll::create(epoll::CreateFlags::CLOEXEC).context("epoll_create")?;
        let mut out = Vec::with_capacity(conns.len());
        for (i, s) in conns.into_iter().enumerate() {
            s.set_nonblocking(true)?;
            epoll::add(
                &ep,
                &s,
                epoll::EventData::new_u64(i as u64),
                epoll::EventFlags::IN,
            )
            .context("epoll_ctl")?;
            out.push(EConn {
                s,
                want: Vec::new(),
                got: Vec::with_capacity(2 * len + 64),
                done: false,
            });
        }
        Ok(Epoll {
            ep,
            conns: out,
            len,
            events: Vec::with_capacity(1024),
            buf: vec![0u8; 64 * 1024],
        })
    }

    /// One `epoll_wait` (retried on EINTR); the events are in `self.events`.
    /// Returns when it returned, or an error once `deadline` has passed.
    fn wait(&mut self, deadline: Instant, what: &dyn Fn() -> String) -> anyhow::Result<Instant> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("{}", what());
            }
            let timeout = rustix::event::Timespec {
                tv_sec: left.as_secs() as i64,
                tv_nsec: i64::from(left.subsec_nanos()),
            };
            self.events.clear();
            match epoll::wait(
                &self.ep,
                rustix::buffer::spare_capacity(&mut self.events),
                Some(&timeout),
            ) {
                Ok(_) => return Ok(Instant::now()),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e).context("epoll_wait"),
            }
        }
    }

    /// One `read` on connection `i` into its answer so far; the number of
    /// bytes, 0 for nothing to read now. EOF is an error: the connection was
    /// lost.
    fn read_some(&mut self, i: usize) -> Result<usize, String> {
        let c = &mut self.conns[i];
        match (&c.s).read(&mut self.buf) {
            Ok(0) => Err(format!(
                "EOF after {} of {} bytes (connection lost)",
                c.got.len(),
                c.want.len()
            )),
            Ok(k) => {
                c.got.extend_from_slice(&self.buf[..k]);
                Ok(k)
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(0),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Ok(0),
            Err(e) => Err(format!("read: {e}")),
        }
    }
}

impl Clients for Epoll {
    fn arm(&mut self, first_id: u64, quick: bool) -> anyhow::Result<()> {
        let n = self.conns.len();
        for (i, c) in self.conns.iter_mut().enumerate() {
            let id = first_id + i as u64;
            c.want = answer(id, self.len);
            c.got.clear();
            c.done = false;
            // A few bytes into an empty send buffer: never short.
            let req = format!("HOLD {id} {}\n", self.len);
            match (&c.s).write(req.as_bytes()) {
                Ok(k) if k == req.len() => {}
                Ok(k) => bail!("connection {i}: short write of the request ({k} bytes)"),
                Err(e) => bail!("connection {i}: writing the request: {e}"),
            }
        }
        let deadline = Instant::now() + round_timeout(n);
        let mut ready = 0;
        while ready < n {
            self.wait(deadline, &|| {
                format!(
                    "only {ready}/{n} connections got their first half within {:?}",
                    round_timeout(n)
                )
            })?;
            for j in 0..self.events.len() {
                let i = self.events[j].data.u64() as usize;
                let k = self
                    .read_some(i)
                    .map_err(|e| anyhow::anyhow!("connection {i}, before the kill: {e}"))?;
                let c = &self.conns[i];
                let half = c.want.len() / 2;
                if k == 0 || c.got.len() < half {
                    continue;
                }
                if c.got.len() > half {
                    bail!(
                        "connection {i}: got {} bytes before the kill, expected exactly the first half ({half})",
                        c.got.len()
                    );
                }
                if c.got[..] != c.want[..half] {
                    bail!("connection {i}: first half differs from the expected answer");
                }
                if quick {
                    rustix::net::sockopt::set_tcp_quickack(&c.s, true)
                        .with_context(|| format!("connection {i}: TCP_QUICKACK"))?;
                }
                ready += 1;
            }
        }
        Ok(())
    }

    fn collect(
        &mut self,
        t0: Instant,
        pidfd: Option<&OwnedFd>,
        samples: &mut [u64],
    ) -> anyhow::Result<Option<u64>> {
        let n = self.conns.len();
        // The worker's death is one more event in the same set.
        let mut watching = pidfd.and_then(|fd| {
            epoll::add(
                &self.ep,
                fd,
                epoll::EventData::new_u64(PIDFD_TOKEN),
                epoll::EventFlags::IN,
            )
            .ok()
            .map(|()| fd)
        });
        let mut dead_at = None;
        let deadline = Instant::now() + round_timeout(n);
        let mut answered = 0;
        let r = (|| -> anyhow::Result<()> {
            while answered < n {
                let t = self.wait(deadline, &|| {
                    format!(
                        "only {answered}/{n} connections were answered within {:?} of the kill",
                        round_timeout(n)
                    )
                })?;
                // Every connection this wait reported is stamped with its
                // return: the bytes were there by then, however long the
                // reads of the others before it take.
                let since = t.saturating_duration_since(t0).as_nanos() as u64;
                for j in 0..self.events.len() {
                    let tok = self.events[j].data.u64();
                    if tok == PIDFD_TOKEN {
                        dead_at.get_or_insert(since);
                        if let Some(fd) = watching.take() {
                            let _ = epoll::delete(&self.ep, fd.as_fd());
                        }
                        continue;
                    }
                    let i = tok as usize;
                    let before = self.conns[i].got.len();
                    let k = self
                        .read_some(i)
                        .map_err(|e| anyhow::anyhow!("connection {i}, after the kill: {e}"))?;
                    let c = &mut self.conns[i];
                    if k == 0 {
                        continue;
                    }
                    if before == c.want.len() / 2 {
                        samples[i] = since;
                    }
                    if c.got.len() < c.want.len() {
                        continue;
                    }
                    if c.done || c.got.len() > c.want.len() {
                        bail!(
                            "connection {i}: {} bytes received, the answer has {}",
                            c.got.len(),
                            c.want.len()
                        );
                    }
                    if c.got != c.want {
                        let at = c
                            .got
                            .iter()
                            .zip(&c.want)
                            .position(|(a, b)| a != b)
                            .unwrap_or(c.want.len());
                        bail!(
                            "connection {i}: answer differs at byte {at} of {}",
                            c.want.len()
                        );
                    }
                    c.done = true;
                    answered += 1;
                }
            }
            Ok(())
        })();
        if let Some(fd) = watching {
            let _ = epoll::delete(&self.ep, fd.as_fd());
        }
        r?;
        Ok(dead_at)
    }
}

/// Opens `n` connections to the keeper, in batches small enough for its
/// listen backlog (each batch accepted before the next is opened), and
/// waits until the active worker holds all of them.
fn connect_all(keeper: &mut Keeper, n: usize) -> anyhow::Result<Vec<TcpStream>> {
    const BATCH: usize = 500;
    let addr = keeper.addr;
    let mut socks = Vec::with_capacity(n);
    while socks.len() < n {
        for _ in 0..BATCH.min(n - socks.len()) {
            let s = TcpStream::connect(addr)
                .with_context(|| format!("connect #{} to {addr}", socks.len()))?;
            s.set_nodelay(true)?;
            socks.push(s);
        }
        let opened = socks.len();
        keeper.wait_for(
            &format!("{opened} connections accepted"),
            Duration::from_secs(30),
            |s| s.connections >= opened,
        )?;
    }
    keeper.wait_for(
        &format!("{n} connections held by the active worker"),
        Duration::from_secs(30),
        |s| {
            s.waiting == 0
                && s.workers
                    .iter()
                    .any(|w| w.role == hf_keeper::status::Role::Active && w.connections == n)
        },
    )?;
    Ok(socks)
}

pub fn run(a: &Args) -> anyhow::Result<Vec<Row>> {
    if a.conns == 0 || a.kills == 0 {
        bail!("--conns and --kills must be at least 1");
    }
    let epoll = match a.client {
        Client::Auto => a.conns > AUTO_EPOLL_ABOVE,
        Client::Threads => false,
        Client::Epoll => true,
    };
    println!(
        "== recovery: SIGKILL the active worker mid-answer on {} connections, {} kills ==",
        a.conns, a.kills
    );
    // One socket per connection here (two with threads: a clone to shut
    // them down with); the keeper and the workers raise their own limits.
    let limit = raise_nofile();
    let need = a.conns * if epoll { 1 } else { 2 } + 100;
    if (limit as usize) < need {
        bail!("RLIMIT_NOFILE is {limit} here, {need} needed for {} connections (raise the hard limit)", a.conns);
    }
    let testsvc = crate::common::bin("hf-testsvc")?;
    let flavour = if a.blocking { "blocking" } else { "tokio" };
    let mut cmd = vec![testsvc.as_os_str()];
    if !a.blocking {
        cmd.push(std::ffi::OsStr::new("--tokio"));
    }
    let rss = a.worker_rss_mib.to_string();
    if a.worker_rss_mib > 0 {
        cmd.push(std::ffi::OsStr::new("--touch-mib"));
        cmd.push(std::ffi::OsStr::new(&rss));
    }
    let mut keeper = Keeper::start(1, &cmd)?;
    println!(
        "keeper pid {} on {}, hf-testsvc workers ({flavour} flavour, {} MiB touched each), --standby 1, answers of {} pattern bytes, clients: {}",
        keeper.pid(),
        keeper.addr,
        a.worker_rss_mib,
        a.len,
        if epoll { "one thread, epoll" } else { "a thread per connection" }
    );
    let t = Instant::now();
    let socks = connect_all(&mut keeper, a.conns)?;
    if a.conns > AUTO_EPOLL_ABOVE {
        println!(
            "{} connections open and held by the worker ({:.2} s)",
            a.conns,
            t.elapsed().as_secs_f64()
        );
    }
    let result = if epoll {
        let mut c = Epoll::start(socks, a.len)?;
        rounds(a, &mut keeper, &mut c)
    } else {
        let mut c = Threads::start(socks, a.len)?;
        rounds(a, &mut keeper, &mut c)
    };
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

fn rounds(a: &Args, keeper: &mut Keeper, clients: &mut dyn Clients) -> anyhow::Result<Vec<Row>> {
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
    // Progress lines: every 100 kills of 64 connections, every kill of 10,000.
    let every = (10_000 / n).clamp(1, 100);
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
        clients
            .arm((done * n + 1) as u64, quick)
            .with_context(|| format!("round {done}"))?;
        // Watch the worker die from here too: kill → pidfd readable.
        let pidfd = rustix::process::Pid::from_raw(pid as i32).and_then(|p| {
            rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()).ok()
        });
        // Every connection has exactly the first half: the worker is mid-answer on all.
        let t0 = Instant::now();
        signal(pid, Signal::KILL);
        let dead_at = clients
            .collect(t0, pidfd.as_ref(), &mut samples)
            .with_context(|| format!("round {done}"))?;
        if let Some(d) = dead_at {
            acc[usize::from(quick)].dead.push(d);
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
        if done % every == 0 || done == a.kills {
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
    )
    .num("kills", done as f64)
    .num("conns", n as f64)];
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
            rows.push(
                Row::new(
                    "recovery",
                    format!("{name} ACK: kill→worker gone (pidfd) p50/p99/max"),
                    d.short_us(),
                )
                .dist_us(&d),
            );
        }
        if let Some(d) = Dist::of(&ac.keeper) {
            println!("{}", d.row_us("keeper last_recovery_us (noticed → handed)"));
            rows.push(
                Row::new(
                    "recovery",
                    format!("{name} ACK: keeper last_recovery_us p50/p99/max"),
                    d.short_us(),
                )
                .dist_us(&d),
            );
        }
        rows.push(
            Row::new(
                "recovery",
                format!("{name} ACK: kill→1st byte, all p50/p99/max"),
                dall.short_us(),
            )
            .dist_us(&dall),
        );
        if let Some(d) = Dist::of(&ac.after_death) {
            println!(
                "{}",
                d.row_us("worker gone (pidfd) → 1st byte, all samples")
            );
            rows.push(
                Row::new(
                    "recovery",
                    format!("{name} ACK: worker gone→1st byte, all p50/p99/max"),
                    d.short_us(),
                )
                .dist_us(&d),
            );
        }
        rows.push(
            Row::new(
                "recovery",
                format!("{name} ACK: kill→1st byte, 1st conn/kill p50/p99/max"),
                dfirst.short_us(),
            )
            .dist_us(&dfirst),
        );
        rows.push(
            Row::new(
                "recovery",
                format!("{name} ACK: kill→1st byte, last conn/kill p50/p99/max"),
                dlast.short_us(),
            )
            .dist_us(&dlast),
        );
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
