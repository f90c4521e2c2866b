//! What hf-httpd uses of a connection, plain (`holdfast::tokio::Conn`) or
//! TLS (`holdfast_tls::TlsConn`, with `--tls-cert`/`--tls-key`): the same
//! interface in plaintext terms, so every answer, commit and held channel
//! works the same over both.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{BorrowedFd, OwnedFd};

use holdfast::tokio::Conn;
use holdfast_tls::TlsConn;
use tokio::io::{AsyncRead, AsyncWrite};

pub trait HfConn: AsyncRead + AsyncWrite + Unpin + Send {
    fn state(&self) -> (u16, &[u8]);
    /// The largest state blob this connection takes.
    fn max_state(&self) -> usize;
    fn poisoned(&self) -> bool;
    fn now(&mut self) -> io::Result<u64>;
    fn record(&mut self, make: impl FnOnce() -> Vec<u8>) -> io::Result<Vec<u8>>;
    fn skip_output_check(&mut self);
    fn set_nodelay(&self, on: bool) -> io::Result<()>;
    fn peer_addr(&self) -> io::Result<SocketAddr>;
    fn hold(&mut self, tag: u32, fd: BorrowedFd<'_>) -> io::Result<()>;
    fn take_held(&mut self, tag: u32) -> Option<OwnedFd>;
    fn unhold(&mut self, tag: u32) -> io::Result<()>;
    fn commit(
        &mut self,
        consumed: usize,
        state: &[u8],
    ) -> impl Future<Output = io::Result<()>> + Send;
    fn commit_versioned(
        &mut self,
        consumed: usize,
        version: u16,
        state: &[u8],
    ) -> impl Future<Output = io::Result<()>> + Send;
    fn commit_and_close(&mut self, consumed: usize) -> impl Future<Output = io::Result<()>> + Send;
}

impl HfConn for Conn {
    fn state(&self) -> (u16, &[u8]) {
        Conn::state(self)
    }
    fn max_state(&self) -> usize {
        holdfast::MAX_STATE
    }
    fn poisoned(&self) -> bool {
        Conn::poisoned(self)
    }
    fn now(&mut self) -> io::Result<u64> {
        Conn::now(self)
    }
    fn record(&mut self, make: impl FnOnce() -> Vec<u8>) -> io::Result<Vec<u8>> {
        Conn::record(self, make)
    }
    fn skip_output_check(&mut self) {
        Conn::skip_output_check(self)
    }
    fn set_nodelay(&self, on: bool) -> io::Result<()> {
        Conn::set_nodelay(self, on)
    }
    fn peer_addr(&self) -> io::Result<SocketAddr> {
        Conn::peer_addr(self)
    }
    fn hold(&mut self, tag: u32, fd: BorrowedFd<'_>) -> io::Result<()> {
        Conn::hold(self, tag, fd)
    }
    fn take_held(&mut self, tag: u32) -> Option<OwnedFd> {
        Conn::take_held(self, tag)
    }
    fn unhold(&mut self, tag: u32) -> io::Result<()> {
        Conn::unhold(self, tag)
    }
    fn commit(
        &mut self,
        consumed: usize,
        state: &[u8],
    ) -> impl Future<Output = io::Result<()>> + Send {
        Conn::commit(self, consumed, state)
    }
    fn commit_versioned(
        &mut self,
        consumed: usize,
        version: u16,
        state: &[u8],
    ) -> impl Future<Output = io::Result<()>> + Send {
        Conn::commit_versioned(self, consumed, version, state)
    }
    fn commit_and_close(&mut self, consumed: usize) -> impl Future<Output = io::Result<()>> + Send {
        Conn::commit_and_close(self, consumed)
    }
}

impl HfConn for TlsConn {
    fn state(&self) -> (u16, &[u8]) {
        TlsConn::state(self)
    }
    fn max_state(&self) -> usize {
        holdfast_tls::MAX_APP_STATE
    }
    fn poisoned(&self) -> bool {
        TlsConn::poisoned(self)
    }
    fn now(&mut self) -> io::Result<u64> {
        TlsConn::now(self)
    }
    fn record(&mut self, make: impl FnOnce() -> Vec<u8>) -> io::Result<Vec<u8>> {
        TlsConn::record(self, make)
    }
    fn skip_output_check(&mut self) {
        TlsConn::skip_output_check(self)
    }
    fn set_nodelay(&self, on: bool) -> io::Result<()> {
        TlsConn::set_nodelay(self, on)
    }
    fn peer_addr(&self) -> io::Result<SocketAddr> {
        TlsConn::peer_addr(self)
    }
    fn hold(&mut self, tag: u32, fd: BorrowedFd<'_>) -> io::Result<()> {
        self.get_mut().hold(tag, fd)
    }
    fn take_held(&mut self, tag: u32) -> Option<OwnedFd> {
        self.get_mut().take_held(tag)
    }
    fn unhold(&mut self, tag: u32) -> io::Result<()> {
        self.get_mut().unhold(tag)
    }
    fn commit(
        &mut self,
        consumed: usize,
        state: &[u8],
    ) -> impl Future<Output = io::Result<()>> + Send {
        TlsConn::commit(self, consumed, state)
    }
    fn commit_versioned(
        &mut self,
        consumed: usize,
        version: u16,
        state: &[u8],
    ) -> impl Future<Output = io::Result<()>> + Send {
        TlsConn::commit_versioned(self, consumed, version, state)
    }
    fn commit_and_close(&mut self, consumed: usize) -> impl Future<Output = io::Result<()>> + Send {
        TlsConn::commit_and_close(self, consumed)
    }
}
