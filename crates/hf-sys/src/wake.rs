//! A word in a shared file mapping that processes wait on and wake each
//! other through (a futex): how readers of a shared log learn that another
//! process appended, with nothing woken while idle and nothing for a dying
//! process to tear down (an inotify instance delays a process's death by a
//! kernel grace period, ~14 ms, and so the keeper's recovery).

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicU32, Ordering};

use memmap2::{MmapOptions, MmapRaw};
use rustix::thread::futex;

/// The first page of a file, mapped shared, and one `u32` in it.
pub struct WakeWord {
    map: MmapRaw,
    off: usize,
}

/// The bytes of the file a [`WakeWord`] maps.
pub const PAGE: usize = 4096;

impl WakeWord {
    /// Maps the word at `off` (4-aligned, within the first [`PAGE`] bytes)
    /// of `file`, which must be at least [`PAGE`] bytes long and stay so
    /// (shrinking it under a mapping turns accesses into SIGBUS).
    pub fn map(file: &File, off: usize) -> io::Result<WakeWord> {
        if !off.is_multiple_of(4) || off + 4 > PAGE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "wake word outside the first page",
            ));
        }
        if file.metadata()?.len() < PAGE as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "file shorter than the page its wake word lives in",
            ));
        }
        let map = MmapOptions::new().len(PAGE).map_raw(file)?;
        Ok(WakeWord { map, off })
    }

    fn word(&self) -> &AtomicU32 {
        // SAFETY: the mapping is PAGE bytes long and lives as long as
        // `self`; `off` is 4-aligned and `off + 4 <= PAGE` (checked in
        // `map`), and the mapping is page-aligned, so the address is a
        // valid, aligned place for an AtomicU32. Every access to the word,
        // in every process, is atomic (these methods and the kernel's futex
        // code).
        unsafe { &*(self.map.as_ptr().add(self.off) as *const AtomicU32) }
    }

    pub fn load(&self) -> u32 {
        self.word().load(Ordering::Acquire)
    }

    /// Changes the word and wakes every process waiting on it.
    pub fn bump(&self) {
        self.word().fetch_add(1, Ordering::AcqRel);
        // A shared futex (not PRIVATE): the waiters are other processes.
        let _ = futex::wake(self.word(), futex::Flags::empty(), u32::MAX);
    }

    /// Blocks while the word still equals `seen`; may return early
    /// (signals, spurious wake-ups): callers look again.
    pub fn wait(&self, seen: u32) {
        let _ = futex::wait(self.word(), futex::Flags::empty(), seen, None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bump_in_one_mapping_wakes_a_waiter_on_another() {
        let path = std::env::temp_dir().join(format!("hf-wake-{}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        f.set_len(PAGE as u64).unwrap();
        let a = WakeWord::map(&f, 64).unwrap();
        let g = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let b = WakeWord::map(&g, 64).unwrap();
        let seen = b.load();
        let t = std::thread::spawn(move || {
            while b.load() == seen {
                b.wait(seen);
            }
            b.load()
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
        a.bump();
        assert_eq!(t.join().unwrap(), seen + 1);
        assert!(WakeWord::map(&f, 4094).is_err());
        let _ = std::fs::remove_file(&path);
    }
}
