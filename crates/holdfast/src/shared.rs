//! State shared by every connection of a service, across crashes and
//! versions: an append-only log with exactly-once appends.
//!
//! A connection's own state travels in its state blob; what many
//! connections share (a chat room's messages, a queue) must outlive any one
//! worker and be seen by every version while an upgrade moves connections
//! from the old to the new. [`Log`] is a file: every worker of every version
//! opens the same path, appends under an exclusive `flock`, and reads what
//! the others appended; an append wakes every waiting reader in every
//! process through a futex word in the file's first page (nothing woken
//! while idle, and nothing for a dying worker to tear down: an inotify
//! instance would delay the keeper's notice of a worker's death by a
//! kernel grace period, ~14 ms).
//!
//! ## Exactly once
//!
//! A worker may die between appending an entry and committing the
//! connection that caused it; the next worker then reads the same input
//! again and appends again. Each append therefore names its *writer* (a
//! value unique to the connection, e.g. recorded at its start with
//! [`crate::tokio::Conn::record`]) and the writer's own sequence number
//! (kept in the connection's state blob). An append whose writer sequence
//! is not above the last one logged for that writer is not written again:
//! [`Log::append`] returns the sequence number the entry got the first time.
//!
//! Fan-out is then exactly-once too if each reader keeps, in its state
//! blob, the sequence number of the last entry it has delivered: entries
//! are immutable and numbered 1, 2, … without gaps, so a replay delivers
//! the same entries in the same order, byte for byte.
//!
//! ## Crash safety and limits
//!
//! Each entry carries a CRC-32C; a worker killed mid-append leaves a torn
//! tail that readers ignore and the next appender (holding the lock, so the
//! torn writer is gone) cuts off. The file survives the keeper too; it is
//! not synced, so it does not survive a power loss (neither does the
//! journal). It only grows: entries are kept in memory by each process
//! that reads the log, so it suits logs of bounded size (compact it by
//! starting a new file under a new name).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustix::fs::FlockOperation;

/// The first bytes of a log file.
const MAGIC: &[u8; 8] = b"HFLOG002";
/// Entries start after the header page (magic, then the wake word).
const HEADER: u64 = hf_sys::wake::PAGE as u64;
/// Where in the header page readers wait (a `u32`, bumped by each append).
const WAKE_AT: usize = 64;
/// Entry header: body length `u32`, CRC-32C of the body `u32`.
const ENTRY_HEAD: usize = 8;
/// Body header: seq, writer, writer seq (`u64` each).
const BODY_HEAD: usize = 24;
/// The largest entry payload.
pub const MAX_ENTRY: usize = 1 << 20;

/// One logged entry.
#[derive(Debug, PartialEq, Eq)]
pub struct Entry {
    /// Its place in the log: 1, 2, … without gaps.
    pub seq: u64,
    /// Who appended it, and the writer's own sequence number.
    pub writer: u64,
    pub writer_seq: u64,
    pub data: Vec<u8>,
}

/// An append-only log shared by every worker that opens the same path.
pub struct Log {
    path: PathBuf,
    file: File,
    index: Mutex<Index>,
    wake: Arc<hf_sys::wake::WakeWord>,
    /// What wakes this process's waiters: a thread waiting on the wake
    /// word, started by the first wait.
    #[cfg(feature = "tokio")]
    changes: std::sync::OnceLock<io::Result<tokio::sync::watch::Sender<u64>>>,
    /// Tells that thread to end.
    closed: Arc<std::sync::atomic::AtomicBool>,
}

#[derive(Default)]
struct Index {
    /// Where the next entry starts.
    end: u64,
    entries: Vec<Arc<Entry>>,
    /// Writer → (its last writer seq, that entry's seq).
    writers: HashMap<u64, (u64, u64)>,
}

impl Log {
    /// Opens (creating, mode 0600) the log at `path`.
    pub fn open(path: impl AsRef<Path>) -> io::Result<Log> {
        let path = path.as_ref().to_path_buf();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)?;
        {
            rustix::fs::flock(&file, FlockOperation::LockExclusive)?;
            let _lock = Locked(&file);
            if file.metadata()?.len() < HEADER {
                file.set_len(0)?;
                file.write_all_at(MAGIC, 0)?;
                file.set_len(HEADER)?;
            }
            let mut magic = [0u8; 8];
            file.read_exact_at(&mut magic, 0)?;
            if &magic != MAGIC {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{} is not a holdfast log (format 2)", path.display()),
                ));
            }
        }
        let wake = Arc::new(hf_sys::wake::WakeWord::map(&file, WAKE_AT)?);
        let log = Log {
            path,
            file,
            index: Mutex::new(Index {
                end: HEADER,
                ..Index::default()
            }),
            wake,
            #[cfg(feature = "tokio")]
            changes: std::sync::OnceLock::new(),
            closed: Arc::default(),
        };
        log.refresh()?;
        Ok(log)
    }

    /// Where the log lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn index(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock(&self) -> io::Result<Locked<'_>> {
        rustix::fs::flock(&self.file, FlockOperation::LockExclusive)?;
        Ok(Locked(&self.file))
    }

    /// Reads entries other processes appended. A torn or half-written
    /// entry ends the read; it is read again next time.
    fn refresh(&self) -> io::Result<()> {
        let mut ix = self.index();
        self.refresh_locked(&mut ix)
    }

    fn refresh_locked(&self, ix: &mut Index) -> io::Result<()> {
        let size = self.file.metadata()?.len();
        if size <= ix.end {
            return Ok(());
        }
        let mut buf = vec![0u8; usize::try_from(size - ix.end).map_err(io::Error::other)?];
        let n = read_full_at(&self.file, &mut buf, ix.end)?;
        let mut at = 0;
        while let Some((entry, len)) = parse(&buf[at..n]) {
            let last = ix.entries.last().map_or(0, |e| e.seq);
            if entry.seq != last + 1 {
                break;
            }
            ix.writers
                .insert(entry.writer, (entry.writer_seq, entry.seq));
            ix.entries.push(Arc::new(entry));
            at += len;
        }
        ix.end += at as u64;
        Ok(())
    }

    /// Appends `data` for `writer`'s entry number `writer_seq`, unless that
    /// entry (or a later one of the same writer) is already in the log.
    /// Returns the entry's sequence number either way.
    pub fn append(&self, writer: u64, writer_seq: u64, data: &[u8]) -> io::Result<u64> {
        if data.len() > MAX_ENTRY {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "log entry larger than 1 MiB",
            ));
        }
        let _lock = self.lock()?;
        let mut ix = self.index();
        self.refresh_locked(&mut ix)?;
        if let Some(&(last, seq)) = ix.writers.get(&writer) {
            if writer_seq == last {
                return Ok(seq);
            }
            if writer_seq < last {
                let found = ix
                    .entries
                    .iter()
                    .rev()
                    .find(|e| e.writer == writer && e.writer_seq == writer_seq);
                return found.map(|e| e.seq).ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "writer sequence below one already logged",
                    )
                });
            }
        }
        // We hold the lock: a tail we cannot read is from a dead writer.
        if self.file.metadata()?.len() > ix.end {
            self.file.set_len(ix.end)?;
        }
        let seq = ix.entries.last().map_or(0, |e| e.seq) + 1;
        let entry = Entry {
            seq,
            writer,
            writer_seq,
            data: data.to_vec(),
        };
        let bytes = encode(&entry);
        self.file.write_all_at(&bytes, ix.end)?;
        ix.end += bytes.len() as u64;
        ix.writers.insert(writer, (writer_seq, seq));
        ix.entries.push(Arc::new(entry));
        drop(ix);
        // Every reader in every process (this one's too) looks again.
        self.wake.bump();
        Ok(seq)
    }

    /// The sequence number of the last entry (0 for an empty log).
    pub fn last_seq(&self) -> io::Result<u64> {
        let mut ix = self.index();
        self.refresh_locked(&mut ix)?;
        Ok(ix.entries.last().map_or(0, |e| e.seq))
    }

    /// The entries after `seq`, in order.
    pub fn since(&self, seq: u64) -> io::Result<Vec<Arc<Entry>>> {
        let mut ix = self.index();
        self.refresh_locked(&mut ix)?;
        let from = usize::try_from(seq)
            .unwrap_or(usize::MAX)
            .min(ix.entries.len());
        Ok(ix.entries[from..].to_vec())
    }

    /// Waits until the log holds an entry after `seq`, appended by any
    /// process. Cancel-safe. The first wait starts a thread that sleeps on
    /// the log's wake word (one per log and process, 64 KiB of stack).
    #[cfg(feature = "tokio")]
    pub async fn wait_beyond(&self, seq: u64) -> io::Result<()> {
        let tx = self
            .changes
            .get_or_init(|| self.start_waiter())
            .as_ref()
            .map_err(|e| io::Error::new(e.kind(), e.to_string()))?;
        let mut rx = tx.subscribe();
        loop {
            rx.borrow_and_update();
            if self.last_seq()? > seq {
                return Ok(());
            }
            if rx.changed().await.is_err() {
                return Err(io::Error::other("the log's waiter ended"));
            }
        }
    }

    #[cfg(feature = "tokio")]
    fn start_waiter(&self) -> io::Result<tokio::sync::watch::Sender<u64>> {
        let (tx, _) = tokio::sync::watch::channel(0u64);
        let (word, closed, out) = (self.wake.clone(), self.closed.clone(), tx.clone());
        // Read here, before any caller looks at the log: an append between
        // that look and the thread's first wait still differs from `seen`.
        let mut seen = word.load();
        std::thread::Builder::new()
            .name("hf-log-wait".into())
            .stack_size(64 * 1024)
            .spawn(move || {
                while !closed.load(std::sync::atomic::Ordering::Acquire) {
                    word.wait(seen);
                    let now = word.load();
                    if now != seen {
                        seen = now;
                        out.send_modify(|v| *v += 1);
                    }
                }
            })?;
        Ok(tx)
    }
}

impl Drop for Log {
    fn drop(&mut self) {
        // The waiter thread (if any) wakes, sees this, and ends.
        self.closed
            .store(true, std::sync::atomic::Ordering::Release);
        self.wake.bump();
    }
}

/// Holds the log's `flock` until dropped.
struct Locked<'a>(&'a File);

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        let _ = rustix::fs::flock(self.0, FlockOperation::Unlock);
    }
}

fn read_full_at(file: &File, buf: &mut [u8], mut offset: u64) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], offset) {
            Ok(0) => break,
            Ok(k) => {
                n += k;
                offset += k as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn encode(e: &Entry) -> Vec<u8> {
    let mut body = Vec::with_capacity(BODY_HEAD + e.data.len());
    body.extend_from_slice(&e.seq.to_le_bytes());
    body.extend_from_slice(&e.writer.to_le_bytes());
    body.extend_from_slice(&e.writer_seq.to_le_bytes());
    body.extend_from_slice(&e.data);
    let mut out = Vec::with_capacity(ENTRY_HEAD + body.len());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// One entry from the front of `buf` and its encoded length; `None` for an
/// incomplete, oversized or corrupt entry.
pub fn parse(buf: &[u8]) -> Option<(Entry, usize)> {
    let len = u32::from_le_bytes(buf.get(..4)?.try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(buf.get(4..8)?.try_into().ok()?);
    if !(BODY_HEAD..=BODY_HEAD + MAX_ENTRY).contains(&len) {
        return None;
    }
    let body = buf.get(ENTRY_HEAD..ENTRY_HEAD + len)?;
    if crc32c::crc32c(body) != crc {
        return None;
    }
    let u = |i: usize| u64::from_le_bytes(body[i..i + 8].try_into().unwrap_or([0; 8]));
    Some((
        Entry {
            seq: u(0),
            writer: u(8),
            writer_seq: u(16),
            data: body[BODY_HEAD..].to_vec(),
        },
        ENTRY_HEAD + len,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("hf-log-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        dir
    }

    #[test]
    fn appends_once_per_writer_seq_and_numbers_without_gaps() {
        let p = tmp("once");
        let a = Log::open(&p).unwrap();
        let b = Log::open(&p).unwrap();
        assert_eq!(a.append(7, 1, b"x").unwrap(), 1);
        assert_eq!(b.append(9, 1, b"y").unwrap(), 2);
        // The same writer's entry again, from another process's view.
        assert_eq!(b.append(7, 1, b"x").unwrap(), 1);
        assert_eq!(a.append(7, 2, b"z").unwrap(), 3);
        assert_eq!(b.append(7, 1, b"x").unwrap(), 1);
        let all: Vec<_> = a.since(0).unwrap().iter().map(|e| e.data.clone()).collect();
        assert_eq!(all, vec![b"x".to_vec(), b"y".to_vec(), b"z".to_vec()]);
        assert_eq!(b.since(2).unwrap().len(), 1);
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn a_torn_tail_is_ignored_then_cut() {
        let p = tmp("torn");
        let a = Log::open(&p).unwrap();
        a.append(1, 1, b"first").unwrap();
        // A writer killed half-way through its entry.
        let half = encode(&Entry {
            seq: 2,
            writer: 2,
            writer_seq: 1,
            data: b"never".to_vec(),
        });
        let end = std::fs::metadata(&p).unwrap().len();
        a.file.write_all_at(&half[..half.len() / 2], end).unwrap();
        let b = Log::open(&p).unwrap();
        assert_eq!(b.last_seq().unwrap(), 1);
        assert_eq!(b.append(2, 1, b"again").unwrap(), 2);
        assert_eq!(a.since(1).unwrap()[0].data, b"again");
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn the_fuzz_corpus_parses_without_panics() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/shared_log");
        let mut n = 0;
        for f in std::fs::read_dir(dir).unwrap() {
            let data = std::fs::read(f.unwrap().path()).unwrap();
            let mut at = 0;
            while let Some((_, len)) = parse(&data[at..]) {
                at += len;
            }
            n += 1;
        }
        assert!(n >= 6, "the seeds are missing");
    }

    #[test]
    fn parse_never_panics_on_garbage() {
        for n in 0..64 {
            let junk: Vec<u8> = (0..n).map(|i| (i * 37 + n) as u8).collect();
            let _ = parse(&junk);
        }
        let mut big = vec![0xff; 16];
        big[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(parse(&big).is_none());
    }
}
