//! The blocking flavour: a [`TlsConn`] over holdfast's blocking
//! [`holdfast::Conn`], with `std::io::Read`/`Write`.
//!
//! It is the tokio flavour's code driven to completion on the calling
//! thread: [`Blocking`] adapts the blocking connection to the async
//! traits with calls that block and so never return `Pending`, and each
//! call of this flavour polls the shared code once with a no-op waker.
//! One record layer, one handshake, one set of commit rules.

use std::future::{poll_fn, Future};
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll, Wake, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::tokio::{TlsAcceptor, Transport};

/// holdfast's blocking connection as a [`Transport`]: every call blocks
/// until done, so none returns `Pending`.
pub struct Blocking(pub holdfast::Conn);

impl AsyncRead for Blocking {
    fn poll_read(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let n = self.get_mut().0.read(buf.initialize_unfilled())?;
        buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Blocking {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(self.get_mut().0.write(buf))
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.get_mut().0.flush())
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The connection closes when it is dropped.
        Poll::Ready(self.get_mut().0.flush())
    }
}

impl Transport for Blocking {
    fn id(&self) -> Option<u64> {
        self.0.id()
    }
    fn state(&self) -> (u16, &[u8]) {
        self.0.state()
    }
    fn recovered(&self) -> bool {
        self.0.recovered()
    }
    fn replaying(&self) -> bool {
        self.0.replaying()
    }
    fn poisoned(&self) -> bool {
        self.0.poisoned()
    }
    fn moved(&self) -> bool {
        self.0.moved()
    }
    fn record(&mut self, make: impl FnOnce() -> Vec<u8>) -> io::Result<Vec<u8>> {
        self.0.record(make)
    }
    fn now(&mut self) -> io::Result<u64> {
        self.0.now()
    }
    fn skip_output_check(&mut self) {
        self.0.skip_output_check()
    }
    fn replay_policy(&mut self, policy: holdfast::ReplayPolicy) -> io::Result<()> {
        self.0.replay_policy(policy)
    }
    fn set_nodelay(&self, on: bool) -> io::Result<()> {
        self.0.set_nodelay(on)
    }
    fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.0.peer_addr()
    }
    fn commit(
        &mut self,
        consumed: usize,
        state: &[u8],
    ) -> impl Future<Output = io::Result<()>> + Send {
        std::future::ready(self.0.commit(consumed, state))
    }
    fn commit_versioned(
        &mut self,
        consumed: usize,
        version: u16,
        state: &[u8],
    ) -> impl Future<Output = io::Result<()>> + Send {
        std::future::ready(self.0.commit_versioned(consumed, version, state))
    }
    fn commit_and_close(&mut self, consumed: usize) -> impl Future<Output = io::Result<()>> + Send {
        std::future::ready(self.0.commit_and_close(consumed))
    }
}

struct Noop;

impl Wake for Noop {
    fn wake(self: std::sync::Arc<Self>) {}
}

/// Runs `f` to its end on this thread. With a [`Blocking`] transport
/// nothing returns `Pending`; should anything, it is polled again.
fn block_on<F: Future>(f: F) -> F::Output {
    let waker = Waker::from(std::sync::Arc::new(Noop));
    let mut cx = Context::from_waker(&waker);
    let mut f = std::pin::pin!(f);
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::yield_now();
    }
}

impl TlsAcceptor {
    /// [`TlsAcceptor::accept`] for the blocking flavour.
    pub fn accept_blocking(&self, conn: holdfast::Conn) -> io::Result<TlsConn> {
        block_on(self.accept(Blocking(conn))).map(TlsConn)
    }
}

/// A TLS connection of the blocking flavour; see [`crate::TlsConn`].
pub struct TlsConn(pub crate::tokio::TlsConn<Blocking>);

impl TlsConn {
    pub fn commit(&mut self, consumed: usize, state: &[u8]) -> io::Result<()> {
        block_on(self.0.commit(consumed, state))
    }
    pub fn commit_versioned(
        &mut self,
        consumed: usize,
        version: u16,
        state: &[u8],
    ) -> io::Result<()> {
        block_on(self.0.commit_versioned(consumed, version, state))
    }
    pub fn commit_and_close(&mut self, consumed: usize) -> io::Result<()> {
        block_on(self.0.commit_and_close(consumed))
    }
    pub fn state(&self) -> (u16, &[u8]) {
        self.0.state()
    }
    pub fn recovered(&self) -> bool {
        self.0.recovered()
    }
    pub fn replaying(&self) -> bool {
        self.0.replaying()
    }
    pub fn poisoned(&self) -> bool {
        self.0.poisoned()
    }
    pub fn moved(&self) -> bool {
        self.0.moved()
    }
    pub fn id(&self) -> Option<u64> {
        self.0.id()
    }
    pub fn record(&mut self, make: impl FnOnce() -> Vec<u8>) -> io::Result<Vec<u8>> {
        self.0.record(make)
    }
    pub fn now(&mut self) -> io::Result<u64> {
        self.0.now()
    }
    pub fn skip_output_check(&mut self) {
        self.0.skip_output_check()
    }
    pub fn replay_policy(&mut self, policy: holdfast::ReplayPolicy) -> io::Result<()> {
        self.0.replay_policy(policy)
    }
    pub fn set_nodelay(&self, on: bool) -> io::Result<()> {
        self.0.set_nodelay(on)
    }
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.0.peer_addr()
    }
    pub fn kept_session(&self) -> bool {
        self.0.kept_session()
    }
    /// The underlying connection, for held channels.
    pub fn get_mut(&mut self) -> &mut holdfast::Conn {
        &mut self.0.get_mut().0
    }
}

impl Read for TlsConn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let inner = &mut self.0;
        block_on(poll_fn(|cx| {
            let mut rb = ReadBuf::new(&mut *buf);
            match Pin::new(&mut *inner).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => Poll::Ready(Ok(rb.filled().len())),
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            }
        }))
    }
}

impl Write for TlsConn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let inner = &mut self.0;
        block_on(poll_fn(|cx| Pin::new(&mut *inner).poll_write(cx, buf)))
    }
    fn flush(&mut self) -> io::Result<()> {
        let inner = &mut self.0;
        block_on(poll_fn(|cx| Pin::new(&mut *inner).poll_flush(cx)))
    }
}
