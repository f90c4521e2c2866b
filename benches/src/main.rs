//! hf-bench: benchmarks for holdfast, run against the real binaries
//! (`holdfast`, `hf-httpd`, `hf-testsvc`) found next to this executable.
//!
//! ```text
//! cargo build --release --workspace
//! target/release/hf-bench recovery   [--kills 1000] [--conns 64] [--client auto|threads|epoll]
//! target/release/hf-bench throughput [--secs 3] [--rounds 5] [--conns 32] [--hang-timeout 200]
//! target/release/hf-bench memory     [--conns 100,10000]
//! target/release/hf-bench hang       [--timeout-ms 200] [--rounds 30]
//! target/release/hf-bench storm      [--secs 10] [--conns 64] [--every-ms 50]
//! target/release/hf-bench upgrade    [--idle 1000,10000] [--rounds 3] [--secs 8] [--every-ms 1000]
//! target/release/hf-bench services   [--only cgi,resume,proxy,ftp,memory] [--rounds 5] [--downloads 4]
//! target/release/hf-bench websocket  [--rounds 5] [--msgs 500] [--kills 10] [--idle 1000,10000]
//! target/release/hf-bench all
//! target/release/hf-bench faults
//! target/release/hf-bench report     [--quick] --out results/DIR   (or bench/run [--quick])
//! ```
//!
//! Meant for small, noisy, shared machines: what is compared is measured in
//! the same run, interleaved, and reported as ratios. Only loopback
//! addresses are used; every process started is stopped before exit.

#![forbid(unsafe_code)]

mod common;
mod hang;
mod memory;
mod recovery;
mod report;
mod services;
mod storm;
mod throughput;
mod upgrade;
mod websocket;

use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};

use common::{print_summary, Row};

#[derive(Parser)]
#[command(
    name = "hf-bench",
    about = "Benchmarks for holdfast (recovery latency, throughput overhead, keeper memory, upgrades)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Crash → first replayed byte at the client, hot-standby takeover after SIGKILL.
    Recovery(recovery::Args),
    /// Requests per second of hf-httpd alone vs under the keeper, interleaved
    /// (or, with `--hang-timeout MS`, under a keeper without vs with it).
    Throughput(throughput::Args),
    /// Keeper memory per held connection.
    Memory(memory::Args),
    /// Hung worker → noticed, killed and replaced (hang → first byte).
    Hang(hang::Args),
    /// Crash storm side by side: holdfast, nginx, a plain restart loop.
    Storm(storm::Args),
    /// `holdfast upgrade`: idle connections moved, and an upgrade storm
    /// side by side with nginx reload and binary upgrade.
    Upgrade(upgrade::Args),
    /// The services side by side, alone vs under the keeper: hf-httpd's CGI,
    /// hf-proxy and hf-ftpd throughput; kill → next byte of a download,
    /// resumed vs replayed in full; keeper memory at idle connections.
    Services(services::Args),
    /// hf-chat's WebSocket rooms: message round trip alone vs kept
    /// (interleaved), the stall across a SIGKILL and across an upgrade,
    /// idle WebSockets moved by `holdfast upgrade`.
    Websocket(websocket::Args),
    /// All of them with their defaults, and one summary table.
    All,
    /// Figures for faults beyond crashes, one summary table: what watching
    /// the heartbeat costs (`throughput --hang-timeout 200 --rounds 10
    /// --secs 2`, then the same with `--hang-timeout 0`: the noise floor)
    /// and SIGKILLs with 10,000 connections mid-answer (`recovery --conns
    /// 10000 --kills 20`). About five minutes.
    Faults,
    /// Everything, sized for a report (`--quick`: under five minutes on two
    /// cores), written to DIR as report.md (figures, spreads, targets met
    /// or missed), rows.json and PNG plots. `bench/run` runs it.
    Report(report::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let t0 = Instant::now();
    let mut rows: Vec<Row> = Vec::new();
    let mut failed = false;
    let mut step = |name: &str, r: anyhow::Result<Vec<Row>>| match r {
        Ok(v) => rows.extend(v),
        Err(e) => {
            eprintln!("hf-bench {name}: {e:#}");
            failed = true;
        }
    };
    match cli.cmd {
        Cmd::Recovery(a) => step("recovery", recovery::run(&a)),
        Cmd::Throughput(a) => step("throughput", throughput::run(&a)),
        Cmd::Memory(a) => step("memory", memory::run(&a)),
        Cmd::Hang(a) => step("hang", hang::run(&a)),
        Cmd::Storm(a) => step("storm", storm::run(&a)),
        Cmd::Upgrade(a) => step("upgrade", upgrade::run(&a)),
        Cmd::Services(a) => step("services", services::run(&a)),
        Cmd::Report(a) => step("report", report::run(&a)),
        Cmd::Websocket(a) => step("websocket", websocket::run(&a)),
        Cmd::All => {
            // Each subcommand's own defaults, parsed as if given alone.
            let defaults = |sub: &str| Cli::try_parse_from(["hf-bench", sub]).map(|c| c.cmd);
            let (
                Ok(Cmd::Recovery(ra)),
                Ok(Cmd::Throughput(ta)),
                Ok(Cmd::Memory(ma)),
                Ok(Cmd::Hang(ha)),
                Ok(Cmd::Storm(sa)),
                Ok(Cmd::Upgrade(ua)),
                Ok(Cmd::Services(sva)),
            ) = (
                defaults("recovery"),
                defaults("throughput"),
                defaults("memory"),
                defaults("hang"),
                defaults("storm"),
                defaults("upgrade"),
                defaults("services"),
            )
            else {
                unreachable!("subcommand defaults parse")
            };
            step("recovery", recovery::run(&ra));
            println!();
            step("throughput", throughput::run(&ta));
            println!();
            step("memory", memory::run(&ma));
            println!();
            step("hang", hang::run(&ha));
            println!();
            step("storm", storm::run(&sa));
            println!();
            step("upgrade", upgrade::run(&ua));
            println!();
            step("services", services::run(&sva));
        }
        Cmd::Faults => {
            let parse = |args: &[&str]| {
                Cli::try_parse_from(std::iter::once("hf-bench").chain(args.iter().copied()))
                    .map(|c| c.cmd)
            };
            let (Ok(Cmd::Throughput(hb)), Ok(Cmd::Throughput(aa)), Ok(Cmd::Recovery(ra))) = (
                parse(&[
                    "throughput",
                    "--hang-timeout",
                    "200",
                    "--rounds",
                    "10",
                    "--secs",
                    "2",
                ]),
                parse(&[
                    "throughput",
                    "--hang-timeout",
                    "0",
                    "--rounds",
                    "10",
                    "--secs",
                    "2",
                ]),
                parse(&["recovery", "--conns", "10000", "--kills", "20"]),
            ) else {
                unreachable!("faults arguments parse")
            };
            step("heartbeat", throughput::run(&hb));
            println!();
            step("heartbeat A/A", throughput::run(&aa));
            println!();
            step("recovery", recovery::run(&ra));
        }
    }
    print_summary(&rows);
    println!("(total {:.1} s)", t0.elapsed().as_secs_f64());
    if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
