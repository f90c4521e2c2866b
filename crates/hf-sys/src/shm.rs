//! Shared memory for the journal: a memfd mapped `MAP_SHARED` by the keeper
//! and every worker.
//!
//! No Rust reference ever points into the mapping: another process may write
//! any byte of it at any moment (a worker is untrusted, and may die halfway
//! through a write). Data moves only by raw copies into and out of private
//! buffers, and readers validate what they copied (`hf-journal` does).

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};

use memmap2::MmapRaw;
use rustix::fs::{MemfdFlags, SealFlags};

/// A shared, fixed-size mapping of a memfd.
pub struct SharedMem {
    map: MmapRaw,
}

/// An access outside the mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutOfBounds;

impl std::fmt::Display for OutOfBounds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("access outside the shared mapping")
    }
}
impl std::error::Error for OutOfBounds {}

impl SharedMem {
    /// Creates a memfd of `len` bytes (zero-filled, pages allocated on first
    /// touch), seals its size so no worker can shrink it under the keeper
    /// (a shrink would turn the keeper's reads into SIGBUS), and maps it.
    pub fn create(name: &str, len: usize) -> io::Result<(OwnedFd, SharedMem)> {
        let fd = rustix::fs::memfd_create(name, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)?;
        rustix::fs::ftruncate(&fd, len as u64)?;
        rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)?;
        let mem = SharedMem::map(&fd)?;
        Ok((fd, mem))
    }

    /// Maps an existing memfd over its whole (sealed) size.
    pub fn map(fd: impl AsFd) -> io::Result<SharedMem> {
        let dup = fd.as_fd().try_clone_to_owned()?;
        let seals = rustix::fs::fcntl_get_seals(&dup)?;
        if !seals.contains(SealFlags::SHRINK) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "journal memfd is not sealed against shrinking",
            ));
        }
        let file = File::from(dup);
        let map = MmapRaw::map_raw(&file)?;
        Ok(SharedMem { map })
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.len() == 0
    }

    fn check(&self, off: usize, n: usize) -> Result<(), OutOfBounds> {
        match off.checked_add(n) {
            Some(end) if end <= self.map.len() => Ok(()),
            _ => Err(OutOfBounds),
        }
    }

    /// Copies `dst.len()` bytes at `off` out of the mapping.
    pub fn read(&self, off: usize, dst: &mut [u8]) -> Result<(), OutOfBounds> {
        self.check(off, dst.len())?;
        // SAFETY: [off, off+len) is inside the mapping (checked above), which
        // lives as long as `self` and cannot shrink (the memfd is sealed
        // against it, checked in `map`). `dst` is a private buffer, so the
        // ranges do not overlap. Concurrent writes by another process may make
        // the copy inconsistent, never unsound for `u8` data; callers validate.
        unsafe {
            std::ptr::copy_nonoverlapping(self.map.as_ptr().add(off), dst.as_mut_ptr(), dst.len());
        }
        Ok(())
    }

    /// Copies `src` into the mapping at `off`.
    pub fn write(&self, off: usize, src: &[u8]) -> Result<(), OutOfBounds> {
        self.check(off, src.len())?;
        // SAFETY: as in `read`: the range is inside a mapping that outlives
        // this call and cannot shrink; `src` is private memory, so no overlap;
        // no Rust reference into the mapping exists to be invalidated.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), self.map.as_mut_ptr().add(off), src.len());
        }
        Ok(())
    }

    /// Receives up to `len` bytes from socket `fd` straight into the mapping
    /// at `off` (`recv(2)` with `flags`). Used so that bytes consumed from a
    /// socket exist in shared memory the moment the kernel counts them as
    /// consumed: a process killed right after the call loses nothing.
    pub fn recv_into(
        &self,
        fd: impl std::os::fd::AsFd,
        off: usize,
        len: usize,
        nonblocking: bool,
    ) -> io::Result<usize> {
        self.check(off, len)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let flags = if nonblocking { libc::MSG_DONTWAIT } else { 0 };
        // SAFETY: [off, off+len) is inside the live, unshrinkable mapping
        // (checked above); the kernel writes at most `len` bytes there and
        // no Rust reference into the mapping exists to be invalidated. `fd`
        // is borrowed and so open.
        let r = unsafe {
            libc::recv(
                std::os::fd::AsRawFd::as_raw_fd(&fd.as_fd()),
                self.map.as_mut_ptr().add(off).cast(),
                len,
                flags,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(r as usize)
    }

    /// Zeroes `[off, off+n)`.
    pub fn zero(&self, off: usize, n: usize) -> Result<(), OutOfBounds> {
        self.check(off, n)?;
        // SAFETY: the range is inside the live, unshrinkable mapping (see `read`).
        unsafe {
            std::ptr::write_bytes(self.map.as_mut_ptr().add(off), 0, n);
        }
        Ok(())
    }

    /// Stores a `u64` at an 8-aligned offset with a single atomic store, for
    /// counters another process polls (heartbeats).
    pub fn store_u64(&self, off: usize, v: u64) -> Result<(), OutOfBounds> {
        self.check(off, 8)?;
        if !off.is_multiple_of(8) {
            return Err(OutOfBounds);
        }
        // SAFETY: the range is inside the live mapping and 8-aligned (the
        // mapping is page-aligned), so it is a valid place for an AtomicU64;
        // all accesses to such counters go through these atomic helpers.
        let a =
            unsafe { &*(self.map.as_mut_ptr().add(off) as *const std::sync::atomic::AtomicU64) };
        a.store(v, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// Loads a `u64` stored by [`SharedMem::store_u64`].
    pub fn load_u64(&self, off: usize) -> Result<u64, OutOfBounds> {
        self.check(off, 8)?;
        if !off.is_multiple_of(8) {
            return Err(OutOfBounds);
        }
        // SAFETY: as in `store_u64`.
        let a = unsafe { &*(self.map.as_ptr().add(off) as *const std::sync::atomic::AtomicU64) };
        Ok(a.load(std::sync::atomic::Ordering::Acquire))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_mappings_see_each_other() {
        let (fd, a) = SharedMem::create("t", 8192).unwrap();
        let b = SharedMem::map(&fd).unwrap();
        a.write(4090, b"abcdef").unwrap();
        let mut got = [0u8; 6];
        b.read(4090, &mut got).unwrap();
        assert_eq!(&got, b"abcdef");
        assert_eq!(b.read(8190, &mut got), Err(OutOfBounds));
        assert_eq!(a.write(usize::MAX, b"x"), Err(OutOfBounds));
        a.store_u64(16, 7).unwrap();
        assert_eq!(b.load_u64(16).unwrap(), 7);
        assert!(rustix::fs::ftruncate(&fd, 0).is_err(), "size is sealed");
    }
}
