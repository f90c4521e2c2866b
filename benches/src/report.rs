//! `hf-bench report`: every measurement in one run, sized for a quick look
//! (`--quick`, under five minutes on two cores) or for the figures
//! (longer), written as a report: `report.md` (every figure with its
//! spread, each target met or missed, the command and the machine),
//! `rows.json` (the raw rows, with the numbers behind them) and PNG plots.
//!
//! It runs the other subcommands' `run` functions with arguments chosen
//! here, plus what they do not measure alone: overhead with 64 KiB files
//! and with a connection per request, recovery at several held-connection
//! counts, throughput as client connections grow, and the services'
//! figures (`hf-bench services`). Nothing here is
//! measured differently from the subcommands: their own rows, with the
//! numbers they attach ([`Row::nums`]), are what the report is made of.
//!
//! `bench/run [--quick]` at the repository root installs what the
//! side-by-side rows need (wrk, nginx), builds, and runs this.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::Parser;

use crate::common::Row;
use crate::{hang, memory, recovery, services, storm, throughput, upgrade};

#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    /// Short runs: every section, fewer rounds and kills (under five
    /// minutes on two cores).
    #[arg(long)]
    pub quick: bool,
    /// Directory to write report.md, rows.json and the plots to (created).
    #[arg(long)]
    pub out: PathBuf,
}

/// A subcommand's arguments parsed from strings, so that the report runs
/// exactly what `hf-bench <subcommand> <args>` would (and says so).
#[derive(Parser)]
#[command(no_binary_name = true)]
struct Sub<A: clap::Args> {
    #[command(flatten)]
    a: A,
}

fn parse<A: clap::Args>(args: &[String]) -> anyhow::Result<A> {
    Ok(Sub::<A>::try_parse_from(args)
        .with_context(|| format!("report arguments {args:?}"))?
        .a)
}

/// One measurement of the report: which subcommand, with what, and what it
/// gave.
struct Section {
    /// Short key for rows.json and for finding rows ("overhead", "recovery@64", ...).
    key: String,
    /// The equivalent command line.
    cmd: String,
    rows: Vec<Row>,
    error: Option<String>,
    secs: f64,
}

/// The sizes of everything, quick or full.
struct Plan {
    tp_rounds: usize,
    tp_secs: u64,
    /// (held connections, kills)
    recovery: Vec<(usize, usize)>,
    memory: &'static str,
    hang_rounds: usize,
    storm_secs: u64,
    upgrade: Vec<&'static str>,
    scaling: Vec<usize>,
    scaling_rounds: usize,
    services: Vec<&'static str>,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                tp_rounds: 6,
                tp_secs: 1,
                recovery: vec![(64, 1000), (1000, 20)],
                memory: "100,1000",
                hang_rounds: 5,
                storm_secs: 4,
                upgrade: vec![
                    "--idle",
                    "1000",
                    "--rounds",
                    "2",
                    "--before-secs",
                    "1",
                    "--secs",
                    "4",
                ],
                scaling: vec![1, 8, 64, 256],
                scaling_rounds: 1,
                // About 40 s.
                services: vec!["--rounds", "3", "--downloads", "4"],
            }
        } else {
            Plan {
                tp_rounds: 10,
                tp_secs: 2,
                recovery: vec![(64, 1000), (1000, 100), (10_000, 20)],
                memory: "100,1000,10000",
                hang_rounds: 30,
                storm_secs: 30,
                upgrade: vec![],
                scaling: vec![1, 4, 16, 64, 256, 1024],
                scaling_rounds: 3,
                services: vec!["--rounds", "8", "--downloads", "20"],
            }
        }
    }
}

fn strs(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

pub fn run(a: &Args) -> anyhow::Result<Vec<Row>> {
    let t0 = Instant::now();
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let p = Plan::new(a.quick);
    let mut sections: Vec<Section> = Vec::new();
    // Runs one subcommand; a failure is reported in its section, and the
    // report goes on with the others.
    fn step<A: clap::Args>(
        sections: &mut Vec<Section>,
        key: &str,
        sub: &str,
        args: Vec<String>,
        f: fn(&A) -> anyhow::Result<Vec<Row>>,
    ) {
        let cmd = format!("hf-bench {sub} {}", args.join(" "));
        println!("\n##### report: {key}: {cmd}");
        let t = Instant::now();
        let (rows, error) = match parse::<A>(&args).and_then(|x| f(&x)) {
            Ok(r) => (r, None),
            Err(e) => {
                eprintln!("hf-bench report, {key}: {e:#}");
                (Vec::new(), Some(format!("{e:#}")))
            }
        };
        sections.push(Section {
            key: key.to_owned(),
            cmd: cmd.trim_end().to_owned(),
            rows,
            error,
            secs: t.elapsed().as_secs_f64(),
        });
    }
    let (r, s) = (p.tp_rounds.to_string(), p.tp_secs.to_string());
    step::<throughput::Args>(
        &mut sections,
        "overhead",
        "throughput",
        strs(&["--sizes", "1,16,64", "--rounds", &r, "--secs", &s]),
        throughput::run,
    );
    step::<throughput::Args>(
        &mut sections,
        "overhead-close",
        "throughput",
        strs(&["--close", "--sizes", "1", "--rounds", &r, "--secs", &s]),
        throughput::run,
    );
    for &(conns, kills) in &p.recovery {
        step::<recovery::Args>(
            &mut sections,
            &format!("recovery@{conns}"),
            "recovery",
            strs(&[
                "--conns",
                &conns.to_string(),
                "--kills",
                &kills.to_string(),
                "--ack",
                "quick",
                "--max-secs",
                if a.quick { "40" } else { "300" },
            ]),
            recovery::run,
        );
    }
    step::<memory::Args>(
        &mut sections,
        "memory",
        "memory",
        strs(&["--conns", p.memory]),
        memory::run,
    );
    step::<hang::Args>(
        &mut sections,
        "hang",
        "hang",
        strs(&["--rounds", &p.hang_rounds.to_string()]),
        hang::run,
    );
    step::<storm::Args>(
        &mut sections,
        "storm",
        "storm",
        strs(&["--secs", &p.storm_secs.to_string()]),
        storm::run,
    );
    step::<upgrade::Args>(
        &mut sections,
        "upgrade",
        "upgrade",
        strs(&p.upgrade),
        upgrade::run,
    );
    for &c in &p.scaling {
        step::<throughput::Args>(
            &mut sections,
            &format!("scaling@{c}"),
            "throughput",
            strs(&[
                "--no-wrk",
                "--sizes",
                "1",
                "--conns",
                &c.to_string(),
                "--client-threads",
                "2",
                "--rounds",
                &p.scaling_rounds.to_string(),
                "--secs",
                &s,
            ]),
            throughput::run,
        );
    }
    step::<services::Args>(
        &mut sections,
        "services",
        "services",
        strs(&p.services),
        services::run,
    );
    let total = t0.elapsed().as_secs_f64();

    let machine = Machine::now();
    write_json(&a.out.join("rows.json"), a, &machine, total, &sections)?;
    let plots = plots(&a.out, &sections);
    let md = markdown(a, &machine, total, &sections, &plots);
    std::fs::write(a.out.join("report.md"), md)?;
    println!("\nreport written to {}", a.out.join("report.md").display());

    // The rows for the summary table, each named by its section.
    let mut out = Vec::new();
    for sec in sections {
        for mut r in sec.rows {
            r.metric = format!("[{}] {}", sec.key, r.metric);
            out.push(r);
        }
        if let Some(e) = sec.error {
            out.push(Row::new("report", format!("[{}] FAILED", sec.key), e));
        }
    }
    Ok(out)
}

/// What the figures were measured on.
struct Machine {
    nproc: usize,
    kernel: String,
    date: String,
    nginx: String,
    wrk: bool,
}

impl Machine {
    fn now() -> Machine {
        let nginx = std::process::Command::new("nginx")
            .arg("-v")
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_owned())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "not installed".to_owned());
        Machine {
            nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_owned())
                .unwrap_or_default(),
            date: utc_now(),
            nginx,
            wrk: std::process::Command::new("wrk")
                .arg("--version")
                .output()
                .is_ok(),
        }
    }
}

/// "YYYY-MM-DD HH:MM:SS UTC", from the system clock (civil-from-days).
fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn write_json(
    path: &Path,
    a: &Args,
    m: &Machine,
    total: f64,
    sections: &[Section],
) -> anyhow::Result<()> {
    use serde_json::{json, Map, Value};
    let secs: Vec<Value> = sections
        .iter()
        .map(|s| {
            let rows: Vec<Value> = s
                .rows
                .iter()
                .map(|r| {
                    let nums: Map<String, Value> = r
                        .nums
                        .iter()
                        .map(|(k, v)| (k.clone(), json!(v.is_finite().then_some(*v))))
                        .collect();
                    json!({"bench": r.bench, "metric": r.metric, "value": r.value, "nums": nums})
                })
                .collect();
            json!({"section": s.key, "command": s.cmd, "secs": s.secs, "error": s.error, "rows": rows})
        })
        .collect();
    let v = json!({
        "quick": a.quick,
        "machine": {"nproc": m.nproc, "kernel": m.kernel, "date": m.date, "nginx": m.nginx, "wrk": m.wrk},
        "total_secs": total,
        "sections": secs,
    });
    std::fs::write(path, serde_json::to_string_pretty(&v)? + "\n")?;
    Ok(())
}

fn section<'a>(sections: &'a [Section], key: &str) -> Option<&'a Section> {
    sections.iter().find(|s| s.key == key)
}

/// The first row of section `key` whose metric satisfies `f`.
fn row<'a>(sections: &'a [Section], key: &str, f: impl Fn(&str) -> bool) -> Option<&'a Row> {
    section(sections, key)?.rows.iter().find(|r| f(&r.metric))
}

/// Held connections of each `recovery@N` section, ascending.
fn recovery_keys(sections: &[Section]) -> Vec<(usize, &Section)> {
    let mut v: Vec<(usize, &Section)> = sections
        .iter()
        .filter_map(|s| Some((s.key.strip_prefix("recovery@")?.parse().ok()?, s)))
        .collect();
    v.sort_by_key(|(n, _)| *n);
    v
}

fn scaling_keys(sections: &[Section]) -> Vec<(usize, &Section)> {
    let mut v: Vec<(usize, &Section)> = sections
        .iter()
        .filter_map(|s| Some((s.key.strip_prefix("scaling@")?.parse().ok()?, s)))
        .collect();
    v.sort_by_key(|(n, _)| *n);
    v
}

fn find(s: &Section, f: impl Fn(&str) -> bool) -> Option<&Row> {
    s.rows.iter().find(|r| f(&r.metric))
}

/// The recovery rows looked at: (label, metric start).
const RECOVERY_VIEWS: [(&str, &str); 4] = [
    (
        "kill → first replayed byte at the client, all connections",
        "quick ACK: kill→1st byte, all",
    ),
    (
        "kill → first replayed byte, first connection of each kill",
        "quick ACK: kill→1st byte, 1st conn",
    ),
    (
        "worker gone (pidfd) → first replayed byte, all connections",
        "quick ACK: worker gone→1st byte",
    ),
    (
        "keeper's own view: death noticed → connections handed over",
        "quick ACK: keeper last_recovery_us",
    ),
];

/// Throughput series of the overhead sections: (label, section key, tool, file).
fn overhead_series(sections: &[Section]) -> Vec<(String, &Row, Option<&Row>)> {
    let mut out = Vec::new();
    for (key, mode) in [
        ("overhead", "keep-alive"),
        ("overhead-close", "connection per request"),
    ] {
        let Some(s) = section(sections, key) else {
            continue;
        };
        for r in &s.rows {
            if let Some(rest) = r
                .metric
                .strip_suffix(" kept/plain per round: median (min–max)")
            {
                let (tool, file) = rest.split_once(' ').unwrap_or((rest, ""));
                let file = file.trim_start_matches('/').trim_end_matches(".bin");
                let rps = find(s, |m| m == format!("{rest} median plain / kept req/s"));
                out.push((format!("{file}, {mode}, {tool}"), r, rps));
            }
        }
    }
    out
}

fn fmt_us(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| {
        if v >= 10_000.0 {
            format!("{:.1} ms", v / 1000.0)
        } else {
            format!("{v:.0} µs")
        }
    })
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "**met**"
    } else {
        "**missed**"
    }
}

fn markdown(a: &Args, m: &Machine, total: f64, sections: &[Section], plots: &Plots) -> String {
    let mut o = String::new();
    let w = &mut o;
    let _ = writeln!(
        w,
        "# holdfast benchmark report{}\n",
        if a.quick { " (quick mode)" } else { "" }
    );
    let _ = writeln!(
        w,
        "Regenerate with `bench/run{}` from the repository root (it runs `target/release/hf-bench report{} --out {}`).\n",
        if a.quick { " --quick" } else { "" },
        if a.quick { " --quick" } else { "" },
        a.out.display()
    );
    let _ = writeln!(
        w,
        "Machine: {} CPUs (`nproc`), Linux {}, {}; nginx: {}; wrk: {}. Took {:.0} s. Clients and servers on 127.0.0.1, side by side in the same run.{}\n",
        m.nproc,
        m.kernel,
        m.date,
        m.nginx,
        if m.wrk { "installed" } else { "not installed" },
        total,
        if a.quick {
            " Quick mode: few rounds and kills, so the spreads are wide and the tails (p99, max) rest on few samples."
        } else {
            ""
        }
    );

    // Targets.
    let _ = writeln!(w, "## Targets\n");
    let _ = writeln!(w, "| target | measured | verdict |\n|---|---|---|");
    for (label, r, _) in overhead_series(sections) {
        if let (Some(med), Some(lo), Some(hi)) = (r.get("median"), r.get("min"), r.get("max")) {
            let oh = (1.0 - med) * 100.0;
            let _ = writeln!(
                w,
                "| throughput overhead < 1 % ({label}) | {oh:.2} % (kept/plain per round: median {med:.3}, range {lo:.3}–{hi:.3}) | {} |",
                verdict(oh < 1.0)
            );
        }
    }
    if let Some(s) = section(sections, "recovery@64") {
        for (label, start) in [RECOVERY_VIEWS[0], RECOVERY_VIEWS[3]] {
            if let Some(r) = find(s, |m| m.starts_with(start)) {
                let (p50, p99) = (r.get("p50_us"), r.get("p99_us"));
                let ok = p50.is_some_and(|v| v < 100.0) && p99.is_some_and(|v| v < 500.0);
                let _ = writeln!(
                    w,
                    "| recovery at 64 connections, p50 < 100 µs and p99 < 500 µs: {label} | p50 {}, p99 {} ({} samples) | {} |",
                    fmt_us(p50),
                    fmt_us(p99),
                    r.get("n").unwrap_or(0.0),
                    verdict(ok)
                );
            }
        }
    }
    if let Some(r) = row(sections, "memory", |m| m.ends_with("@ 100 conns")) {
        if let (Some(d), Some(j)) = (r.get("keeper_private_dirty"), r.get("journal_rss")) {
            let _ = writeln!(
                w,
                "| keeper + journal < 512 KiB at 100 connections (keeper private dirty + journal resident) | {:.0} + {:.0} = {:.0} KiB | {} |",
                d / 1024.0,
                j / 1024.0,
                (d + j) / 1024.0,
                verdict(d + j < 512.0 * 1024.0)
            );
        }
    }
    let storm_hf = row(sections, "storm", |m| m == "holdfast + hf-httpd");
    let storm_ng = row(sections, "storm", |m| m == "nginx (2 workers)");
    if let Some(r) = storm_hf {
        let f = r.get("failed").unwrap_or(f64::NAN);
        let _ = writeln!(
            w,
            "| zero failed requests in the crash storm | holdfast {f:.0} failed of {:.0} ({:.0} kills); nginx {} | {} |",
            r.get("ok").unwrap_or(0.0) + f,
            r.get("kills").unwrap_or(0.0),
            storm_ng.map_or("not measured".into(), |n| format!(
                "{:.0} failed",
                n.get("failed").unwrap_or(f64::NAN)
            )),
            verdict(f == 0.0)
        );
    }
    let up_hf = row(sections, "upgrade", |m| {
        m.starts_with("storm: holdfast upgrade")
    });
    let up_ng = row(sections, "upgrade", |m| {
        m.starts_with("storm: nginx -s reload")
    });
    if let Some(r) = up_hf {
        let f = r.get("failed").unwrap_or(f64::NAN);
        let _ = writeln!(
            w,
            "| zero failed requests in the upgrade storm | holdfast {f:.0} failed of {:.0} ({:.0} upgrades); nginx reload {} | {} |",
            r.get("ok").unwrap_or(0.0) + f,
            r.get("actions").unwrap_or(0.0),
            up_ng.map_or("not measured".into(), |n| format!(
                "{:.0} failed",
                n.get("failed").unwrap_or(f64::NAN)
            )),
            verdict(f == 0.0 && r.get("action_errors") == Some(0.0))
        );
    }
    if let Some(s) = section(sections, "services") {
        let checked = find(s, |m| m.starts_with("downloads killed mid-answer"));
        let corrupt = s.error.as_deref().is_some_and(|e| e.contains("CORRUPT"));
        if checked.is_some() || corrupt {
            let _ = writeln!(
                w,
                "| every byte of downloads killed mid-answer correct (resume and full replay) | {} | {} |",
                checked.map_or("corrupt bytes: see the section's error".into(), |r| r.value.clone()),
                verdict(!corrupt)
            );
        }
    }
    let _ = writeln!(w);

    // Plots.
    if !plots.files.is_empty() {
        let _ = writeln!(w, "## Plots\n");
        for (f, title) in &plots.files {
            let _ = writeln!(w, "![{title}]({f})\n");
        }
    }
    if let Some(e) = &plots.error {
        let _ = writeln!(w, "Plots not drawn: {e}\n");
    }

    // 1. Overhead.
    let _ = writeln!(w, "## 1. Throughput overhead\n");
    let _ = writeln!(w, "Same hf-httpd binary alone (plain) and under the keeper (kept), the two sides interleaved in 250 ms slices; ratio = kept/plain req/s per round.\n");
    let _ = writeln!(
        w,
        "| file, mode, load tool | plain req/s | kept req/s | kept/plain median (min–max) | overhead |\n|---|---|---|---|---|"
    );
    for (label, r, rps) in overhead_series(sections) {
        let _ = writeln!(
            w,
            "| {label} | {} | {} | {} | {} |",
            rps.and_then(|x| x.get("a"))
                .map_or("-".into(), |v| format!("{v:.0}")),
            rps.and_then(|x| x.get("b"))
                .map_or("-".into(), |v| format!("{v:.0}")),
            r.value,
            r.get("median")
                .map_or("-".into(), |v| format!("{:.2} %", (1.0 - v) * 100.0))
        );
    }
    let _ = writeln!(w);

    // 2. Recovery.
    let rk = recovery_keys(sections);
    let _ = writeln!(w, "## 2. Recovery latency after SIGKILL\n");
    let _ = writeln!(w, "Every connection mid-answer at each kill; every answer checked byte for byte. p50 / p99 / max.\n");
    let _ = write!(w, "| held connections | kills |");
    for (label, _) in RECOVERY_VIEWS {
        let _ = write!(w, " {label} |");
    }
    let _ = writeln!(w, "\n|---|---|---|---|---|---|");
    for (n, s) in &rk {
        let kills = find(s, |m| m.starts_with("kills × conns"))
            .and_then(|r| r.get("kills"))
            .map_or("-".into(), |k| format!("{k:.0}"));
        let _ = write!(w, "| {n} | {kills} |");
        for (_, start) in RECOVERY_VIEWS {
            let cell = find(s, |m| m.starts_with(start)).map_or("-".into(), |r| {
                format!(
                    "{} / {} / {}",
                    fmt_us(r.get("p50_us")),
                    fmt_us(r.get("p99_us")),
                    fmt_us(r.get("max_us"))
                )
            });
            let _ = write!(w, " {cell} |");
        }
        let _ = writeln!(w);
    }
    let _ = writeln!(w);

    // 3. Memory.
    let _ = writeln!(w, "## 3. Memory\n");
    let _ = writeln!(
        w,
        "| connections | keeper private dirty | journal resident | keeper + journal | active worker private dirty | standby worker private dirty |\n|---|---|---|---|---|---|"
    );
    if let Some(s) = section(sections, "memory") {
        for r in s.rows.iter().filter(|r| r.get("journal_rss").is_some()) {
            let k = |n: &str| r.get(n).filter(|v| v.is_finite());
            let kb = |v: Option<f64>| v.map_or("-".into(), |v| format!("{:.0} KiB", v / 1024.0));
            let _ = writeln!(
                w,
                "| {:.0} | {} | {} | {} | {} | {} |",
                r.get("conns").unwrap_or(0.0),
                kb(k("keeper_private_dirty")),
                kb(k("journal_rss")),
                kb(k("keeper_private_dirty")
                    .zip(k("journal_rss"))
                    .map(|(a, b)| a + b)),
                kb(k("worker_private_dirty")),
                kb(k("standby_private_dirty")),
            );
        }
    }
    let _ = writeln!(w, "\nThe journal is a shared mapping: its resident part is counted once here, not in the keeper's private memory. The standby worker is a whole idle copy of the service, ready to take over: its cost is the service's, shown apart from the keeper's.\n");

    // 4, 5. Storms.
    let _ = writeln!(w, "## 4. Crash storm, side by side\n");
    let _ = writeln!(w, "64 keep-alive clients fetching 1 KiB–512 KiB files, every body checked; a worker SIGKILLed every 50 ms.\n");
    let _ = writeln!(
        w,
        "| server | requests ok | failed | by kind (\"wrong bytes\": corrupt answers) | kills | stalls > 100 ms (slowest) |\n|---|---|---|---|---|---|"
    );
    if let Some(s) = section(sections, "storm") {
        for r in s.rows.iter().filter(|r| r.get("ok").is_some()) {
            let kinds: Vec<String> = r
                .nums
                .iter()
                .filter(|(k, _)| {
                    !["ok", "failed", "kills", "stalls", "worst_ms"].contains(&k.as_str())
                })
                .map(|(k, v)| format!("{v:.0} {k}"))
                .collect();
            let _ = writeln!(
                w,
                "| {} | {:.0} | {:.0} | {} | {:.0} | {:.0} ({:.0} ms) |",
                r.metric,
                r.get("ok").unwrap_or(0.0),
                r.get("failed").unwrap_or(0.0),
                if kinds.is_empty() {
                    "-".into()
                } else {
                    kinds.join(", ")
                },
                r.get("kills").unwrap_or(0.0),
                r.get("stalls").unwrap_or(0.0),
                r.get("worst_ms").unwrap_or(0.0)
            );
        }
    }
    let _ = writeln!(w, "\n## 5. Upgrade storm, side by side\n");
    let _ = writeln!(
        w,
        "| contender | requests ok during | failed | resets | detail |\n|---|---|---|---|---|"
    );
    if let Some(s) = section(sections, "upgrade") {
        for r in s.rows.iter().filter(|r| r.get("resets").is_some()) {
            let _ = writeln!(
                w,
                "| {} | {:.0} | {:.0} | {:.0} | {} |",
                r.metric.trim_start_matches("storm: "),
                r.get("ok").unwrap_or(0.0),
                r.get("failed").unwrap_or(0.0),
                r.get("resets").unwrap_or(0.0),
                r.value
            );
        }
    }
    let _ = writeln!(w);

    // 6. Scaling.
    let _ = writeln!(w, "## 6. Scaling\n");
    let _ = writeln!(w, "1 KiB file, keep-alive, built-in load generator (2 threads), plain vs kept interleaved. Recovery as held connections grow is in section 2.\n");
    let _ = writeln!(
        w,
        "| client connections | plain req/s | kept req/s | kept/plain |\n|---|---|---|---|"
    );
    for (c, s) in scaling_keys(sections) {
        if let Some(r) = find(s, |m| m.ends_with("median plain / kept req/s")) {
            let ratio =
                find(s, |m| m.contains("per round")).map_or("-".into(), |x| x.value.clone());
            let _ = writeln!(
                w,
                "| {c} | {:.0} | {:.0} | {ratio} |",
                r.get("a").unwrap_or(0.0),
                r.get("b").unwrap_or(0.0)
            );
        }
    }
    let _ = writeln!(w);

    services_md(w, sections);

    // Everything.
    let _ = writeln!(w, "## Every figure\n");
    let _ = writeln!(w, "| section | metric | value |\n|---|---|---|");
    for s in sections {
        for r in &s.rows {
            let _ = writeln!(
                w,
                "| {} | {} | {} |",
                s.key,
                r.metric,
                r.value.replace('|', "/")
            );
        }
    }
    let _ = writeln!(w, "\n## Commands run\n");
    let _ = writeln!(
        w,
        "| section | command | seconds | result |\n|---|---|---|---|"
    );
    for s in sections {
        let _ = writeln!(
            w,
            "| {} | `{}` | {:.0} | {} |",
            s.key,
            s.cmd,
            s.secs,
            s.error.as_deref().map_or("ok".to_owned(), |e| format!(
                "FAILED: {}",
                e.replace('\n', " ").replace('|', "/")
            ))
        );
    }
    o
}

/// Section 7: the services' rows, as tables.
fn services_md(w: &mut String, sections: &[Section]) {
    let _ = writeln!(w, "## 7. Services\n");
    let Some(s) = section(sections, "services") else {
        let _ = writeln!(w, "Not measured.\n");
        return;
    };
    if let Some(e) = &s.error {
        let _ = writeln!(w, "**Failed:** {}\n", e.replace('\n', " "));
    }
    let _ = writeln!(w, "Each service alone (plain, `--listen`) and under the keeper (kept, one standby), the two sides interleaved in 250 ms slices, every answer checked; ratio = kept/plain per round.\n");
    let _ = writeln!(
        w,
        "| service, load | plain / kept (medians) | kept/plain median (min–max) | overhead | server CPU per unit, plain → kept (keeper's part), µs |\n|---|---|---|---|---|"
    );
    const RATIO: &str = ": kept/plain per round, median (min–max)";
    for r in &s.rows {
        let Some(what) = r.metric.strip_suffix(RATIO) else {
            continue;
        };
        let rates = find(s, |m| {
            m.starts_with(&format!("{what}: median plain / kept "))
        });
        let cpu = find(s, |m| m.starts_with(&format!("{what}: server CPU")));
        let _ = writeln!(
            w,
            "| {what} | {} | {} | {} | {} |",
            rates.map_or("-", |x| x.value.as_str()),
            r.value,
            r.get("median")
                .map_or("-".into(), |v| format!("{:.1} %", (1.0 - v) * 100.0)),
            cpu.map_or("-", |x| x.value.as_str())
        );
    }
    let _ = writeln!(w, "\nA download killed mid-answer (hf-httpd under the keeper; the client stops the worker, reads all it wrote, then SIGKILLs it): kill → the next byte, which only the successor can send.\n");
    let _ = writeln!(w, "| what | figure |\n|---|---|");
    for r in s
        .rows
        .iter()
        .filter(|r| r.metric.starts_with("download") || r.metric.contains("skipped"))
    {
        let _ = writeln!(w, "| {} | {} |", r.metric, r.value);
    }
    let _ = writeln!(w, "\n| keeper memory, idle connections | keeper private dirty + journal resident (at 0 connections) | per connection |\n|---|---|---|");
    for r in s.rows.iter().filter(|r| r.get("per_conn").is_some()) {
        let _ = writeln!(
            w,
            "| {} | {} | {:.0} B |",
            r.metric,
            r.value,
            r.get("per_conn").unwrap_or(f64::NAN)
        );
    }
    let _ = writeln!(w);
}

// ---------------------------------------------------------------------------
// Plots.

/// Plot files written (file name, title), or why none were.
#[derive(Default)]
struct Plots {
    files: Vec<(String, String)>,
    error: Option<String>,
}

/// TTF files tried, in order, for the plots' text: ab_glyph draws text
/// from a font file and plotters finds none by itself without fontconfig.
/// Debian: `apt-get install fonts-dejavu-core` (bench/run does).
const FONTS: [&str; 4] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

pub(crate) fn load_font() -> anyhow::Result<()> {
    use plotters::style::{register_font, FontStyle};
    let path = FONTS
        .iter()
        .map(PathBuf::from)
        .chain(std::env::var_os("HF_BENCH_FONT").map(PathBuf::from))
        .find(|p| p.is_file())
        .context(
            "no TTF font found (apt-get install fonts-dejavu-core, or set HF_BENCH_FONT to a .ttf)",
        )?;
    let bytes: &'static [u8] = Vec::leak(std::fs::read(&path)?);
    register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow::anyhow!("{} is not a usable font", path.display()))
}

fn plots(dir: &Path, sections: &[Section]) -> Plots {
    let mut p = Plots::default();
    if let Err(e) = load_font() {
        eprintln!("hf-bench report: plots skipped: {e:#}");
        p.error = Some(format!("{e:#}"));
        return p;
    }
    type Draw = fn(&Path, &[Section]) -> anyhow::Result<bool>;
    let all: [(&str, &str, Draw); 4] = [
        (
            "recovery.png",
            "Recovery latency vs held connections",
            plot_recovery,
        ),
        ("overhead.png", "Throughput ratio per round", plot_overhead),
        (
            "scaling.png",
            "Throughput vs client connections",
            plot_scaling,
        ),
        ("storms.png", "Failed requests in the storms", plot_storms),
    ];
    for (file, title, f) in all {
        match f(&dir.join(file), sections) {
            Ok(true) => p.files.push((file.to_owned(), title.to_owned())),
            Ok(false) => {}
            Err(e) => {
                eprintln!("hf-bench report: {file}: {e:#}");
                p.error
                    .get_or_insert_with(String::new)
                    .push_str(&format!("{file}: {e:#}; "));
            }
        }
    }
    p
}

fn pe<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing: {e}")
}

const SIZE: (u32, u32) = (900, 520);

/// A log axis' label only at 1, 2, 5 × 10^k: plotters puts one at every
/// grid line, which crowds each decade's top end.
fn round_label(v: f64) -> String {
    let mag = 10f64.powf(v.log10().floor());
    let lead = (v / mag).round();
    if [1.0, 2.0, 5.0].contains(&lead) && (v - lead * mag).abs() < mag * 0.01 {
        format!("{v:.0}")
    } else {
        String::new()
    }
}

fn plot_recovery(path: &Path, sections: &[Section]) -> anyhow::Result<bool> {
    use plotters::prelude::*;
    let rk = recovery_keys(sections);
    // (label, metric start, stat, colour)
    let series = [
        (
            "client, all conns, p50",
            RECOVERY_VIEWS[0].1,
            "p50_us",
            BLUE,
        ),
        (
            "client, all conns, p99",
            RECOVERY_VIEWS[0].1,
            "p99_us",
            CYAN,
        ),
        (
            "client, first conn, p50",
            RECOVERY_VIEWS[1].1,
            "p50_us",
            MAGENTA,
        ),
        ("keeper's view, p50", RECOVERY_VIEWS[3].1, "p50_us", GREEN),
        (
            "keeper's view, p99",
            RECOVERY_VIEWS[3].1,
            "p99_us",
            RGBColor(0, 110, 0),
        ),
    ];
    let data: Vec<Vec<(f64, f64)>> = series
        .iter()
        .map(|(_, start, stat, _)| {
            rk.iter()
                .filter_map(|(n, s)| {
                    let v = find(s, |m| m.starts_with(start))?.get(stat)?;
                    (v > 0.0).then_some((*n as f64, v))
                })
                .collect()
        })
        .collect();
    let pts: Vec<&(f64, f64)> = data.iter().flatten().collect();
    if pts.is_empty() {
        return Ok(false);
    }
    let xmax = pts.iter().map(|p| p.0).fold(64.0, f64::max) * 2.0;
    let ymin = pts.iter().map(|p| p.1).fold(50.0, f64::min) / 2.0;
    let ymax = pts.iter().map(|p| p.1).fold(600.0, f64::max) * 2.0;
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(pe)?;
    let mut ch = ChartBuilder::on(&root)
        .caption(
            "Recovery after SIGKILL vs held connections",
            ("sans-serif", 22),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d((32f64..xmax).log_scale(), (ymin..ymax).log_scale())
        .map_err(pe)?;
    ch.configure_mesh()
        .x_desc("connections mid-answer at the kill")
        .y_desc("µs (log)")
        .x_label_formatter(&|v| round_label(*v))
        .y_label_formatter(&|v| round_label(*v))
        .draw()
        .map_err(pe)?;
    for (target, label) in [(100.0, "target p50 100 µs"), (500.0, "target p99 500 µs")] {
        ch.draw_series(LineSeries::new(
            [(32.0, target), (xmax, target)],
            RED.mix(0.5).stroke_width(1),
        ))
        .map_err(pe)?
        .label(label)
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.mix(0.5)));
    }
    for ((label, _, _, c), d) in series.iter().zip(&data) {
        if d.is_empty() {
            continue;
        }
        let c = *c;
        ch.draw_series(LineSeries::new(d.clone(), c.stroke_width(2)))
            .map_err(pe)?
            .label(*label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        ch.draw_series(d.iter().map(|&p| Circle::new(p, 4, c.filled())))
            .map_err(pe)?;
    }
    ch.configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .draw()
        .map_err(pe)?;
    root.present().map_err(pe)?;
    Ok(true)
}

fn plot_overhead(path: &Path, sections: &[Section]) -> anyhow::Result<bool> {
    use plotters::prelude::*;
    let series: Vec<(String, Vec<f64>)> = overhead_series(sections)
        .into_iter()
        .map(|(l, r, _)| (l, r.list("round")))
        .filter(|(_, v)| !v.is_empty())
        .collect();
    if series.is_empty() {
        return Ok(false);
    }
    let rounds = series.iter().map(|s| s.1.len()).max().unwrap_or(1);
    let all: Vec<f64> = series.iter().flat_map(|s| s.1.iter().copied()).collect();
    let lo = all.iter().copied().fold(0.97, f64::min) - 0.01;
    let hi = all.iter().copied().fold(1.01, f64::max) + 0.01;
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(pe)?;
    let mut ch = ChartBuilder::on(&root)
        .caption(
            "Throughput under holdfast / alone, per round",
            ("sans-serif", 22),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.5f64..rounds as f64 + 0.5, lo..hi)
        .map_err(pe)?;
    ch.configure_mesh()
        .x_desc("round")
        .y_desc("kept / plain req/s")
        .x_labels(rounds.min(12))
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.2}"))
        .draw()
        .map_err(pe)?;
    ch.draw_series(LineSeries::new(
        [(0.5, 0.99), (rounds as f64 + 0.5, 0.99)],
        RED.mix(0.6).stroke_width(1),
    ))
    .map_err(pe)?
    .label("target: 0.99 (overhead < 1 %)")
    .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.mix(0.6)));
    ch.draw_series(LineSeries::new(
        [(0.5, 1.0), (rounds as f64 + 0.5, 1.0)],
        BLACK.mix(0.3),
    ))
    .map_err(pe)?;
    for (i, (label, v)) in series.iter().enumerate() {
        let c = Palette99::pick(i).to_rgba();
        let pts: Vec<(f64, f64)> = v
            .iter()
            .enumerate()
            .map(|(r, y)| ((r + 1) as f64, *y))
            .collect();
        ch.draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))
            .map_err(pe)?
            .label(label.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        ch.draw_series(pts.into_iter().map(|p| Circle::new(p, 3, c.filled())))
            .map_err(pe)?;
    }
    ch.configure_series_labels()
        .position(SeriesLabelPosition::LowerLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .draw()
        .map_err(pe)?;
    root.present().map_err(pe)?;
    Ok(true)
}

fn plot_scaling(path: &Path, sections: &[Section]) -> anyhow::Result<bool> {
    use plotters::prelude::*;
    let pts: Vec<(f64, f64, f64)> = scaling_keys(sections)
        .into_iter()
        .filter_map(|(c, s)| {
            let r = find(s, |m| m.ends_with("median plain / kept req/s"))?;
            Some((c as f64, r.get("a")?, r.get("b")?))
        })
        .collect();
    if pts.is_empty() {
        return Ok(false);
    }
    let xmax = pts.iter().map(|p| p.0).fold(2.0, f64::max) * 1.5;
    let ymax = pts.iter().map(|p| p.1.max(p.2)).fold(1.0, f64::max) * 1.15;
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(pe)?;
    let mut ch = ChartBuilder::on(&root)
        .caption(
            "hf-httpd, 1 KiB keep-alive: req/s vs client connections",
            ("sans-serif", 22),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d((0.7f64..xmax).log_scale(), 0f64..ymax)
        .map_err(pe)?;
    ch.configure_mesh()
        .x_desc("client connections (log)")
        .y_desc("requests per second")
        .x_label_formatter(&|v| round_label(*v))
        .y_label_formatter(&|v| format!("{:.0}k", v / 1000.0))
        .draw()
        .map_err(pe)?;
    for (label, idx, c) in [
        ("alone (plain)", 1, BLUE),
        ("under holdfast (kept)", 2, GREEN),
    ] {
        let d: Vec<(f64, f64)> = pts
            .iter()
            .map(|p| (p.0, if idx == 1 { p.1 } else { p.2 }))
            .collect();
        ch.draw_series(LineSeries::new(d.clone(), c.stroke_width(2)))
            .map_err(pe)?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        ch.draw_series(d.into_iter().map(|p| Circle::new(p, 4, c.filled())))
            .map_err(pe)?;
    }
    ch.configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .draw()
        .map_err(pe)?;
    root.present().map_err(pe)?;
    Ok(true)
}

fn plot_storms(path: &Path, sections: &[Section]) -> anyhow::Result<bool> {
    use plotters::prelude::*;
    use plotters::style::text_anchor::{HPos, Pos, VPos};
    let green = RGBColor(40, 150, 60);
    let orange = RGBColor(230, 140, 20);
    let red = RGBColor(200, 40, 40);
    // (label, failed, ok, colour)
    let mut bars: Vec<(String, f64, f64, RGBColor)> = Vec::new();
    for (metric, label, c) in [
        ("holdfast + hf-httpd", "crash: holdfast", green),
        ("nginx (2 workers)", "crash: nginx", orange),
        ("hf-httpd, restarted on death", "crash: restart loop", red),
    ] {
        if let Some(r) = row(sections, "storm", |m| m == metric) {
            bars.push((
                label.into(),
                r.get("failed").unwrap_or(0.0),
                r.get("ok").unwrap_or(0.0),
                c,
            ));
        }
    }
    for (start, label, c) in [
        ("storm: holdfast upgrade", "upgrade: holdfast", green),
        ("storm: nginx -s reload", "upgrade: nginx reload", orange),
        (
            "storm: nginx binary upgrade",
            "upgrade: nginx binary",
            orange,
        ),
    ] {
        if let Some(r) = row(sections, "upgrade", |m| m.starts_with(start)) {
            bars.push((
                label.into(),
                r.get("failed").unwrap_or(0.0),
                r.get("ok").unwrap_or(0.0),
                c,
            ));
        }
    }
    if bars.is_empty() {
        return Ok(false);
    }
    let ymax = bars.iter().map(|b| b.1).fold(10.0, f64::max) * 1.2;
    let n = bars.len();
    let names: Vec<String> = bars.iter().map(|b| b.0.clone()).collect();
    let root = BitMapBackend::new(path, (1000, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(pe)?;
    let mut ch = ChartBuilder::on(&root)
        .caption(
            "Failed requests: crash storm and upgrade storm",
            ("sans-serif", 22),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d((0..n).into_segmented(), 0f64..ymax)
        .map_err(pe)?;
    ch.configure_mesh()
        .disable_x_mesh()
        .x_labels(n)
        .x_label_style(("sans-serif", 12))
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => names.get(*i).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .y_desc("failed requests")
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()
        .map_err(pe)?;
    ch.draw_series(bars.iter().enumerate().map(|(i, b)| {
        let mut r = Rectangle::new(
            [
                (SegmentValue::Exact(i), 0.0),
                (SegmentValue::Exact(i + 1), b.1),
            ],
            b.3.filled(),
        );
        r.set_margin(0, 0, 18, 18);
        r
    }))
    .map_err(pe)?;
    ch.draw_series(bars.iter().enumerate().map(|(i, b)| {
        Text::new(
            format!("{:.0} of {:.0}", b.1, b.1 + b.2),
            (SegmentValue::CenterOf(i), b.1 + ymax * 0.02),
            ("sans-serif", 13)
                .into_font()
                .color(&BLACK)
                .pos(Pos::new(HPos::Center, VPos::Bottom)),
        )
    }))
    .map_err(pe)?;
    root.present().map_err(pe)?;
    Ok(true)
}
