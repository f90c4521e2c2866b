//! `hf-bench hang`: how long a hung worker takes to be noticed and replaced.
//!
//! Each round a connection sends `STALL <id> <len>` to hf-testsvc on the
//! tokio flavour: the worker writes the first half of its answer and then
//! blocks its runtime's only thread, so its heartbeat stops. The client
//! takes `t0` when the first half arrives and `t1` when the first byte of the
//! second half does (written by the successor after the keeper killed the
//! hung worker). `t1 - t0` is detection plus recovery; against the
//! configured `--hang-timeout` it shows how late detection comes (the
//! keeper looks every timeout / 4).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::common::{active_pid, standby_ready, Dist, Keeper, Row};

#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    /// The keeper's --hang-timeout, in milliseconds.
    #[arg(long, default_value_t = 200)]
    pub timeout_ms: u64,
    /// Hangs to provoke.
    #[arg(long, default_value_t = 30)]
    pub rounds: usize,
}

pub fn run(a: &Args) -> anyhow::Result<Vec<Row>> {
    if a.rounds == 0 || a.timeout_ms == 0 {
        bail!("--rounds and --timeout-ms must be at least 1");
    }
    println!(
        "== hang: a worker blocks its runtime mid-answer, {} times, --hang-timeout {} ms ==",
        a.rounds, a.timeout_ms
    );
    let svc = crate::common::bin("hf-testsvc")?;
    let timeout = a.timeout_ms.to_string();
    let mut keeper = Keeper::start_with(
        1,
        &["--hang-timeout", &timeout],
        &[svc.as_os_str(), std::ffi::OsStr::new("--tokio")],
    )?;
    let len = 200usize;
    let mut samples = Vec::with_capacity(a.rounds);
    for round in 0..a.rounds {
        let id = round as u64 + 1;
        let want = hf_tests::testsvc::answer(id, len, 0);
        let half = hf_tests::testsvc::half(id, len);
        let mut s = TcpStream::connect(keeper.addr).context("connect")?;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        s.write_all(format!("STALL {id} {len}\n").as_bytes())?;
        let mut got = vec![0u8; want.len()];
        s.read_exact(&mut got[..half]).context("first half")?;
        let t0 = Instant::now();
        s.read_exact(&mut got[half..half + 1])
            .context("first byte after the hang")?;
        samples.push(t0.elapsed().as_nanos() as u64);
        s.read_exact(&mut got[half + 1..])
            .context("rest of the answer")?;
        if got != want {
            bail!("round {round}: answer differs");
        }
        keeper.wait_for(
            "a new active worker and a ready standby",
            Duration::from_secs(20),
            |st| st.restarts as usize == round + 1 && active_pid(st).is_some() && standby_ready(st),
        )?;
    }
    let d = Dist::of(&samples).context("no samples")?;
    println!("{}", d.row_us("hang → first byte from the successor"));
    let ratio = d.p50 as f64 / (a.timeout_ms as f64 * 1e6);
    println!("  p50 is {ratio:.2}× the configured timeout (checks run every timeout / 4)");
    Ok(vec![
        Row::new(
            "hang",
            format!("hang→1st byte p50/p99/max (timeout {} ms)", a.timeout_ms),
            d.short_us(),
        ),
        Row::new("hang", "p50 / configured timeout", format!("{ratio:.2}×")),
    ])
}
