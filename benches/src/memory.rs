//! `hf-bench memory`: what the keeper costs in memory per held connection.
//!
//! The keeper runs hf-httpd; N idle keep-alive connections are opened, each
//! after one request (so it has been handed to the worker and journaled).
//! Then, from /proc/<keeper pid>: VmRSS (status), Rss / Pss / private
//! (smaps_rollup), and the resident size of the journal memfd mapping
//! (smaps). N grows through the list (connections stay open); the baseline
//! is 0 connections.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::common::{active_pid, bin, kib, raise_nofile, Keeper, Row, TempDir};

#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    /// Connection counts to measure at (ascending; a 0 baseline is always measured).
    #[arg(long, value_delimiter = ',', default_value = "100,10000")]
    pub conns: Vec<usize>,
}

/// A process's memory, from /proc (bytes).
#[derive(Clone, Copy, Default, Debug)]
pub(crate) struct Mem {
    vm_rss: u64,
    rss: u64,
    pss: u64,
    private: u64,
    pub(crate) private_dirty: u64,
    /// Resident part of the journal mapping (a keeper's).
    pub(crate) journal_rss: u64,
    journal_size: u64,
}

fn kb_field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let v = l.strip_prefix(key)?.strip_prefix(':')?;
        v.split_whitespace()
            .next()?
            .parse::<u64>()
            .ok()
            .map(|k| k * 1024)
    })
}

/// `pid`'s memory; an error if it has no journal mapping (not a keeper).
pub(crate) fn read_mem(pid: u32) -> anyhow::Result<Mem> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    let mut m = Mem {
        vm_rss: kb_field(&status, "VmRSS").context("VmRSS")?,
        rss: kb_field(&rollup, "Rss").context("Rss")?,
        pss: kb_field(&rollup, "Pss").context("Pss")?,
        private: kb_field(&rollup, "Private_Clean").context("Private_Clean")?
            + kb_field(&rollup, "Private_Dirty").context("Private_Dirty")?,
        private_dirty: kb_field(&rollup, "Private_Dirty").context("Private_Dirty")?,
        ..Mem::default()
    };
    // smaps: a header line per mapping ("start-end perms offset dev inode
    // path"), then "Key: value kB" lines.
    let mut in_journal = false;
    for l in smaps.lines() {
        let first = l.split_whitespace().next().unwrap_or("");
        if !first.ends_with(':') && first.contains('-') {
            in_journal = l.contains("holdfast-journal");
            if in_journal {
                if let Some((a, b)) = first.split_once('-') {
                    if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16))
                    {
                        m.journal_size += b - a;
                    }
                }
            }
        } else if in_journal {
            if let Some(v) = kb_field(l, "Rss") {
                m.journal_rss += v;
            }
        }
    }
    if m.journal_size == 0 {
        bail!("no holdfast-journal mapping in /proc/{pid}/smaps");
    }
    Ok(m)
}

/// Opens `n` more connections, each after one complete request.
fn open_more(
    addr: std::net::SocketAddr,
    n: usize,
    socks: &mut Vec<TcpStream>,
) -> anyhow::Result<()> {
    const BATCH: usize = 250;
    let req = format!("GET /tiny.txt HTTP/1.1\r\nHost: {addr}\r\n\r\n").into_bytes();
    let mut buf = [0u8; 4096];
    let mut left = n;
    while left > 0 {
        let b = left.min(BATCH);
        let mut batch = Vec::with_capacity(b);
        for _ in 0..b {
            let s = TcpStream::connect(addr)
                .with_context(|| format!("connection #{} to {addr}", socks.len() + batch.len()))?;
            s.set_read_timeout(Some(Duration::from_secs(20)))?;
            s.set_nodelay(true)?;
            batch.push(s);
        }
        for s in batch.iter_mut() {
            s.write_all(&req)?;
        }
        for s in batch.iter_mut() {
            // One small response: read until its body ("ok\n") is in.
            let mut got = Vec::new();
            while !(got.windows(4).any(|w| w == b"\r\n\r\n") && got.ends_with(b"ok\n")) {
                let k = s.read(&mut buf).context("reading the first response")?;
                if k == 0 {
                    bail!("server closed connection #{} before answering", socks.len());
                }
                got.extend_from_slice(&buf[..k]);
            }
            if !got.starts_with(b"HTTP/1.1 200") {
                bail!(
                    "unexpected response: {}",
                    String::from_utf8_lossy(&got[..got.len().min(40)])
                );
            }
        }
        socks.extend(batch);
        left -= b;
    }
    Ok(())
}

pub fn run(a: &Args) -> anyhow::Result<Vec<Row>> {
    let mut targets = a.conns.clone();
    targets.sort_unstable();
    targets.dedup();
    targets.retain(|n| *n > 0);
    let limit = raise_nofile();
    let max = targets.last().copied().unwrap_or(0);
    println!(
        "== memory: keeper + hf-httpd, idle keep-alive connections held: 0, {} ==",
        targets
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    // This process holds N client sockets; the keeper and the worker N each.
    let room = limit.saturating_sub(100) as usize;
    if max > room {
        println!("warning: RLIMIT_NOFILE is {limit} here: measuring at most {room} connections (raise the hard limit for more)");
        targets.retain(|n| *n < room);
        targets.push(room);
    }
    let max = targets.last().copied().unwrap_or(0);
    let httpd = bin("hf-httpd")?;
    let site = TempDir::new("site");
    std::fs::write(site.path().join("tiny.txt"), b"ok\n")?;
    let mut keeper = Keeper::start(
        1,
        &[
            httpd.as_os_str(),
            "--root".as_ref(),
            site.path().as_os_str(),
        ],
    )?;
    let kpid = keeper.pid();
    println!(
        "keeper pid {kpid} on {} (RLIMIT_NOFILE here: {limit})",
        keeper.addr
    );

    let settle = |keeper: &mut Keeper, n: usize| -> anyhow::Result<u32> {
        let s = keeper.wait_held(n)?;
        std::thread::sleep(Duration::from_millis(200));
        active_pid(&s).context("no active worker")
    };

    let mut results: Vec<(usize, Mem, Mem, Option<Mem>)> = Vec::new();
    let w = settle(&mut keeper, 0)?;
    // The standby's own memory, for the report: what the hot spare costs.
    let standby_mem = |keeper: &Keeper| -> Option<Mem> {
        let s = keeper.status().ok()?;
        let w = s
            .workers
            .iter()
            .find(|w| w.role == hf_keeper::status::Role::Standby)?;
        read_mem(w.pid).ok()
    };
    results.push((0, read_mem(kpid)?, read_mem(w)?, standby_mem(&keeper)));
    let mut socks: Vec<TcpStream> = Vec::with_capacity(max);
    for &n in &targets {
        let t = Instant::now();
        open_more(keeper.addr, n - socks.len(), &mut socks)?;
        let w = settle(&mut keeper, n)?;
        println!(
            "  {n} connections open and handed over ({:.2} s)",
            t.elapsed().as_secs_f64()
        );
        results.push((n, read_mem(kpid)?, read_mem(w)?, standby_mem(&keeper)));
    }
    let snap = keeper.status()?;
    drop(socks);
    keeper.stop();

    let base = results[0].1;
    let wbase = results[0].2;
    println!();
    println!(
        "journal mapping: {} virtual ({} MiB for the default --max-conns 65536 at 1 KiB a record)",
        kib(base.journal_size),
        base.journal_size >> 20
    );
    println!(
        "{:>7} │ {:>11} {:>11} {:>11} {:>11} {:>11} {:>12} │ {:>13} {:>13} {:>13} │ {:>14}",
        "conns",
        "VmRSS",
        "Rss",
        "Pss",
        "private",
        "priv. dirty",
        "journal Rss",
        "Δprivate/c",
        "Δdirty/c",
        "Δjournal/c",
        "worker dirty"
    );
    let mut rows = Vec::new();
    for (n, m, wm, sm) in &results {
        let per = |now: u64, then: u64| {
            if *n == 0 {
                "-".to_owned()
            } else {
                format!("{:.0} B", (now as f64 - then as f64) / *n as f64)
            }
        };
        println!(
            "{:>7} │ {:>11} {:>11} {:>11} {:>11} {:>11} {:>12} │ {:>13} {:>13} {:>13} │ {:>14}",
            n,
            kib(m.vm_rss),
            kib(m.rss),
            kib(m.pss),
            kib(m.private),
            kib(m.private_dirty),
            kib(m.journal_rss),
            per(m.private, base.private),
            per(m.private_dirty, base.private_dirty),
            per(m.journal_rss, base.journal_rss),
            kib(wm.private_dirty)
        );
        rows.push(
            Row::new(
                "memory",
                format!("keeper private (dirty) + journal Rss @ {n} conns"),
                format!(
                    "{} ({}) + {}",
                    kib(m.private),
                    kib(m.private_dirty),
                    kib(m.journal_rss)
                ),
            )
            .num("conns", *n as f64)
            .num("keeper_private", m.private as f64)
            .num("keeper_private_dirty", m.private_dirty as f64)
            .num("journal_rss", m.journal_rss as f64)
            .num("worker_private_dirty", wm.private_dirty as f64)
            .num(
                "standby_private_dirty",
                sm.map_or(f64::NAN, |s| s.private_dirty as f64),
            ),
        );
        if *n > 0 {
            rows.push(Row::new(
                "memory",
                format!("per conn @ {n}: keeper private; dirty; journal; worker dirty"),
                format!(
                    "{} ; {} ; {} ; {}",
                    per(m.private, base.private),
                    per(m.private_dirty, base.private_dirty),
                    per(m.journal_rss, base.journal_rss),
                    per(wm.private_dirty, wbase.private_dirty)
                ),
            ));
        }
    }
    println!("(private = Private_Clean + Private_Dirty of smaps_rollup — Private_Clean is mostly the binary's text and drops when other");
    println!(" processes map the same binary, so the dirty part is the steadier figure; the journal is a shared memfd mapping, in Rss/Pss,");
    println!(" not in private; worker dirty = Private_Dirty of the active hf-httpd worker, for comparison; Δ…/c = (value − value at 0) / conns)");
    println!(
        "keeper accepted {} connections in all, {} held at the end",
        snap.accepted, snap.connections
    );
    Ok(rows)
}
