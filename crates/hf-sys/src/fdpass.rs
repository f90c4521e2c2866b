//! Messages with file descriptors on `SOCK_SEQPACKET` Unix sockets.
//!
//! # References
//! - unix(7): `SCM_RIGHTS`, at most 253 fds per message (`SCM_MAX_FD`)
//! - recvmsg(2): `MSG_CMSG_CLOEXEC`

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketFlags, SocketType,
};

/// The kernel's limit of fds in one message.
pub const MAX_FDS: usize = 253;

/// A connected pair of `SOCK_SEQPACKET` sockets, both close-on-exec.
pub fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?)
}

/// Sends one message carrying `fds`. Fails with `InvalidInput` above
/// [`MAX_FDS`]. `MSG_NOSIGNAL`: a dead peer is an error, not a SIGPIPE.
pub fn send(
    sock: impl AsFd,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
    nonblocking: bool,
) -> io::Result<()> {
    if fds.len() > MAX_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "more than 253 fds in one message",
        ));
    }
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "control buffer too small",
        ));
    }
    let mut flags = SendFlags::NOSIGNAL;
    if nonblocking {
        flags |= SendFlags::DONTWAIT;
    }
    let n = rustix::net::sendmsg(sock, &[IoSlice::new(data)], &mut control, flags)?;
    if n != data.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "short seqpacket send",
        ));
    }
    Ok(())
}

/// Receives one message into `buf`, appending any fds to `fds` (all
/// `CLOEXEC`). Returns the message length; `Ok(0)` means the peer closed.
/// A message or fd list the buffers could not hold is an error, and the fds
/// that did arrive are closed rather than leaked.
pub fn recv(
    sock: impl AsFd,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    nonblocking: bool,
) -> io::Result<usize> {
    let got = recv_fds_may_drop(sock, buf, fds, nonblocking)?;
    if got.fds_dropped {
        // Ours were appended last: close them, leave what the caller had.
        fds.truncate(fds.len() - got.fds);
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "control message truncated",
        ));
    }
    Ok(got.len)
}

/// What [`recv_fds_may_drop`] received.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Received {
    /// The message length; 0 means the peer closed.
    pub len: usize,
    /// Descriptors appended to the caller's list.
    pub fds: usize,
    /// The kernel dropped descriptors the message carried (`MSG_CTRUNC`):
    /// the receiver hit its open-files limit. The ones that did arrive are
    /// the first of the message's, in order; the rest are gone from this
    /// process (the sender still has its own).
    pub fds_dropped: bool,
}

/// Receives one message like [`recv`], but a message whose descriptors did
/// not all fit in this process (`MSG_CTRUNC`, under `RLIMIT_NOFILE`) is
/// not an error: it arrives with the descriptors that fit, and says so, so
/// the receiver can give back what it did not get. A message longer than
/// `buf` is still an error.
pub fn recv_fds_may_drop(
    sock: impl AsFd,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    nonblocking: bool,
) -> io::Result<Received> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut flags = RecvFlags::CMSG_CLOEXEC;
    if nonblocking {
        flags |= RecvFlags::DONTWAIT;
    }
    let msg = rustix::net::recvmsg(sock, &mut [IoSliceMut::new(buf)], &mut control, flags)?;
    let mut got = Vec::new();
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = m {
            got.extend(rights);
        }
    }
    if msg.flags.contains(ReturnFlags::TRUNC) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "message longer than the receive buffer",
        ));
    }
    let n = got.len();
    fds.extend(got);
    Ok(Received {
        len: msg.bytes,
        fds: n,
        fds_dropped: msg.flags.contains(ReturnFlags::CTRUNC),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fds_travel_and_limits_hold() {
        let (a, b) = seqpacket_pair().unwrap();
        let (p, q) = seqpacket_pair().unwrap();
        send(&a, b"hi", &[p.as_fd(), q.as_fd()], false).unwrap();
        let mut buf = [0u8; 16];
        let mut fds = Vec::new();
        assert_eq!(recv(&b, &mut buf, &mut fds, false).unwrap(), 2);
        assert_eq!(fds.len(), 2);
        let many: Vec<BorrowedFd<'_>> = (0..254).map(|_| p.as_fd()).collect();
        assert!(send(&a, b"x", &many, false).is_err());
        send(&a, b"x", &many[..253], false).unwrap();
        fds.clear();
        recv(&b, &mut buf, &mut fds, false).unwrap();
        assert_eq!(fds.len(), 253);
        drop(a);
        assert_eq!(recv(&b, &mut buf, &mut fds, false).unwrap(), 0);
    }

    /// Set in the child process [`fds_beyond_the_open_files_limit`] starts.
    const CHILD: &str = "HF_SYS_FDPASS_LIMIT_CHILD";

    /// Under a low open-files limit the kernel drops the fds of a message
    /// that do not fit (`MSG_CTRUNC`): `recv_fds_may_drop` hands over the
    /// first ones and says the rest were dropped; `recv` fails and keeps
    /// none. The limit is per process and tests run side by side, so the
    /// test runs again in a child process of its own.
    #[test]
    fn fds_beyond_the_open_files_limit() {
        if std::env::var_os(CHILD).is_some() {
            return under_a_low_limit();
        }
        let name = "fdpass::tests::fds_beyond_the_open_files_limit";
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([name, "--exact", "--test-threads=1"])
            .env(CHILD, "1")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{text}");
        assert!(text.contains("1 passed"), "the child ran no test:\n{text}");
    }

    fn under_a_low_limit() {
        use rustix::process::{getrlimit, setrlimit, Resource};
        let (a, b) = seqpacket_pair().unwrap();
        let (p, _q) = seqpacket_pair().unwrap();
        let ten: Vec<BorrowedFd<'_>> = (0..10).map(|_| p.as_fd()).collect();
        send(&a, b"one", &ten, false).unwrap();
        send(&a, b"two", &ten, false).unwrap();
        // A limit a little above the highest open descriptor, every free
        // number below it taken, then three given back: room for three.
        let highest = std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
            .max()
            .unwrap();
        let mut lim = getrlimit(Resource::Nofile);
        lim.current = Some(highest + 8);
        setrlimit(Resource::Nofile, lim).unwrap();
        let mut filler = Vec::new();
        while let Ok(fd) = rustix::io::dup(&p) {
            filler.push(fd);
        }
        filler.truncate(filler.len() - 3);
        let mut buf = [0u8; 16];
        let mut fds = Vec::new();
        let got = recv_fds_may_drop(&b, &mut buf, &mut fds, false).unwrap();
        assert_eq!(&buf[..got.len], b"one");
        assert!(got.fds_dropped, "{got:?}");
        assert_eq!((got.fds, fds.len()), (3, 3), "{got:?}");
        // Strict: an error, and what arrived is closed again.
        let before = fds.len();
        let e = recv(&b, &mut buf, &mut fds, false).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert_eq!(fds.len(), before);
    }
}
