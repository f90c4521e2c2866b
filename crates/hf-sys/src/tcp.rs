//! TCP stream positions and input discard.
//!
//! # References
//! - tcp(7): `TCP_INFO`, `SIOCINQ`, `SIOCOUTQ`
//! - socket(7): `SO_PEEK_OFF`
//! - recv(2): `MSG_TRUNC` on TCP discards without copying

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

/// `SO_PEEK_OFF` (asm-generic value; the `libc` crate lacks it for Linux).
const SO_PEEK_OFF: libc::c_int = 42;
/// `SIOCINQ` is `FIONREAD`, `SIOCOUTQ` is `TIOCOUTQ` (linux/sockios.h).
const SIOCINQ: libc::c_ulong = libc::FIONREAD as libc::c_ulong;
const SIOCOUTQ: libc::c_ulong = libc::TIOCOUTQ as libc::c_ulong;

// TCP states (include/net/tcp_states.h) that tell a FIN took a sequence number.
const TCP_FIN_WAIT1: u8 = 4;
const TCP_FIN_WAIT2: u8 = 5;
const TCP_TIME_WAIT: u8 = 6;
const TCP_CLOSE: u8 = 7;
const TCP_CLOSE_WAIT: u8 = 8;
const TCP_LAST_ACK: u8 = 9;
const TCP_CLOSING: u8 = 11;

/// Where a connection's two byte streams stand, from the kernel's counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamPos {
    /// Bytes the socket's owners wrote so far (acknowledged + still queued),
    /// not counting a FIN.
    pub written: u64,
    /// Bytes the socket's owners consumed (read or discarded) so far, not
    /// counting a FIN.
    pub consumed: u64,
    /// The peer sent FIN.
    pub fin_received: bool,
    /// We sent FIN (someone called `shutdown(SHUT_WR)`).
    pub fin_sent: bool,
    /// Bytes written but not yet acknowledged by the peer (`SIOCOUTQ`).
    pub unacked: u64,
    /// Bytes received so far (consumed or queued), not counting a FIN.
    pub received: u64,
    /// The connection is over (`TCP_CLOSE`): both FINs went through, or a
    /// reset ended it. Nothing can be sent or received any more, and after
    /// a reset the counts above may be one off, since the state does not
    /// tell a reset from a FIN (a reset takes no sequence number).
    pub closed: bool,
}

fn ioctl_int(fd: BorrowedFd<'_>, req: libc::c_ulong) -> io::Result<u64> {
    let mut v: libc::c_int = 0;
    // SAFETY: `fd` is a live descriptor for the duration of the call (it is
    // borrowed), and SIOCINQ/SIOCOUTQ write exactly one `int` through the
    // pointer, which points at a local `c_int`.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, &mut v as *mut libc::c_int) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u64::try_from(v).unwrap_or(0))
}

fn tcp_info(fd: BorrowedFd<'_>) -> io::Result<libc::tcp_info> {
    // SAFETY: `tcp_info` is plain old data (integers only), so all-zero is a
    // valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `info`, which is that
    // large, and updates `len`; `fd` is borrowed and so open.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            &mut info as *mut libc::tcp_info as *mut libc::c_void,
            &mut len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // bytes_received was added in Linux 4.1; shorter answers lack it.
    let needed = std::mem::offset_of!(libc::tcp_info, tcpi_bytes_received) + 8;
    if (len as usize) < needed {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "TCP_INFO lacks byte counters",
        ));
    }
    Ok(info)
}

/// The kernel's positions of both streams of a TCP socket.
///
/// `written = tcpi_bytes_acked + SIOCOUTQ` and
/// `consumed = tcpi_bytes_received − SIOCINQ`, each corrected for a FIN,
/// which takes a sequence number but is not a byte.
pub fn stream_positions(fd: impl AsFd) -> io::Result<StreamPos> {
    let fd = fd.as_fd();
    // TCP_INFO and the two ioctls are separate syscalls, and ACKs and data
    // keep arriving between them: an ACK landing after TCP_INFO but before
    // SIOCOUTQ would make the sum too small. Nobody writes or reads while
    // this runs (the old worker is dead, the new one has not started), so
    // the queue lengths change only through arrivals: read them before and
    // after TCP_INFO, and retry until they agree.
    for _ in 0..1000 {
        let (outq, inq) = (ioctl_int(fd, SIOCOUTQ)?, ioctl_int(fd, SIOCINQ)?);
        let info = tcp_info(fd)?;
        if (outq, inq) != (ioctl_int(fd, SIOCOUTQ)?, ioctl_int(fd, SIOCINQ)?) {
            continue;
        }
        let st = info.tcpi_state;
        // A socket still held open that saw both FINs is in CLOSE, not
        // TIME_WAIT (the time-wait state moves to a separate mini-socket).
        // CLOSE after a reset is counted as "both FINs" too, and flagged
        // `closed`: the connection is over either way, and its owner drops
        // it rather than compare positions.
        let fin_received = matches!(
            st,
            TCP_CLOSE_WAIT | TCP_LAST_ACK | TCP_CLOSING | TCP_TIME_WAIT | TCP_CLOSE
        );
        let fin_sent = matches!(
            st,
            TCP_FIN_WAIT1 | TCP_FIN_WAIT2 | TCP_CLOSING | TCP_TIME_WAIT | TCP_LAST_ACK | TCP_CLOSE
        );
        // SIOCOUTQ counts the FIN while it is unacknowledged, bytes_acked once
        // it is acknowledged: either way the sum holds it exactly once.
        let written = (info.tcpi_bytes_acked + outq).saturating_sub(u64::from(fin_sent));
        // SIOCINQ never counts the FIN; bytes_received does.
        let consumed = info
            .tcpi_bytes_received
            .saturating_sub(u64::from(fin_received))
            .saturating_sub(inq);
        return Ok(StreamPos {
            written,
            consumed,
            fin_received,
            fin_sent,
            unacked: outq,
            received: info
                .tcpi_bytes_received
                .saturating_sub(u64::from(fin_received)),
            closed: st == TCP_CLOSE,
        });
    }
    Err(io::Error::new(
        io::ErrorKind::TimedOut,
        "TCP counters kept moving",
    ))
}

/// Bytes waiting in the receive queue (`SIOCINQ`).
pub fn inq(fd: impl AsFd) -> io::Result<u64> {
    ioctl_int(fd.as_fd(), SIOCINQ)
}

/// Discards up to `n` bytes from the front of the receive queue without
/// copying them (`recv(fd, NULL, n, MSG_TRUNC | MSG_DONTWAIT)`). Returns how
/// many were discarded; `WouldBlock` when nothing is queued.
pub fn discard(fd: impl AsFd, n: usize) -> io::Result<usize> {
    let fd = fd.as_fd();
    // SAFETY: with MSG_TRUNC on a TCP socket the kernel drops the bytes and
    // never writes through the buffer pointer, so NULL is allowed (tcp(7));
    // `fd` is borrowed and so open.
    let r = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            std::ptr::null_mut(),
            n,
            libc::MSG_TRUNC | libc::MSG_DONTWAIT,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as usize)
}

/// Delivers TCP urgent data inline (`SO_OOBINLINE`): a byte the peer sent
/// with `MSG_OOB` stays at its place in the stream and is read, peeked,
/// discarded and counted like any other; `recv(MSG_OOB)` fails with
/// `EINVAL`.
///
/// Without it Linux takes the urgent byte out of the stream yet counts it
/// in `tcpi_bytes_received`: `SIOCINQ` stops at the urgent mark, a peek
/// skips the byte but moves `SO_PEEK_OFF` one byte short, a `MSG_TRUNC`
/// discard drops it uncounted, and every position computed here goes wrong
/// (docs/kernel-notes.md has the details and the experiment). Set it on a
/// listening socket, before any connection exists: accepted sockets
/// inherit it. Set later, it still makes an urgent byte that is already
/// queued readable in place, unless a second urgent pointer arrived first:
/// the kernel then drops the earlier byte if it was next to be read.
pub fn set_urgent_inline(fd: impl AsFd) -> io::Result<()> {
    Ok(rustix::net::sockopt::set_socket_oobinline(fd, true)?)
}

/// Sets `SO_PEEK_OFF`: with it set (≥ 0), each `MSG_PEEK` read continues
/// where the last one stopped, and discarding input moves it back by as much.
pub fn set_peek_off(fd: impl AsFd, off: i32) -> io::Result<()> {
    let fd = fd.as_fd();
    let v: libc::c_int = off;
    // SAFETY: passes a pointer to a local `int` and its size; the kernel only
    // reads it. `fd` is borrowed and so open.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_PEEK_OFF,
            &v as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reads `SO_PEEK_OFF`: how far past the consumed input the socket's
/// owners have peeked (-1 when peeking does not advance). It belongs to the
/// socket, so it still tells after a worker's death how much input that
/// worker had looked at.
pub fn peek_off(fd: impl AsFd) -> io::Result<i32> {
    let fd = fd.as_fd();
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes (one `int`) into the
    // local `v` and updates `len`; `fd` is borrowed and so open.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_PEEK_OFF,
            &mut v as *mut libc::c_int as *mut libc::c_void,
            &mut len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::net::RecvFlags;
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpListener, TcpStream};

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        (c, s)
    }

    fn settle() {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }

    #[test]
    fn positions_count_bytes_not_fins() {
        let (mut c, mut s) = pair();
        c.write_all(b"hello world").unwrap();
        settle();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).unwrap();
        s.write_all(b"0123456789abc").unwrap();
        settle();
        let p = stream_positions(&s).unwrap();
        assert_eq!((p.written, p.consumed), (13, 5));
        s.shutdown(Shutdown::Write).unwrap();
        settle();
        let p = stream_positions(&s).unwrap();
        assert!(p.fin_sent && !p.fin_received);
        assert_eq!(p.written, 13);
        c.shutdown(Shutdown::Write).unwrap();
        settle();
        let p = stream_positions(&s).unwrap();
        assert!(p.fin_received && p.fin_sent);
        assert_eq!((p.written, p.consumed), (13, 5));
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, b" world");
        let p = stream_positions(&s).unwrap();
        assert_eq!(p.consumed, 11);
    }

    /// `send(MSG_OOB)` of `bytes`: the last one is the urgent byte.
    fn send_urgent(s: &TcpStream, bytes: &[u8]) {
        let n = rustix::net::send(s, bytes, rustix::net::SendFlags::OOB).unwrap();
        assert_eq!(n, bytes.len());
    }

    fn peek(s: &TcpStream) -> Vec<u8> {
        let mut buf = [0u8; 64];
        match rustix::net::recv(s, &mut buf[..], RecvFlags::PEEK | RecvFlags::DONTWAIT) {
            Ok((n, _)) => buf[..n].to_vec(),
            Err(rustix::io::Errno::AGAIN) => Vec::new(),
            Err(e) => panic!("peek: {e}"),
        }
    }

    /// What Linux does with an urgent byte on a socket without
    /// `SO_OOBINLINE` (docs/kernel-notes.md): every count the library
    /// relies on is off by the urgent byte.
    #[test]
    fn urgent_byte_out_of_line_breaks_every_count() {
        let (mut c, s) = pair();
        set_peek_off(&s, 0).unwrap();
        c.write_all(b"abcd").unwrap();
        send_urgent(&c, b"EFG!");
        c.write_all(b"xyz").unwrap();
        settle();
        let p = stream_positions(&s).unwrap();
        // 11 bytes arrived, none consumed; SIOCINQ stops at the mark.
        assert_eq!((p.received, inq(&s).unwrap(), p.consumed), (11, 7, 4));
        // A peek stops at the mark, the next skips the urgent byte but
        // moves the peek offset only by what it returned, so the one after
        // returns the last byte again.
        assert_eq!(peek(&s), b"abcdEFG");
        assert_eq!(peek(&s), b"xyz");
        assert_eq!(peek(&s), b"z");
        // A discard stops at the mark, and the next one drops the urgent
        // byte without counting it.
        assert_eq!(discard(&s, 100).unwrap(), 7);
        assert_eq!(discard(&s, 100).unwrap(), 3);
        assert_eq!(stream_positions(&s).unwrap().consumed, 11);
    }

    /// With `SO_OOBINLINE` on the listener, the accepted socket has it and
    /// the urgent byte is an ordinary byte to every count.
    #[test]
    fn urgent_byte_inline_keeps_every_count_exact() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        set_urgent_inline(&l).unwrap();
        let mut c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        assert!(rustix::net::sockopt::socket_oobinline(&s).unwrap());
        set_peek_off(&s, 0).unwrap();
        c.write_all(b"abcd").unwrap();
        send_urgent(&c, b"EFG!");
        c.write_all(b"xyz").unwrap();
        settle();
        let p = stream_positions(&s).unwrap();
        assert_eq!((p.received, inq(&s).unwrap(), p.consumed), (11, 11, 0));
        // Reads still stop at the mark, but the byte is there, once.
        assert_eq!(peek(&s), b"abcdEFG");
        assert_eq!(peek(&s), b"!xyz");
        assert_eq!(peek(&s), b"");
        let mut one = [0u8; 1];
        assert_eq!(
            rustix::net::recv(&s, &mut one[..], RecvFlags::OOB),
            Err(rustix::io::Errno::INVAL)
        );
        assert_eq!(discard(&s, 9).unwrap(), 7);
        assert_eq!(stream_positions(&s).unwrap().consumed, 7);
        assert_eq!(peek(&s), b"");
        set_peek_off(&s, 0).unwrap();
        assert_eq!(peek(&s), b"!xyz");
        assert_eq!(discard(&s, 100).unwrap(), 4);
        assert_eq!(stream_positions(&s).unwrap().consumed, 11);
    }

    /// `SO_OOBINLINE` set after the data arrived makes a queued urgent byte
    /// readable in place, unless a second urgent pointer came first: the
    /// kernel then drops the earlier byte if it was next to be read. Hence
    /// the flag goes on listening sockets.
    #[test]
    fn urgent_inline_set_late_misses_a_superseded_urgent_byte() {
        let (c, s) = pair();
        send_urgent(&c, b"A");
        settle();
        set_urgent_inline(&s).unwrap();
        assert_eq!(inq(&s).unwrap(), 1);
        let (c, s) = pair();
        send_urgent(&c, b"A");
        settle();
        send_urgent(&c, b"B");
        settle();
        set_urgent_inline(&s).unwrap();
        let p = stream_positions(&s).unwrap();
        assert_eq!((p.received, inq(&s).unwrap(), p.consumed), (2, 1, 1));
        assert_eq!(peek(&s), b"B");
    }

    #[test]
    fn peek_advances_and_discard_drops() {
        let (mut c, s) = pair();
        set_peek_off(&s, 0).unwrap();
        c.write_all(b"abcdefgh").unwrap();
        settle();
        let mut buf = [0u8; 3];
        let n = rustix::net::recv(&s, &mut buf[..], rustix::net::RecvFlags::PEEK)
            .unwrap()
            .0;
        assert_eq!(&buf[..n], b"abc");
        let n = rustix::net::recv(&s, &mut buf[..], rustix::net::RecvFlags::PEEK)
            .unwrap()
            .0;
        assert_eq!(&buf[..n], b"def");
        assert_eq!(discard(&s, 4).unwrap(), 4);
        assert_eq!(stream_positions(&s).unwrap().consumed, 4);
        // The peek offset moved back by the 4 discarded bytes: "gh" is next.
        let n = rustix::net::recv(&s, &mut buf[..], rustix::net::RecvFlags::PEEK)
            .unwrap()
            .0;
        assert_eq!(&buf[..n], b"gh");
        assert_eq!(inq(&s).unwrap(), 4);
        // "efgh" are left and all four were peeked.
        assert_eq!(peek_off(&s).unwrap(), 4);
    }
}
