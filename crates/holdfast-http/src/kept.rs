//! Bytes a new worker needs to resume a connection — a WebSocket's upgrade
//! request, a stream's request — kept with it: in its state blob when they
//! fit, else in a memfd the keeper holds with the connection.

use std::io::{self, Read, Write};
use std::ops::RangeInclusive;
use std::os::fd::AsFd;

use holdfast::blob::Reader;

use crate::conn::Io;

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Kept {
    Inline(Vec<u8>),
    Held,
}

impl Kept {
    /// Keeps `bytes`: inline up to `inline_max`, else in a memfd named
    /// `name` held under `tag`.
    pub(crate) fn keep(
        conn: &mut Io,
        bytes: &[u8],
        inline_max: usize,
        tag: u32,
        name: &str,
    ) -> io::Result<Kept> {
        if bytes.len() <= inline_max {
            return Ok(Kept::Inline(bytes.to_vec()));
        }
        let fd = rustix::fs::memfd_create(name, rustix::fs::MemfdFlags::CLOEXEC)?;
        let mut f = std::fs::File::from(fd);
        f.write_all(bytes)?;
        conn.hold(tag, f.as_fd())?;
        Ok(Kept::Held)
    }

    /// The bytes back, in a new worker (`what` names them in the error of
    /// a held memfd gone missing).
    pub(crate) fn load(&self, conn: &mut Io, tag: u32, what: &str) -> io::Result<Vec<u8>> {
        match self {
            Kept::Inline(b) => Ok(b.clone()),
            Kept::Held => {
                let fd = conn.take_held(tag).ok_or_else(|| {
                    io::Error::new(io::ErrorKind::NotFound, format!("{what} is missing"))
                })?;
                let mut f = std::fs::File::from(fd);
                std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(0))?;
                let mut b = Vec::new();
                f.read_to_end(&mut b)?;
                Ok(b)
            }
        }
    }

    /// Appends its encoding to a blob: kind (`u8`), length (`u16`), the
    /// bytes when inline.
    pub(crate) fn put(&self, b: &mut Vec<u8>) {
        match self {
            Kept::Inline(v) => {
                b.push(0);
                b.extend_from_slice(&(v.len() as u16).to_le_bytes());
                b.extend_from_slice(v);
            }
            Kept::Held => {
                b.push(1);
                b.extend_from_slice(&0u16.to_le_bytes());
            }
        }
    }

    /// Reads what [`Kept::put`] wrote; `None` for anything else, or inline
    /// bytes of a length outside `inline`.
    pub(crate) fn take(r: &mut Reader<'_>, inline: RangeInclusive<usize>) -> Option<Kept> {
        let kind = r.u8()?;
        let len = usize::from(r.u16()?);
        let bytes = r.take(len)?;
        match kind {
            0 if inline.contains(&len) => Some(Kept::Inline(bytes.to_vec())),
            1 if len == 0 => Some(Kept::Held),
            _ => None,
        }
    }
}
