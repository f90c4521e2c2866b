//! Listening sockets: bound from `--listen`, or inherited from systemd
//! (`LISTEN_FDS`, `LISTEN_PID`, `LISTEN_FDNAMES`, sd_listen_fds(3)).

use std::net::{SocketAddr, TcpListener};
use std::os::fd::OwnedFd;

use rustix::net::{AddressFamily, SocketFlags, SocketType};

use crate::KeeperError;

/// A deep accept queue: connections that arrive while no worker runs wait
/// here (the kernel caps it at `net.core.somaxconn`).
const BACKLOG: i32 = 4096;

pub(crate) fn bind(addr: SocketAddr) -> Result<TcpListener, KeeperError> {
    let err = |e: std::io::Error| KeeperError::Bind(addr, e);
    let family = if addr.is_ipv4() {
        AddressFamily::INET
    } else {
        AddressFamily::INET6
    };
    let fd = rustix::net::socket_with(
        family,
        SocketType::STREAM,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )
    .map_err(|e| err(e.into()))?;
    rustix::net::sockopt::set_socket_reuseaddr(&fd, true).map_err(|e| err(e.into()))?;
    if addr.is_ipv6() {
        rustix::net::sockopt::set_ipv6_v6only(&fd, true).map_err(|e| err(e.into()))?;
    }
    rustix::net::bind(&fd, &addr).map_err(|e| err(e.into()))?;
    rustix::net::listen(&fd, BACKLOG).map_err(|e| err(e.into()))?;
    Ok(TcpListener::from(fd))
}

/// Listeners passed by systemd socket activation, if any are meant for us.
pub(crate) fn inherited() -> Result<Vec<(TcpListener, String)>, KeeperError> {
    let Ok(pid) = std::env::var("LISTEN_PID") else {
        return Ok(Vec::new());
    };
    if pid.parse::<u32>().ok() != Some(std::process::id()) {
        return Ok(Vec::new());
    }
    let n: i32 = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| (1..=1024).contains(n))
        .ok_or_else(|| KeeperError::Inherit("LISTEN_FDS is missing or not a count".into()))?;
    let names: Vec<String> = std::env::var("LISTEN_FDNAMES")
        .map(|v| v.split(':').map(str::to_owned).collect())
        .unwrap_or_default();
    let mut out = Vec::new();
    for i in 0..n {
        let fd: OwnedFd = hf_sys::inherited::take(3 + i)
            .map_err(|e| KeeperError::Inherit(format!("fd {}: {e}", 3 + i)))?;
        if !rustix::net::sockopt::socket_acceptconn(&fd).unwrap_or(false) {
            return Err(KeeperError::Inherit(format!(
                "fd {} is not a listening socket",
                3 + i
            )));
        }
        rustix::fs::fcntl_setfl(&fd, rustix::fs::OFlags::NONBLOCK)
            .map_err(|e| KeeperError::Inherit(e.to_string()))?;
        let name = names
            .get(i as usize)
            .cloned()
            .unwrap_or_else(|| format!("fd{}", 3 + i));
        out.push((TcpListener::from(fd), name));
    }
    Ok(out)
}
