//! hf-chat's WebSocket rooms: message latency alone vs under the keeper
//! (interleaved rounds), the stall a member sees across a SIGKILL of the
//! worker and across `holdfast upgrade`, and idle WebSockets moved by an
//! upgrade (time, closes, and every one still delivering afterwards).

use std::ffi::OsStr;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hf_tests::TempDir;

use crate::common::{active_pid, bin, free_port, signal, wait_listening, Dist, Keeper, Proc, Row};

#[derive(clap::Args, Clone)]
pub struct Args {
    /// Rounds of the latency comparison (each: alone, then kept).
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Messages per round (each sent once the previous one came back).
    #[arg(long, default_value_t = 500)]
    pub msgs: usize,
    /// SIGKILLs of the worker, and upgrades, for the stall figures.
    #[arg(long, default_value_t = 10)]
    pub kills: usize,
    /// Idle WebSockets moved by one `holdfast upgrade`, per run.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    pub idle: Vec<usize>,
    /// Also draw connected clients over time through two deploys, the same
    /// chat service as a plain process restarted vs under holdfast
    /// (`holdfast upgrade`), into this PNG.
    #[arg(long)]
    pub plot: Option<std::path::PathBuf>,
    /// Clients in the deploy plot (each reconnects like a browser: after
    /// 100 ms, doubling up to 1.6 s).
    #[arg(long, default_value_t = 200)]
    pub plot_clients: usize,
}

/// A client WebSocket on a raw socket (masked frames out, plain frames in).
struct Ws {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Ws {
    fn open(addr: SocketAddr, room: &str, name: &str) -> anyhow::Result<Ws> {
        let mut s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        write!(
            s,
            "GET /ws/{room}?name={name} HTTP/1.1\r\nHost: b\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\n\r\n"
        )?;
        let mut ws = Ws { s, buf: Vec::new() };
        let end = loop {
            if let Some(i) = ws.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            ws.fill()?;
        };
        if !ws.buf.starts_with(b"HTTP/1.1 101") {
            bail!("no 101: {}", String::from_utf8_lossy(&ws.buf[..end]));
        }
        ws.buf.drain(..end);
        Ok(ws)
    }

    fn fill(&mut self) -> anyhow::Result<()> {
        let mut b = [0u8; 16384];
        let n = self.s.read(&mut b)?;
        if n == 0 {
            bail!("connection closed");
        }
        self.buf.extend_from_slice(&b[..n]);
        Ok(())
    }

    fn send(&mut self, text: &str) -> anyhow::Result<()> {
        let mask = [7u8, 1, 9, 3];
        let p = text.as_bytes();
        let mut f = vec![0x81];
        if p.len() < 126 {
            f.push(0x80 | p.len() as u8);
        } else {
            f.push(0x80 | 126);
            f.extend_from_slice(&(p.len() as u16).to_be_bytes());
        }
        f.extend_from_slice(&mask);
        f.extend(p.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.s.write_all(&f)?;
        Ok(())
    }

    /// The next frame: (opcode, payload).
    fn frame(&mut self) -> anyhow::Result<(u8, Vec<u8>)> {
        loop {
            if self.buf.len() >= 2 {
                let (hl, len) = match self.buf[1] & 0x7f {
                    126 if self.buf.len() >= 4 => (
                        4,
                        usize::from(u16::from_be_bytes([self.buf[2], self.buf[3]])),
                    ),
                    126 | 127 => (usize::MAX, 0),
                    n => (2, usize::from(n)),
                };
                if hl != usize::MAX && self.buf.len() >= hl + len {
                    let op = self.buf[0] & 0x0f;
                    let payload = self.buf[hl..hl + len].to_vec();
                    self.buf.drain(..hl + len);
                    return Ok((op, payload));
                }
            }
            self.fill()?;
        }
    }

    /// Waits for the delivery of a text containing `tag`.
    fn delivered(&mut self, tag: &str) -> anyhow::Result<()> {
        loop {
            let (op, p) = self.frame()?;
            match op {
                1 if String::from_utf8_lossy(&p).contains(tag) => return Ok(()),
                1 | 9 | 10 => {}
                8 => bail!("closed by the server"),
                _ => bail!("unexpected frame {op}"),
            }
        }
    }
}

/// Round trips: send a message, wait for its delivery back.
fn round_trips(ws: &mut Ws, n: usize, tag: &str) -> anyhow::Result<Vec<u64>> {
    let mut v = Vec::with_capacity(n);
    for i in 0..n {
        let text = format!("{tag}-{i}");
        let t = Instant::now();
        ws.send(&text)?;
        ws.delivered(&format!("\"{text}\""))?;
        v.push(t.elapsed().as_nanos() as u64);
    }
    Ok(v)
}

fn chat_cmd(data: &TempDir) -> Vec<std::ffi::OsString> {
    vec![
        bin("hf-chat")
            .map(|p| p.into_os_string())
            .unwrap_or_default(),
        "--data-dir".into(),
        data.path().as_os_str().to_owned(),
    ]
}

fn latency(a: &Args) -> anyhow::Result<Vec<Row>> {
    let (mut alone, mut kept) = (Vec::new(), Vec::new());
    let mut ratios = Vec::new();
    for round in 0..a.rounds {
        let data = TempDir::new("bench-chat");
        let addr = free_port()?;
        let log = data.path().join("alone.log");
        let mut p = Proc::spawn(
            Command::new(bin("hf-chat")?)
                .args(["--listen", &addr.to_string(), "--data-dir"])
                .arg(data.path()),
            &log,
        )?;
        wait_listening(addr, &mut p, "hf-chat", Duration::from_secs(10))?;
        let mut ws = Ws::open(addr, "lat", "b")?;
        round_trips(&mut ws, 50, "warm")?;
        let mut x = round_trips(&mut ws, a.msgs, "a")?;
        drop(ws);
        p.stop(Duration::from_secs(2));

        let data = TempDir::new("bench-chat");
        let cmd = chat_cmd(&data);
        let refs: Vec<&OsStr> = cmd.iter().map(|s| s.as_os_str()).collect();
        let k = Keeper::start(1, &refs)?;
        let mut ws = Ws::open(k.addr, "lat", "b")?;
        round_trips(&mut ws, 50, "warm")?;
        let mut y = round_trips(&mut ws, a.msgs, "k")?;
        drop(ws);
        k.stop();
        x.sort_unstable();
        y.sort_unstable();
        let (mx, my) = (x[x.len() / 2], y[y.len() / 2]);
        println!(
            "round {round}: p50 alone {:.1} µs, kept {:.1} µs",
            mx as f64 / 1e3,
            my as f64 / 1e3
        );
        ratios.push(my as f64 / mx as f64);
        alone.extend(x);
        kept.extend(y);
    }
    alone.sort_unstable();
    kept.sort_unstable();
    ratios.sort_by(f64::total_cmp);
    let (da, dk) = (Dist::of(&alone), Dist::of(&kept));
    let mut rows = Vec::new();
    if let (Some(da), Some(dk)) = (da, dk) {
        println!("{}", da.row_us("ws round trip alone"));
        println!("{}", dk.row_us("ws round trip kept"));
        rows.push(Row::new(
            "websocket",
            "WebSocket message round trip, alone → kept (p50 / p99)",
            format!(
                "{} → {} / {} → {} (per-round p50 ratio {:.3}–{:.3})",
                crate::common::us(da.p50),
                crate::common::us(dk.p50),
                crate::common::us(da.p99),
                crate::common::us(dk.p99),
                ratios[0],
                ratios[ratios.len() - 1]
            ),
        ));
    }
    Ok(rows)
}

/// The round trip of the message in flight when the worker is killed (or
/// the slowest one during an upgrade): the stall a member sees.
fn stalls(a: &Args) -> anyhow::Result<Vec<Row>> {
    let data = TempDir::new("bench-chat");
    let cmd = chat_cmd(&data);
    let refs: Vec<&OsStr> = cmd.iter().map(|s| s.as_os_str()).collect();
    let mut k = Keeper::start(1, &refs)?;
    let mut ws = Ws::open(k.addr, "stall", "s")?;
    let mut kill_stalls = Vec::new();
    for i in 0..a.kills {
        round_trips(&mut ws, 20, &format!("pre{i}"))?;
        let s = k.wait_for(
            "a ready standby",
            Duration::from_secs(20),
            crate::common::standby_ready,
        )?;
        let pid = active_pid(&s).context("no active worker")?;
        let text = format!("kill{i}");
        let t = Instant::now();
        ws.send(&text)?;
        signal(pid, rustix::process::Signal::KILL);
        ws.delivered(&format!("\"{text}\""))?;
        kill_stalls.push(t.elapsed().as_nanos() as u64);
    }
    let mut up_stalls = Vec::new();
    for i in 0..a.kills.min(5) {
        let control = k.control.clone();
        let cmd = cmd.clone();
        let up = std::thread::spawn(move || {
            Command::new(bin("holdfast").expect("holdfast"))
                .arg("upgrade")
                .arg("--control")
                .arg(&control)
                .arg("--")
                .args(&cmd)
                .output()
        });
        let mut worst = 0u64;
        let mut n = 0;
        while !up.is_finished() || n < 20 {
            let v = round_trips(&mut ws, 1, &format!("up{i}-{n}"))?;
            worst = worst.max(v[0]);
            n += 1;
        }
        let out = up.join().map_err(|_| anyhow::anyhow!("upgrade thread"))??;
        if !out.status.success() {
            bail!("upgrade failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        up_stalls.push(worst);
    }
    drop(ws);
    k.stop();
    kill_stalls.sort_unstable();
    up_stalls.sort_unstable();
    let mut rows = Vec::new();
    if let Some(d) = Dist::of(&kill_stalls) {
        println!("{}", d.row_us("ws stall across a SIGKILL"));
        rows.push(Row::new(
            "websocket",
            "WebSocket stall across a worker SIGKILL (message in flight; p50 / max)",
            format!(
                "{} / {} over {} kills, no close",
                crate::common::us(d.p50),
                crate::common::us(d.max),
                kill_stalls.len()
            ),
        ));
    }
    if let Some(d) = Dist::of(&up_stalls) {
        println!("{}", d.row_us("ws worst round trip during an upgrade"));
        rows.push(Row::new(
            "websocket",
            "WebSocket worst round trip during `holdfast upgrade` (p50 / max of upgrades)",
            format!(
                "{} / {} over {} upgrades, no close",
                crate::common::us(d.p50),
                crate::common::us(d.max),
                up_stalls.len()
            ),
        ));
    }
    Ok(rows)
}

/// Room of the `i`-th idle WebSocket: rooms of 100.
fn room_of(i: usize) -> String {
    format!("idle{}", i / 100)
}

fn idle_moves(a: &Args) -> anyhow::Result<Vec<Row>> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    // Client, keeper and worker each hold one fd per WebSocket.
    let want = 3 * a.idle.iter().max().copied().unwrap_or(0) as u64 + 1024;
    let lim = getrlimit(Resource::Nofile);
    if lim.current.is_some_and(|c| c < want) {
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(want),
                maximum: Some(want.max(lim.maximum.unwrap_or(0))),
            },
        );
    }
    let limit = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
    let mut rows = Vec::new();
    for &n in &a.idle {
        if n as u64 + 256 > limit / 2 {
            println!("skipping {n} idle WebSockets: RLIMIT_NOFILE is {limit}");
            continue;
        }
        let data = TempDir::new("bench-chat");
        let cmd = chat_cmd(&data);
        let refs: Vec<&OsStr> = cmd.iter().map(|s| s.as_os_str()).collect();
        let k = Keeper::start_with(1, &["--max-conns", &(n + 100).to_string()], &refs)?;
        let t = Instant::now();
        let mut conns = Vec::with_capacity(n);
        for i in 0..n {
            conns.push(
                Ws::open(k.addr, &room_of(i), &format!("i{i}"))
                    .with_context(|| format!("opening WebSocket {i}"))?,
            );
        }
        println!(
            "{n} idle WebSockets open in {:.1} s",
            t.elapsed().as_secs_f64()
        );
        let t = Instant::now();
        let out = Command::new(bin("holdfast")?)
            .arg("upgrade")
            .arg("--control")
            .arg(&k.control)
            .arg("--")
            .args(&cmd)
            .output()?;
        let took = t.elapsed();
        if !out.status.success() {
            bail!("upgrade failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        // Closed by the move? Anything readable now is a close or a reset.
        let mut closed = 0;
        for c in &mut conns {
            c.s.set_nonblocking(true)?;
            let mut b = [0u8; 64];
            match c.s.read(&mut b) {
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                _ => closed += 1,
            }
            c.s.set_nonblocking(false)?;
        }
        // Still served, by the new version: one message per room reaches
        // every member.
        let mut dead = 0;
        for c in &mut conns {
            c.s.set_read_timeout(Some(Duration::from_secs(3)))?;
        }
        for i in (0..n).step_by(100) {
            conns[i].send(&format!("after-{i}"))?;
        }
        for (i, c) in conns.iter_mut().enumerate() {
            let first = i / 100 * 100;
            if c.delivered(&format!("after-{first}")).is_err() {
                dead += 1;
            }
        }
        // `holdfast upgrade` says how long moving them took.
        let said = String::from_utf8_lossy(&out.stdout).into_owned();
        let moved = said.split("at commit points in ").nth(1).and_then(|v| {
            v.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse::<u64>()
                .ok()
        });
        println!(
            "{n} idle WebSockets: `holdfast upgrade` took {:.0} ms (moves: {}), {closed} closed, {dead} not delivering afterwards",
            took.as_secs_f64() * 1e3,
            moved.map_or("?".into(), |m| format!("{m} ms")),
        );
        rows.push(Row::new(
            "websocket",
            format!("{n} idle WebSockets moved by `holdfast upgrade`"),
            format!(
                "moved in {} ms ({:.0} ms for the whole upgrade); {closed} closed; {dead} not delivering afterwards",
                moved.map_or("?".into(), |m| m.to_string()),
                took.as_secs_f64() * 1e3
            ),
        ));
        drop(conns);
        k.stop();
    }
    Ok(rows)
}

/// Connected clients sampled every 10 ms: (seconds, connected).
type Series = Vec<(f64, usize)>;

const DEPLOYS: [f64; 2] = [1.0, 3.0];
const PLOT_SECS: f64 = 5.0;

/// `clients` members of one room that reconnect when dropped, counted
/// while `deploy` runs at each of [`DEPLOYS`]; returns the series and the
/// number of disconnections.
fn connected_over_time(
    addr: SocketAddr,
    clients: usize,
    mut deploy: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<(Series, usize)> {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    let connected = Arc::new(AtomicUsize::new(0));
    let drops = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for i in 0..clients {
        let (connected, drops, stop) = (connected.clone(), drops.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            let mut backoff = Duration::from_millis(100);
            while !stop.load(Ordering::Relaxed) {
                let Ok(mut ws) = Ws::open(addr, "deploy", &format!("c{i}")) else {
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_millis(1600));
                    continue;
                };
                backoff = Duration::from_millis(100);
                let _ = ws.s.set_read_timeout(Some(Duration::from_millis(100)));
                connected.fetch_add(1, Ordering::Relaxed);
                let mut b = [0u8; 4096];
                let dropped = loop {
                    if stop.load(Ordering::Relaxed) {
                        break false;
                    }
                    match ws.s.read(&mut b) {
                        Ok(0) => break true,
                        Ok(_) if b[0] == 0x88 => break true,
                        Ok(_) => {}
                        Err(e)
                            if e.kind() == ErrorKind::WouldBlock
                                || e.kind() == ErrorKind::TimedOut => {}
                        Err(_) => break true,
                    }
                };
                connected.fetch_sub(1, Ordering::Relaxed);
                if dropped {
                    drops.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(backoff);
                }
            }
        }));
    }
    // All connected before the clock starts.
    let t = Instant::now();
    while connected.load(Ordering::Relaxed) < clients && t.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(10));
    }
    drops.store(0, Ordering::Relaxed);
    let t0 = Instant::now();
    let mut series = Series::new();
    let mut next = 0;
    while t0.elapsed().as_secs_f64() < PLOT_SECS {
        let now = t0.elapsed().as_secs_f64();
        if next < DEPLOYS.len() && now >= DEPLOYS[next] {
            deploy()?;
            next += 1;
        }
        series.push((
            t0.elapsed().as_secs_f64(),
            connected.load(Ordering::Relaxed),
        ));
        std::thread::sleep(Duration::from_millis(10));
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    Ok((series, drops.load(Ordering::Relaxed)))
}

fn deploy_plot(a: &Args, path: &std::path::Path) -> anyhow::Result<Vec<Row>> {
    let n = a.plot_clients;
    // The same service as a plain process: a deploy stops it and starts
    // the new one on the same port.
    let data = TempDir::new("bench-chat");
    let addr = free_port()?;
    let spawn = |i: usize| -> anyhow::Result<Proc> {
        let mut p = Proc::spawn(
            Command::new(bin("hf-chat")?)
                .args(["--listen", &addr.to_string(), "--data-dir"])
                .arg(data.path()),
            &data.path().join(format!("plain{i}.log")),
        )?;
        wait_listening(addr, &mut p, "hf-chat", Duration::from_secs(10))?;
        Ok(p)
    };
    let mut current = Some(spawn(0)?);
    let mut gen = 0;
    let (plain, plain_drops) = connected_over_time(addr, n, || {
        if let Some(mut p) = current.take() {
            p.stop(Duration::from_secs(5));
        }
        gen += 1;
        current = Some(spawn(gen)?);
        Ok(())
    })?;
    drop(current);

    let data = TempDir::new("bench-chat");
    let cmd = chat_cmd(&data);
    let refs: Vec<&OsStr> = cmd.iter().map(|s| s.as_os_str()).collect();
    let k = Keeper::start(1, &refs)?;
    let (kept, kept_drops) = connected_over_time(k.addr, n, || {
        // In the background: the deploy takes as long as it takes.
        let control = k.control.clone();
        let cmd = cmd.clone();
        std::thread::spawn(move || {
            let _ = Command::new(bin("holdfast").expect("holdfast"))
                .arg("upgrade")
                .arg("--control")
                .arg(&control)
                .arg("--")
                .args(&cmd)
                .output();
        });
        Ok(())
    })?;
    k.stop();

    let min = |s: &Series| s.iter().map(|p| p.1).min().unwrap_or(0);
    println!(
        "deploys at {DEPLOYS:?} s, {n} clients: plain restart: {plain_drops} disconnections, as few as {} connected; holdfast upgrade: {kept_drops} disconnections, as few as {} connected",
        min(&plain),
        min(&kept)
    );
    crate::report::load_font()?;
    draw_deploys(path, n, &plain, &kept)?;
    println!("plot: {}", path.display());
    Ok(vec![
        Row::new(
            "websocket",
            format!("{n} chat clients, two deploys: plain process restarted"),
            format!(
                "{plain_drops} disconnections; as few as {} connected",
                min(&plain)
            ),
        ),
        Row::new(
            "websocket",
            format!("{n} chat clients, two deploys: holdfast upgrade"),
            format!(
                "{kept_drops} disconnections; as few as {} connected",
                min(&kept)
            ),
        ),
    ])
}

fn draw_deploys(
    path: &std::path::Path,
    n: usize,
    plain: &Series,
    kept: &Series,
) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let pe = |e: &dyn std::fmt::Display| anyhow::anyhow!("drawing: {e}");
    let root = BitMapBackend::new(path, (900, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| pe(&e))?;
    let mut ch = ChartBuilder::on(&root)
        .caption(
            format!("Connected chat clients through two deploys ({n} clients)"),
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..PLOT_SECS, 0f64..(n as f64 * 1.1))
        .map_err(|e| pe(&e))?;
    ch.configure_mesh()
        .x_desc("seconds")
        .y_desc("connected")
        .draw()
        .map_err(|e| pe(&e))?;
    for d in DEPLOYS {
        ch.draw_series(LineSeries::new(
            [(d, 0.0), (d, n as f64 * 1.1)],
            BLACK.mix(0.3),
        ))
        .map_err(|e| pe(&e))?;
    }
    let red = RGBColor(200, 40, 40);
    let green = RGBColor(40, 150, 60);
    ch.draw_series(LineSeries::new(
        plain.iter().map(|&(t, c)| (t, c as f64)),
        red.stroke_width(2),
    ))
    .map_err(|e| pe(&e))?
    .label("plain process, restarted on deploy")
    .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], red.stroke_width(2)));
    ch.draw_series(LineSeries::new(
        kept.iter().map(|&(t, c)| (t, c as f64)),
        green.stroke_width(2),
    ))
    .map_err(|e| pe(&e))?
    .label("under holdfast, holdfast upgrade")
    .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], green.stroke_width(2)));
    ch.configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| pe(&e))?;
    root.present().map_err(|e| pe(&e))?;
    Ok(())
}

pub fn run(a: &Args) -> anyhow::Result<Vec<Row>> {
    if let Some(path) = &a.plot {
        return deploy_plot(a, path);
    }
    let mut rows = latency(a)?;
    rows.extend(stalls(a)?);
    rows.extend(idle_moves(a)?);
    Ok(rows)
}
