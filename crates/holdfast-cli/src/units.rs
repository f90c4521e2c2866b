//! Command-line values with units: durations (`500ms`, `2s`, `1m`, `1h`),
//! sizes (`512KiB`, `64MiB`, `1GiB`) and listen addresses (`HOST:PORT`,
//! `[IPv6]:PORT`, `:PORT`). A bare number keeps the unit the option names
//! (`MS`, `SECONDS`, `KIB`, `MIB`), so existing command lines mean what they
//! meant.

use std::net::{SocketAddr, ToSocketAddrs};

/// Splits `"12.5ms"` into `(12.5, "ms")`.
fn number_and_unit(s: &str) -> Result<(f64, &str), String> {
    let s = s.trim();
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(end);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a number with an optional unit"))?;
    if !n.is_finite() {
        return Err(format!("{s:?} is out of range"));
    }
    Ok((n, unit.trim()))
}

/// `value` in units of `base`, rounded to a whole number of them.
fn scaled(n: f64, factor: f64, s: &str) -> Result<u64, String> {
    let v = (n * factor).round();
    if !(0.0..=u64::MAX as f64).contains(&v) {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(v as u64)
}

/// A duration as a whole number of `base_ms` units (1 for milliseconds,
/// 1000 for seconds); a bare number is already in that unit.
fn duration(s: &str, base_ms: f64) -> Result<u64, String> {
    let (n, unit) = number_and_unit(s)?;
    let ms = match unit {
        "" => return scaled(n, 1.0, s),
        "ms" => 1.0,
        "s" | "sec" => 1e3,
        "m" | "min" => 60e3,
        "h" => 3600e3,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {s:?} (use ms, s, m or h, or a bare number)"
            ))
        }
    };
    scaled(n, ms / base_ms, s)
}

/// Milliseconds: `500`, `500ms`, `2s`, `1.5m`.
pub fn millis(s: &str) -> Result<u64, String> {
    duration(s, 1.0)
}

/// Seconds: `30`, `30s`, `10m`, `2h` (`500ms` rounds to the nearest second).
pub fn seconds(s: &str) -> Result<u64, String> {
    duration(s, 1e3)
}

/// A size as a whole number of `base` bytes; a bare number is already in that unit.
fn size(s: &str, base: f64) -> Result<u64, String> {
    let (n, unit) = number_and_unit(s)?;
    let bytes = match unit {
        "" => return scaled(n, 1.0, s),
        "B" => 1.0,
        "K" | "KiB" | "k" | "kiB" => 1024.0,
        "M" | "MiB" => 1024.0 * 1024.0,
        "G" | "GiB" => 1024.0 * 1024.0 * 1024.0,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {s:?} (use B, KiB, MiB or GiB, or a bare number)"
            ))
        }
    };
    scaled(n, bytes / base, s)
}

/// KiB: `65536`, `64MiB`, `512KiB`.
pub fn kib(s: &str) -> Result<u64, String> {
    size(s, 1024.0)
}

/// MiB: `512`, `512MiB`, `2GiB`.
pub fn mib(s: &str) -> Result<u64, String> {
    size(s, 1024.0 * 1024.0)
}

/// Every address `--listen` names: `127.0.0.1:8080`, `[::1]:8080`,
/// `localhost:8080` (each address the name resolves to), or `:8080` (every
/// IPv4 address of the machine).
pub fn listen(s: &str) -> Result<Vec<SocketAddr>, String> {
    if let Some(port) = s.strip_prefix(':') {
        let port: u16 = port
            .parse()
            .map_err(|_| format!("{s:?}: {port:?} is not a port number"))?;
        return Ok(vec![SocketAddr::from(([0, 0, 0, 0], port))]);
    }
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(vec![a]);
    }
    let mut all: Vec<SocketAddr> = s
        .to_socket_addrs()
        .map_err(|e| format!("{s:?}: {e} (use HOST:PORT, [IPv6]:PORT or :PORT)"))?
        .collect();
    all.sort();
    all.dedup();
    if all.is_empty() {
        return Err(format!("{s:?} resolves to no address"));
    }
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_keep_bare_numbers_in_the_options_unit() {
        assert_eq!(millis("250"), Ok(250));
        assert_eq!(millis("500ms"), Ok(500));
        assert_eq!(millis("2s"), Ok(2000));
        assert_eq!(millis("1.5m"), Ok(90_000));
        assert_eq!(millis("1h"), Ok(3_600_000));
        assert_eq!(seconds("30"), Ok(30));
        assert_eq!(seconds("10m"), Ok(600));
        assert_eq!(seconds("1500ms"), Ok(2));
        assert!(millis("2 fortnights").is_err());
        assert!(millis("-1s").is_err());
        assert!(millis("").is_err());
        assert!(millis("1e400").is_err());
    }

    #[test]
    fn sizes_keep_bare_numbers_in_the_options_unit() {
        assert_eq!(kib("65536"), Ok(65536));
        assert_eq!(kib("64MiB"), Ok(65536));
        assert_eq!(kib("512KiB"), Ok(512));
        assert_eq!(kib("2048B"), Ok(2));
        assert_eq!(mib("512"), Ok(512));
        assert_eq!(mib("2GiB"), Ok(2048));
        assert!(mib("2GB!").is_err());
    }

    #[test]
    fn listen_takes_names_ports_and_addresses() {
        assert_eq!(listen(":8080"), Ok(vec!["0.0.0.0:8080".parse().unwrap()]));
        assert_eq!(listen("[::1]:9"), Ok(vec!["[::1]:9".parse().unwrap()]));
        let local = listen("localhost:8080").unwrap();
        assert!(local
            .iter()
            .all(|a| a.ip().is_loopback() && a.port() == 8080));
        assert!(listen(":http").is_err());
        assert!(listen("no-port").is_err());
    }
}
