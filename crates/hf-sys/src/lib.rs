//! # hf-sys — the syscalls holdfast needs that are not already safe elsewhere
//!
//! Every `unsafe` block of holdfast lives in this crate, each with a
//! `// SAFETY:` note naming the invariants it relies on. Everything above
//! it (`hf-journal`, `holdfast`, `hf-keeper`, the services) is
//! `#![forbid(unsafe_code)]` and sees only I/O-safe types (`OwnedFd`,
//! `BorrowedFd`).
//!
//! What is here and why:
//!
//! - [`tcp`]: the kernel's exact stream positions of a TCP socket (bytes the
//!   owning processes wrote and consumed), so that after a crash holdfast
//!   knows how much of a response reached the socket and how much input was
//!   consumed, even if the worker died between a syscall and its own
//!   bookkeeping; discarding input with `MSG_TRUNC` without copying it; the
//!   `SO_PEEK_OFF` knob that makes successive `MSG_PEEK` reads advance;
//!   `SO_OOBINLINE`, without which TCP urgent data breaks all of these
//!   (docs/kernel-notes.md).
//!   rustix has none of these, so they go through `libc`.
//! - [`shm`]: the journal mapping. The memory is shared with another process
//!   that may write it at any time, so no Rust reference ever points into it:
//!   values are copied in and out with raw copies, and readers validate the
//!   copy.
//! - [`fdpass`]: `SCM_RIGHTS` messages on `SOCK_SEQPACKET` sockets (safe, on
//!   top of rustix), received fds always `CLOEXEC`.
//! - [`spawn`]: starting a child that inherits exactly the fds named, with
//!   everything else left close-on-exec.
//!
//! Non-goals: portability beyond Linux ≥ 6.9 (`SO_PEEK_OFF` on TCP).

#![deny(unsafe_op_in_unsafe_fn)]

pub mod fdpass;
pub mod inherited;
#[cfg(feature = "tokio")]
pub mod reactor;
pub mod shm;
pub mod spawn;
pub mod tcp;
pub mod wake;
