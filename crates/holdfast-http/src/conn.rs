//! The connections the adapter serves on.

use std::future::Future;
use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::pin::Pin;
use std::task::{Context, Poll};

use holdfast::ReplayPolicy;
use tokio::io::{AsyncRead, AsyncWrite};

/// A commit's future.
pub type CommitFuture<'a> = Pin<Box<dyn Future<Output = io::Result<()>> + Send + 'a>>;

/// What the adapter needs of a connection: its bytes (plaintext) and
/// holdfast's commit interface over them. Implemented for
/// [`holdfast::tokio::Conn`] and, with the `tls` feature, for
/// `holdfast_tls::TlsConn` over it; the adapter holds one as a
/// `Box<dyn Connection>`. The methods mean what they mean on
/// [`holdfast::tokio::Conn`].
pub trait Connection: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// The most state a commit may save: [`holdfast::MAX_STATE`], less what
    /// the connection keeps of its own (a TLS session's keys).
    fn max_state(&self) -> usize;
    fn state(&self) -> (u16, &[u8]);
    fn commit<'a>(&'a mut self, consumed: usize, state: &'a [u8]) -> CommitFuture<'a>;
    /// [`Connection::commit`] driven by `poll_*`: call again with the same
    /// arguments after `Pending`, with no write in between.
    fn poll_commit(
        &mut self,
        cx: &mut Context<'_>,
        consumed: usize,
        state: &[u8],
    ) -> Poll<io::Result<()>>;
    fn commit_and_close(&mut self, consumed: usize) -> CommitFuture<'_>;
    fn record(&mut self, make: Box<dyn FnOnce() -> Vec<u8> + '_>) -> io::Result<Vec<u8>>;
    fn replayed(&mut self) -> io::Result<Option<Vec<u8>>>;
    fn now(&mut self) -> io::Result<u64>;
    fn replay_policy(&mut self, policy: ReplayPolicy) -> io::Result<()>;
    fn poisoned(&self) -> bool;
    fn recovered(&self) -> bool;
    fn replaying(&self) -> bool;
    fn moved(&self) -> bool;
    fn hold(&mut self, tag: u32, fd: BorrowedFd<'_>) -> io::Result<()>;
    fn take_held(&mut self, tag: u32) -> Option<OwnedFd>;
    fn unhold(&mut self, tag: u32) -> io::Result<()>;
}

/// The connection as the adapter holds it.
pub(crate) type Io = Box<dyn Connection>;

impl Connection for holdfast::tokio::Conn {
    fn max_state(&self) -> usize {
        holdfast::MAX_STATE
    }
    fn state(&self) -> (u16, &[u8]) {
        holdfast::tokio::Conn::state(self)
    }
    fn commit<'a>(&'a mut self, consumed: usize, state: &'a [u8]) -> CommitFuture<'a> {
        Box::pin(holdfast::tokio::Conn::commit(self, consumed, state))
    }
    fn poll_commit(
        &mut self,
        cx: &mut Context<'_>,
        consumed: usize,
        state: &[u8],
    ) -> Poll<io::Result<()>> {
        holdfast::tokio::Conn::poll_commit(self, cx, consumed, state)
    }
    fn commit_and_close(&mut self, consumed: usize) -> CommitFuture<'_> {
        Box::pin(holdfast::tokio::Conn::commit_and_close(self, consumed))
    }
    fn record(&mut self, make: Box<dyn FnOnce() -> Vec<u8> + '_>) -> io::Result<Vec<u8>> {
        holdfast::tokio::Conn::record(self, make)
    }
    fn replayed(&mut self) -> io::Result<Option<Vec<u8>>> {
        holdfast::tokio::Conn::replayed(self)
    }
    fn now(&mut self) -> io::Result<u64> {
        holdfast::tokio::Conn::now(self)
    }
    fn replay_policy(&mut self, policy: ReplayPolicy) -> io::Result<()> {
        holdfast::tokio::Conn::replay_policy(self, policy)
    }
    fn poisoned(&self) -> bool {
        holdfast::tokio::Conn::poisoned(self)
    }
    fn recovered(&self) -> bool {
        holdfast::tokio::Conn::recovered(self)
    }
    fn replaying(&self) -> bool {
        holdfast::tokio::Conn::replaying(self)
    }
    fn moved(&self) -> bool {
        holdfast::tokio::Conn::moved(self)
    }
    fn hold(&mut self, tag: u32, fd: BorrowedFd<'_>) -> io::Result<()> {
        holdfast::tokio::Conn::hold(self, tag, fd)
    }
    fn take_held(&mut self, tag: u32) -> Option<OwnedFd> {
        holdfast::tokio::Conn::take_held(self, tag)
    }
    fn unhold(&mut self, tag: u32) -> io::Result<()> {
        holdfast::tokio::Conn::unhold(self, tag)
    }
}

#[cfg(feature = "tls")]
impl Connection for holdfast_tls::TlsConn {
    fn max_state(&self) -> usize {
        holdfast_tls::MAX_APP_STATE
    }
    fn state(&self) -> (u16, &[u8]) {
        holdfast_tls::TlsConn::state(self)
    }
    fn commit<'a>(&'a mut self, consumed: usize, state: &'a [u8]) -> CommitFuture<'a> {
        Box::pin(holdfast_tls::TlsConn::commit(self, consumed, state))
    }
    fn poll_commit(
        &mut self,
        cx: &mut Context<'_>,
        consumed: usize,
        state: &[u8],
    ) -> Poll<io::Result<()>> {
        holdfast_tls::TlsConn::poll_commit(self, cx, consumed, state)
    }
    fn commit_and_close(&mut self, consumed: usize) -> CommitFuture<'_> {
        Box::pin(holdfast_tls::TlsConn::commit_and_close(self, consumed))
    }
    fn record(&mut self, make: Box<dyn FnOnce() -> Vec<u8> + '_>) -> io::Result<Vec<u8>> {
        holdfast_tls::TlsConn::record(self, make)
    }
    fn replayed(&mut self) -> io::Result<Option<Vec<u8>>> {
        holdfast_tls::TlsConn::replayed(self)
    }
    fn now(&mut self) -> io::Result<u64> {
        holdfast_tls::TlsConn::now(self)
    }
    fn replay_policy(&mut self, policy: ReplayPolicy) -> io::Result<()> {
        holdfast_tls::TlsConn::replay_policy(self, policy)
    }
    fn poisoned(&self) -> bool {
        holdfast_tls::TlsConn::poisoned(self)
    }
    fn recovered(&self) -> bool {
        holdfast_tls::TlsConn::recovered(self)
    }
    fn replaying(&self) -> bool {
        holdfast_tls::TlsConn::replaying(self)
    }
    fn moved(&self) -> bool {
        holdfast_tls::TlsConn::moved(self)
    }
    // Held channels belong to the TCP connection: the TLS layer passes
    // them through.
    fn hold(&mut self, tag: u32, fd: BorrowedFd<'_>) -> io::Result<()> {
        self.get_mut().hold(tag, fd)
    }
    fn take_held(&mut self, tag: u32) -> Option<OwnedFd> {
        self.get_mut().take_held(tag)
    }
    fn unhold(&mut self, tag: u32) -> io::Result<()> {
        self.get_mut().unhold(tag)
    }
}
