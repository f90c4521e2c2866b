//! Registering descriptors with tokio's reactor.

use std::io;
use std::os::fd::OwnedFd;

use tokio::io::unix::AsyncFd;

/// Registers `fd` with the current tokio runtime for read and write
/// readiness. Must be called inside a runtime.
pub fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an `OwnedFd` is a valid open descriptor, owned by the
    // `AsyncFd` from here on, so it stays open and refers to the same file
    // description until the `AsyncFd` is dropped or unwrapped; its
    // `as_raw_fd` always returns that same number.
    unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)
}
