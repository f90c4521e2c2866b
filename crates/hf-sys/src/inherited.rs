//! Taking ownership of a descriptor inherited across `exec` by number.

use std::io;
use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd, RawFd};

use rustix::io::FdFlags;

/// Takes ownership of inherited descriptor `fd` after checking that it is
/// open, and marks it close-on-exec so the process's own children do not
/// inherit it in turn.
///
/// Call at most once per number: a second `OwnedFd` for the same number would
/// close it twice.
pub fn take(fd: RawFd) -> io::Result<OwnedFd> {
    if fd < 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "negative fd"));
    }
    // SAFETY: the borrow is used only for the fcntl below, which fails with
    // EBADF (and touches nothing) if `fd` is not open.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    rustix::io::fcntl_getfd(borrowed)?;
    // SAFETY: `fd` is open (checked above), was inherited by this process for
    // it to own (the keeper names it in the environment for exactly this),
    // and the documented contract is that nobody else takes it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    rustix::io::fcntl_setfd(&owned, FdFlags::CLOEXEC)?;
    Ok(owned)
}
