//! `holdfast run --config FILE`: the options of `run` from a TOML file.
//!
//! Keys are the long options with `_` for `-` (`hang_timeout = "500ms"`,
//! `listen = ["127.0.0.1:8080"]`, `command = ["./svc", "--flag"]`);
//! durations and sizes take the same units as on the command line, or a
//! bare number in the option's unit. An option given on the command line
//! wins over the file. Relative paths in the file (`control`,
//! `unavailable`) are relative to the file's directory. Unknown keys are an
//! error, so a typo never goes unnoticed.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::parser::ValueSource;
use clap::ArgMatches;
use serde::Deserialize;

use crate::{units, RunArgs};

/// A number, or text with a unit.
#[derive(Deserialize)]
#[serde(untagged)]
enum Amount {
    Number(u64),
    Text(String),
}

impl Amount {
    fn parse(&self, key: &str, unit: fn(&str) -> Result<u64, String>) -> anyhow::Result<u64> {
        match self {
            Amount::Number(n) => Ok(*n),
            Amount::Text(t) => unit(t).map_err(|e| anyhow::anyhow!("{key}: {e}")),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    listen: Option<Vec<String>>,
    standby: Option<usize>,
    control: Option<PathBuf>,
    max_conns: Option<u32>,
    hang_timeout: Option<Amount>,
    hold_timeout: Option<Amount>,
    hold_max: Option<usize>,
    hold_kib: Option<Amount>,
    request_deadline: Option<Amount>,
    poison_after: Option<u16>,
    unavailable: Option<PathBuf>,
    max_generations: Option<u16>,
    max_rss: Option<Amount>,
    max_uptime: Option<Amount>,
    max_requests: Option<u64>,
    metrics: Option<String>,
    ready_timeout: Option<Amount>,
    stop_timeout: Option<Amount>,
    command: Option<Vec<String>>,
}

/// Reads `path` and applies it to `o`, except where `m` says the command
/// line gave the option.
pub fn apply(path: &Path, m: &ArgMatches, o: &mut RunArgs) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("--config {}", path.display()))?;
    let f: File = toml::from_str(&text).with_context(|| format!("--config {}", path.display()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let here = |p: PathBuf| if p.is_relative() { base.join(p) } else { p };
    let from_file = |id: &str| m.value_source(id) != Some(ValueSource::CommandLine);
    let ctx = |key: &str| format!("--config {}: {key}", path.display());

    if let (Some(v), true) = (f.listen, from_file("listen")) {
        o.listen = v
            .iter()
            .map(|a| units::listen(a).map_err(|e| anyhow::anyhow!(e)))
            .collect::<anyhow::Result<_>>()
            .with_context(|| ctx("listen"))?;
    }
    if let (Some(v), true) = (f.standby, from_file("standby")) {
        o.standby = v;
    }
    if let (Some(v), true) = (f.control, from_file("control")) {
        o.control = Some(here(v));
    }
    if let (Some(v), true) = (f.max_conns, from_file("max_conns")) {
        if !(1..=1_000_000).contains(&v) {
            bail!("{}: {v} is not in 1..=1000000", ctx("max_conns"));
        }
        o.max_conns = Some(v);
    }
    let ms: fn(&str) -> Result<u64, String> = units::millis;
    for (key, value, dst) in [
        ("hang_timeout", f.hang_timeout, &mut o.hang_timeout),
        ("hold_timeout", f.hold_timeout, &mut o.hold_timeout),
        (
            "request_deadline",
            f.request_deadline,
            &mut o.request_deadline,
        ),
        ("ready_timeout", f.ready_timeout, &mut o.ready_timeout),
        ("stop_timeout", f.stop_timeout, &mut o.stop_timeout),
    ] {
        if let (Some(v), true) = (value, from_file(key)) {
            *dst = v.parse(&ctx(key), ms)?;
        }
    }
    if let (Some(v), true) = (f.hold_kib, from_file("hold_kib")) {
        o.hold_kib = v.parse(&ctx("hold_kib"), units::kib)?;
    }
    if let (Some(v), true) = (f.max_rss, from_file("max_rss")) {
        o.max_rss = v.parse(&ctx("max_rss"), units::mib)?;
    }
    if let (Some(v), true) = (f.max_uptime, from_file("max_uptime")) {
        o.max_uptime = v.parse(&ctx("max_uptime"), units::seconds)?;
    }
    if let (Some(v), true) = (f.hold_max, from_file("hold_max")) {
        o.hold_max = v;
    }
    if let (Some(v), true) = (f.poison_after, from_file("poison_after")) {
        o.poison_after = v;
    }
    if let (Some(v), true) = (f.unavailable, from_file("unavailable")) {
        o.unavailable = Some(here(v));
    }
    if let (Some(v), true) = (f.max_generations, from_file("max_generations")) {
        if !(2..=64).contains(&v) {
            bail!("{}: {v} is not in 2..=64", ctx("max_generations"));
        }
        o.max_generations = v;
    }
    if let (Some(v), true) = (f.max_requests, from_file("max_requests")) {
        o.max_requests = v;
    }
    if let (Some(v), true) = (f.metrics, from_file("metrics")) {
        o.metrics = Some(
            v.parse()
                .map_err(|e| anyhow::anyhow!("{}: {v:?}: {e}", ctx("metrics")))?,
        );
    }
    if let (Some(v), true) = (f.command, o.command.is_empty()) {
        if v.is_empty() {
            bail!("{}: empty", ctx("command"));
        }
        o.command = v.into_iter().map(Into::into).collect();
    }
    if o.command.is_empty() {
        bail!("no worker command: give it after `--` or as `command = [...]` in the config file");
    }
    Ok(())
}
