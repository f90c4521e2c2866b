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
    // Before `listen`, so every connection inherits it (see `assemble`).
    hf_sys::tcp::set_urgent_inline(&fd).map_err(err)?;
    rustix::net::bind(&fd, &addr).map_err(|e| err(e.into()))?;
    rustix::net::listen(&fd, BACKLOG).map_err(|e| err(e.into()))?;
    Ok(TcpListener::from(fd))
}

/// Listeners passed by systemd socket activation, if any are meant for us
/// (`LISTEN_PID` is ours).
pub(crate) fn inherited() -> Result<Vec<(TcpListener, String)>, KeeperError> {
    let fds =
        sd_notify::listen_fds_with_names().map_err(|e| KeeperError::Inherit(e.to_string()))?;
    let mut out = Vec::new();
    for (raw, name) in fds {
        let fd: OwnedFd = hf_sys::inherited::take(raw)
            .map_err(|e| KeeperError::Inherit(format!("fd {raw}: {e}")))?;
        if !rustix::net::sockopt::socket_acceptconn(&fd).unwrap_or(false) {
            return Err(KeeperError::Inherit(format!(
                "fd {raw} is not a listening socket"
            )));
        }
        rustix::fs::fcntl_setfl(&fd, rustix::fs::OFlags::NONBLOCK)
            .map_err(|e| KeeperError::Inherit(e.to_string()))?;
        out.push((TcpListener::from(fd), name));
    }
    Ok(out)
}
