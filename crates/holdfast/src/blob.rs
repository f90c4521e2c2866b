//! Encoding a state blob by hand, without panics.
//!
//! A state blob comes back from the journal after a crash, possibly from an
//! older build: reading it must never panic, whatever its bytes. [`Reader`]
//! takes little-endian fields off the front and answers `None` past the
//! end; the `put_*` functions write what it reads.
//!
//! ```
//! use holdfast::blob::{put_str8, Reader};
//!
//! let mut b = Vec::new();
//! b.extend_from_slice(&42u64.to_le_bytes());
//! put_str8(&mut b, "alice");
//! let mut r = Reader::new(&b);
//! assert_eq!((r.u64(), r.str8().as_deref()), (Some(42), Some("alice")));
//! assert!(r.is_empty());
//! assert_eq!(Reader::new(&b[..3]).u64(), None);
//! ```

/// Reads fields off the front of a blob; `None` past its end.
#[derive(Clone, Debug)]
pub struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    pub fn new(blob: &'a [u8]) -> Reader<'a> {
        Reader(blob)
    }

    /// The next `n` bytes.
    pub fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    pub fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    pub fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }

    pub fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    pub fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    /// A UTF-8 string after a one-byte length (see [`put_str8`]).
    pub fn str8(&mut self) -> Option<String> {
        let n = self.u8()?.into();
        String::from_utf8(self.take(n)?.to_vec()).ok()
    }

    /// A UTF-8 string after a two-byte length (see [`put_str16`]).
    pub fn str16(&mut self) -> Option<String> {
        let n = self.u16()?.into();
        String::from_utf8(self.take(n)?.to_vec()).ok()
    }

    /// Everything read: a decoder should insist on it, so that a blob of
    /// another layout is refused rather than half understood.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Appends `s` after a one-byte length; a longer string is cut at 255 bytes
/// (keep such fields short).
pub fn put_str8(b: &mut Vec<u8>, s: &str) {
    let s = &s.as_bytes()[..s.len().min(u8::MAX.into())];
    b.push(s.len() as u8);
    b.extend_from_slice(s);
}

/// Appends `s` after a two-byte length; a longer string is cut.
pub fn put_str16(b: &mut Vec<u8>, s: &str) {
    let s = &s.as_bytes()[..s.len().min(u16::MAX.into())];
    b.extend_from_slice(&(s.len() as u16).to_le_bytes());
    b.extend_from_slice(s);
}
