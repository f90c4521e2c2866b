//! Starting a child that inherits exactly the fds named.
//!
//! Every fd holdfast creates is `CLOEXEC`; a worker must inherit its control
//! socket and the journal memfd, and nothing else (not the keeper's dups of
//! client connections, which would otherwise keep sockets alive in the
//! wrong process).

use std::os::fd::{BorrowedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

use rustix::io::FdFlags;

/// Makes `cmd` keep the listed fds open across `exec` (same numbers), and,
/// if `die_with_parent`, makes the child receive SIGKILL when the spawning
/// thread exits, so workers never outlive a dead keeper.
pub fn inherit_fds(cmd: &mut Command, fds: &[BorrowedFd<'_>], die_with_parent: bool) {
    let raw: Vec<RawFd> = fds.iter().map(std::os::fd::AsRawFd::as_raw_fd).collect();
    let hook = move || -> std::io::Result<()> {
        for &fd in &raw {
            // SAFETY: `fd` was a live descriptor borrowed by the caller of
            // `inherit_fds` for the duration of the spawn; after fork the
            // child has the same table, and this borrow ends before exec.
            let fd = unsafe { BorrowedFd::borrow_raw(fd) };
            rustix::io::fcntl_setfd(fd, FdFlags::empty())?;
        }
        if die_with_parent {
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))?;
        }
        Ok(())
    };
    // SAFETY: the hook runs between fork and exec in the child. It only makes
    // raw syscalls (fcntl, prctl) through rustix, which allocate nothing and
    // take no locks, so it is async-signal-safe; the captured Vec is only
    // read, not freed, in the child.
    unsafe {
        cmd.pre_exec(hook);
    }
}

/// Makes `cmd` write `marker` to its standard output right before `exec`,
/// after its stdio is in place. A reader of that output (a CGI program's
/// pipe) then knows the child was started, even if the process that
/// started it died before it could say so: the marker is the first byte.
pub fn mark_start(cmd: &mut Command, marker: u8) {
    let hook = move || -> std::io::Result<()> {
        // SAFETY: fd 1 is the child's standard output, set up by `Command`
        // before pre-exec hooks run; it is only borrowed for this write.
        let out = unsafe { BorrowedFd::borrow_raw(1) };
        rustix::io::write(out, &[marker])?;
        Ok(())
    };
    // SAFETY: the hook runs between fork and exec in the child and makes a
    // single raw `write` syscall through rustix: no allocation, no locks,
    // async-signal-safe.
    unsafe {
        cmd.pre_exec(hook);
    }
}
