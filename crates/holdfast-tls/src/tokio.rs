//! TLS over the tokio flavour's [`holdfast::tokio::Conn`].

use std::collections::VecDeque;
use std::future::poll_fn;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

use holdfast::tokio::Conn;
use rustls::crypto::cipher::{
    InboundOpaqueMessage, MessageDecrypter, MessageEncrypter, OutboundChunks, OutboundPlainMessage,
};
use rustls::{ContentType, ProtocolVersion, ServerConfig, ServerConnection};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::keys::{self, Direction};
use crate::record::{self, alert, Saved, MAX_PLAINTEXT};

/// Ciphertext queued for the socket above which `poll_write` flushes before
/// it takes more plaintext.
const OUT_HIGH: usize = 64 * 1024;
/// The most plaintext one `poll_write` takes (a multiple of the record
/// size, so record boundaries depend only on the calls' buffers).
const WRITE_MAX: usize = 16 * MAX_PLAINTEXT;
/// This side updates its keys once it has sent this many records with
/// them (AES-GCM's limit is 2^24.5 records per key, RFC 8446 §5.5).
const UPDATE_TX_AFTER: u64 = 1 << 23;
/// How much ciphertext one read from the socket asks for.
const READ_CHUNK: usize = MAX_PLAINTEXT + 2048 + record::HEADER_LEN;

/// The state blob room left to the service: `holdfast::MAX_STATE` less the
/// TLS session's part.
pub const MAX_APP_STATE: usize = holdfast::MAX_STATE - record::MAX_SAVED;

/// The connection a [`TlsConn`] runs over: holdfast's tokio `Conn`, or the
/// blocking one (see [`crate::blocking`]). The same interface in
/// ciphertext terms.
pub trait Transport: AsyncRead + AsyncWrite + Unpin + Send {
    fn id(&self) -> Option<u64>;
    fn state(&self) -> (u16, &[u8]);
    fn recovered(&self) -> bool;
    fn replaying(&self) -> bool;
    fn poisoned(&self) -> bool;
    fn moved(&self) -> bool;
    fn record(&mut self, make: impl FnOnce() -> Vec<u8>) -> io::Result<Vec<u8>>;
    fn now(&mut self) -> io::Result<u64>;
    fn skip_output_check(&mut self);
    fn replay_policy(&mut self, policy: holdfast::ReplayPolicy) -> io::Result<()>;
    fn set_nodelay(&self, on: bool) -> io::Result<()>;
    fn peer_addr(&self) -> io::Result<SocketAddr>;
    fn commit(
        &mut self,
        consumed: usize,
        state: &[u8],
    ) -> impl std::future::Future<Output = io::Result<()>> + Send;
    fn commit_versioned(
        &mut self,
        consumed: usize,
        version: u16,
        state: &[u8],
    ) -> impl std::future::Future<Output = io::Result<()>> + Send;
    fn commit_and_close(
        &mut self,
        consumed: usize,
    ) -> impl std::future::Future<Output = io::Result<()>> + Send;
}

impl Transport for Conn {
    fn id(&self) -> Option<u64> {
        Conn::id(self)
    }
    fn state(&self) -> (u16, &[u8]) {
        Conn::state(self)
    }
    fn recovered(&self) -> bool {
        Conn::recovered(self)
    }
    fn replaying(&self) -> bool {
        Conn::replaying(self)
    }
    fn poisoned(&self) -> bool {
        Conn::poisoned(self)
    }
    fn moved(&self) -> bool {
        Conn::moved(self)
    }
    fn record(&mut self, make: impl FnOnce() -> Vec<u8>) -> io::Result<Vec<u8>> {
        Conn::record(self, make)
    }
    fn now(&mut self) -> io::Result<u64> {
        Conn::now(self)
    }
    fn skip_output_check(&mut self) {
        Conn::skip_output_check(self)
    }
    fn replay_policy(&mut self, policy: holdfast::ReplayPolicy) -> io::Result<()> {
        Conn::replay_policy(self, policy)
    }
    fn set_nodelay(&self, on: bool) -> io::Result<()> {
        Conn::set_nodelay(self, on)
    }
    fn peer_addr(&self) -> io::Result<SocketAddr> {
        Conn::peer_addr(self)
    }
    fn commit(
        &mut self,
        consumed: usize,
        state: &[u8],
    ) -> impl std::future::Future<Output = io::Result<()>> + Send {
        Conn::commit(self, consumed, state)
    }
    fn commit_versioned(
        &mut self,
        consumed: usize,
        version: u16,
        state: &[u8],
    ) -> impl std::future::Future<Output = io::Result<()>> + Send {
        Conn::commit_versioned(self, consumed, version, state)
    }
    fn commit_and_close(
        &mut self,
        consumed: usize,
    ) -> impl std::future::Future<Output = io::Result<()>> + Send {
        Conn::commit_and_close(self, consumed)
    }
}

/// Makes TLS connections out of holdfast connections.
#[derive(Clone)]
pub struct TlsAcceptor {
    config: Arc<ServerConfig>,
}

/// A handshake's clock: the time recorded for it.
#[derive(Debug)]
struct Clock(u64);

impl rustls::time_provider::TimeProvider for Clock {
    fn current_time(&self) -> Option<rustls_pki_types::UnixTime> {
        Some(rustls_pki_types::UnixTime::since_unix_epoch(
            std::time::Duration::from_secs(self.0),
        ))
    }
}

/// The traffic secrets of one handshake, handed over by rustls's `KeyLog`
/// hook (a fresh one per connection, so nothing is shared).
#[derive(Debug, Default)]
struct Secrets(Mutex<ClientServer>);

/// The client's and the server's traffic secret.
type ClientServer = (Option<Vec<u8>>, Option<Vec<u8>>);

impl rustls::KeyLog for Secrets {
    fn log(&self, label: &str, _client_random: &[u8], secret: &[u8]) {
        let Ok(mut s) = self.0.lock() else {
            return;
        };
        match label {
            "CLIENT_TRAFFIC_SECRET_0" => s.0 = Some(secret.to_vec()),
            "SERVER_TRAFFIC_SECRET_0" => s.1 = Some(secret.to_vec()),
            _ => {}
        }
    }

    fn will_log(&self, label: &str) -> bool {
        matches!(label, "CLIENT_TRAFFIC_SECRET_0" | "SERVER_TRAFFIC_SECRET_0")
    }
}

impl Drop for Secrets {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        if let Ok(s) = self.0.get_mut() {
            if let Some(v) = &mut s.0 {
                v.zeroize();
            }
            if let Some(v) = &mut s.1 {
                v.zeroize();
            }
        }
    }
}

fn err(kind: io::ErrorKind, msg: impl std::fmt::Display) -> io::Error {
    io::Error::new(kind, msg.to_string())
}

impl TlsAcceptor {
    /// An acceptor with `config`. Early data is turned off; session
    /// tickets stay on only with a stateless ticketer (a per-process
    /// session cache dies with its worker) — [`TlsAcceptor::from_pem`] uses
    /// [`crate::tickets::Tickets`], keyed by the service. Build `config`
    /// with [`crate::provider`] to offer only the TLS 1.3 suites the record
    /// layer runs.
    pub fn new(mut config: ServerConfig) -> TlsAcceptor {
        if !config.ticketer.enabled() {
            config.send_tls13_tickets = 0;
        }
        config.max_early_data_size = 0;
        config.send_half_rtt_data = false;
        TlsAcceptor {
            config: Arc::new(config),
        }
    }

    /// An acceptor for the PEM certificate chain and private key in these
    /// files, offering TLS 1.3 (kept across crashes) and TLS 1.2 (served).
    pub fn from_pem_files(
        cert: &std::path::Path,
        key: &std::path::Path,
        alpn: &[&[u8]],
    ) -> io::Result<TlsAcceptor> {
        let certs = std::fs::read(cert)?;
        let key = std::fs::read(key)?;
        TlsAcceptor::from_pem(&certs, &key, alpn)
    }

    /// [`TlsAcceptor::from_pem_files`] from bytes.
    pub fn from_pem(certs: &[u8], key: &[u8], alpn: &[&[u8]]) -> io::Result<TlsAcceptor> {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        let bad = |e: rustls_pki_types::pem::Error| err(io::ErrorKind::InvalidInput, e);
        let chain = CertificateDer::pem_slice_iter(certs)
            .collect::<Result<Vec<_>, _>>()
            .map_err(bad)?;
        if chain.is_empty() {
            return Err(err(io::ErrorKind::InvalidInput, "no certificate in PEM"));
        }
        let key = PrivateKeyDer::from_pem_slice(key).map_err(bad)?;
        let tickets = crate::tickets::Tickets::derived_from(key.secret_der());
        let mut config = ServerConfig::builder_with_provider(Arc::new(crate::provider()))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| err(io::ErrorKind::InvalidInput, e))?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| err(io::ErrorKind::InvalidInput, e))?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        config.ticketer = Arc::new(tickets);
        config.send_tls13_tickets = 2;
        Ok(TlsAcceptor::new(config))
    }

    /// Takes a connection up: a new one goes through the TLS handshake (its
    /// end is the connection's first commit); a recovered one continues its
    /// session from the state blob of its last commit. An error means the
    /// connection is unusable: drop it (it closes cleanly, unless it moved
    /// to a new version, see [`Conn::moved`]).
    pub async fn accept<C: Transport>(&self, conn: C) -> io::Result<TlsConn<C>> {
        let (version, blob) = conn.state();
        let saved = if blob.is_empty() {
            None
        } else {
            let (s, app) = Saved::decode(blob).ok_or_else(|| {
                err(
                    io::ErrorKind::InvalidData,
                    "state blob holds no TLS session",
                )
            })?;
            Some((s, version, app.to_vec()))
        };
        let mut t = TlsConn {
            conn,
            cin: Vec::new(),
            cin_pos: 0,
            c_proc: 0,
            cout: Vec::new(),
            cout_pos: 0,
            mode: Mode::Handshaking,
            app_version: version,
            app_state: Vec::new(),
            fatal: None,
            pending: None,
        };
        match saved {
            None => {
                if t.conn.recovered() {
                    tracing::info!(
                        conn = ?t.conn.id(),
                        "TLS handshake cut by a crash: replaying it from its recorded seed"
                    );
                }
                t.handshake(&self.config).await?;
            }
            Some((Saved::Opaque, _, _)) => {
                return Err(err(
                    io::ErrorKind::ConnectionAborted,
                    "a TLS 1.2 session cannot continue in another process; closing it",
                ));
            }
            Some((
                Saved::Tls13 {
                    suite,
                    rx_seq,
                    rx_skip,
                    tx_seq,
                    rx_secret,
                    tx_secret,
                },
                _,
                app,
            )) => {
                let suite = keys::suite(suite).ok_or_else(|| {
                    err(
                        io::ErrorKind::InvalidData,
                        "saved TLS session uses an unknown cipher suite",
                    )
                })?;
                t.mode = Mode::Rec(Box::new(Layer::new(
                    Direction::new(suite, &rx_secret, rx_seq),
                    Direction::new(suite, &tx_secret, tx_seq),
                    u64::from(rx_skip),
                )));
                t.app_state = app;
                tracing::debug!(
                    conn = ?t.conn.id(), rx_seq, rx_skip, tx_seq,
                    "TLS session continues from its journal"
                );
            }
        }
        Ok(t)
    }
}

/// One received record since the last commit point. Offsets are relative
/// to that point: `c*` in ciphertext, `p*` in plaintext coordinates (in
/// which the commit point is `Layer::p_commit`).
#[derive(Clone, Copy, Debug)]
struct RxRec {
    cstart: u64,
    cend: u64,
    pstart: u64,
    plen: u64,
    seq: u64,
    /// The rx key generation it was decrypted with.
    epoch: u64,
    data: bool,
    /// A KeyUpdate asking this side to update too.
    ku_request: bool,
}

/// A commit's plan: ciphertext consumed, the blob to store, and the cut
/// and plaintext position the record layer rebases on afterwards.
type Plan = (u64, Vec<u8>, Option<(Cut, u64)>);

/// Where a commit cuts the ciphertext stream.
#[derive(Clone, Copy, Debug)]
struct Cut {
    /// Ciphertext consumed.
    c: u64,
    /// Sequence number of the first record past the cut.
    seq: u64,
    /// Plaintext coordinate of that record's start.
    origin: u64,
    /// The rx key generation of that record.
    epoch: u64,
}

/// The record layer of a TLS 1.3 session.
struct Layer {
    rx: Direction,
    tx: Direction,
    dec: Box<dyn MessageDecrypter>,
    enc: Box<dyn MessageEncrypter>,
    recs: VecDeque<RxRec>,
    /// Sequence number of the first record past the commit point.
    base_seq: u64,
    /// rx traffic secrets since the commit point: generation
    /// `epoch_base + i` is `epochs[i]` (a KeyUpdate adds one).
    epochs: VecDeque<zeroize::Zeroizing<Vec<u8>>>,
    epoch_base: u64,
    /// Decrypted plaintext not yet read: `[p_read, p_end)`.
    plain: Vec<u8>,
    plain_pos: usize,
    p_read: u64,
    p_end: u64,
    p_commit: u64,
    /// The client sent close_notify.
    peer_closed: bool,
    /// This side sent close_notify or a fatal alert.
    tx_closed: bool,
}

impl Layer {
    fn new(rx: Direction, tx: Direction, skip: u64) -> Layer {
        Layer {
            dec: rx.decrypter(),
            enc: tx.encrypter(),
            base_seq: rx.seq,
            epochs: VecDeque::from([rx.secret.clone()]),
            epoch_base: 0,
            rx,
            tx,
            recs: VecDeque::new(),
            plain: Vec::new(),
            plain_pos: 0,
            p_read: skip,
            p_end: 0,
            p_commit: skip,
            peer_closed: false,
            tx_closed: false,
        }
    }

    /// Where a commit of plaintext up to coordinate `t` cuts the
    /// ciphertext: at the start of the record holding `t` (the next worker
    /// decrypts it again and skips `t - origin` bytes), or, when `t` is at
    /// a record boundary, right after the last data record before it — so
    /// records with no data (alerts) past the point are never consumed by
    /// a commit whose position does not depend on them having arrived.
    fn cut(&self, t: u64) -> Cut {
        let base = Cut {
            c: 0,
            seq: self.base_seq,
            origin: 0,
            epoch: self.epoch_base,
        };
        // A KeyUpdate right after `q` is not consumed: the next record is
        // still of `q`'s generation.
        let after = |q: &RxRec| Cut {
            c: q.cend,
            seq: q.seq + 1,
            origin: q.pstart + q.plen,
            epoch: q.epoch,
        };
        let mut last_data: Option<&RxRec> = None;
        // Empty data records count as records without data: whether one
        // had arrived must not move the cut either.
        for r in self.recs.iter().filter(|r| r.data && r.plen > 0) {
            if r.pstart + r.plen > t {
                if r.pstart < t {
                    return Cut {
                        c: r.cstart,
                        seq: r.seq,
                        origin: r.pstart,
                        epoch: r.epoch,
                    };
                }
                break;
            }
            last_data = Some(r);
        }
        match last_data {
            Some(q) => after(q),
            None => base,
        }
    }

    /// Forgets what lies before `cut`: offsets become relative to it.
    fn rebase(&mut self, cut: Cut, t: u64) {
        self.recs.retain(|r| r.cstart >= cut.c);
        for r in &mut self.recs {
            r.cstart -= cut.c;
            r.cend -= cut.c;
            r.pstart -= cut.origin;
        }
        self.p_read -= cut.origin;
        self.p_end -= cut.origin;
        self.p_commit = t - cut.origin;
        self.base_seq = cut.seq;
        while self.epoch_base < cut.epoch && self.epochs.len() > 1 {
            self.epochs.pop_front();
            self.epoch_base += 1;
        }
    }

    /// Whether a record consumed by `cut` asked this side to update its
    /// keys. The answer goes out at that commit: a point that depends on
    /// the input alone (not on when the record happened to be read), so a
    /// replay sends it at the same place in the output.
    fn update_requested_before(&self, cut: Cut) -> bool {
        self.recs.iter().any(|r| r.ku_request && r.cend <= cut.c)
    }

    /// Sends a KeyUpdate (update_not_requested) and moves to the next tx
    /// generation (RFC 8446 §4.6.3).
    fn send_key_update(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        self.seal(ContentType::Handshake, &[24, 0, 0, 1, 0], out)?;
        self.tx.update();
        self.enc = self.tx.encrypter();
        Ok(())
    }

    /// The rx secret of generation `epoch`.
    fn rx_secret(&self, epoch: u64) -> &[u8] {
        let i = usize::try_from(epoch.saturating_sub(self.epoch_base)).unwrap_or(usize::MAX);
        self.epochs
            .get(i)
            .or(self.epochs.back())
            .map(|s| &s[..])
            .unwrap_or_default()
    }

    fn saved(&self, cut: Cut, t: u64) -> Saved {
        Saved::Tls13 {
            suite: keys::suite_id(self.rx.suite),
            rx_seq: cut.seq,
            rx_skip: (t - cut.origin) as u16,
            tx_seq: self.tx.seq,
            rx_secret: self.rx_secret(cut.epoch).to_vec(),
            tx_secret: self.tx.secret.to_vec(),
        }
    }

    /// Encrypts `data` as records of type `typ` onto `out`.
    fn seal(&mut self, typ: ContentType, data: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
        for chunk in data.chunks(MAX_PLAINTEXT) {
            let m = OutboundPlainMessage {
                typ,
                version: ProtocolVersion::TLSv1_2,
                payload: OutboundChunks::Single(chunk),
            };
            let rec = self
                .enc
                .encrypt(m, self.tx.seq)
                .map_err(|e| err(io::ErrorKind::Other, e))?;
            self.tx.seq += 1;
            out.extend_from_slice(&rec.encode());
        }
        Ok(())
    }
}

enum Mode {
    Handshaking,
    /// TLS 1.3 on this crate's record layer: kept across crashes.
    Rec(Box<Layer>),
    /// rustls alone (TLS 1.2): served, but not kept across crashes.
    Opaque(Box<ServerConnection>),
}

/// A TLS connection: `AsyncRead`/`AsyncWrite` over plaintext, with the
/// commit interface of [`holdfast::tokio::Conn`] in plaintext terms.
///
/// Writes are taken whole (up to 256 KiB a call) and encrypted at once
/// into records of at most 16 KiB, so records depend only on what the
/// service writes, never on the socket's readiness: a worker replaying a
/// request after a crash produces the very same ciphertext, and holdfast
/// sends only what the client does not have yet.
pub struct TlsConn<C: Transport = Conn> {
    conn: C,
    /// Ciphertext read but not yet processed: `cin[cin_pos..]`.
    cin: Vec<u8>,
    cin_pos: usize,
    /// Ciphertext processed since the last commit point.
    c_proc: u64,
    /// Ciphertext not yet handed to the connection: `cout[cout_pos..]`.
    cout: Vec<u8>,
    cout_pos: usize,
    mode: Mode,
    app_version: u16,
    app_state: Vec<u8>,
    /// A fatal error: reported to every later call.
    fatal: Option<(io::ErrorKind, String)>,
    /// A commit begun by [`TlsConn::poll_commit`] and not yet done.
    pending: Option<PlannedCommit>,
}

/// A commit planned (its key update, if any, already queued): the
/// ciphertext it consumes, the whole blob, the cut.
type PlannedCommit = (u64, Vec<u8>, Option<(Cut, u64)>);

impl<C: Transport> TlsConn<C> {
    async fn handshake(&mut self, config: &Arc<ServerConfig>) -> io::Result<()> {
        // Every random value of the handshake comes from this seed,
        // recorded before anything is sent: a worker that takes the
        // connection over mid-handshake gets it back and answers the same
        // ClientHello with the same bytes (see `replay`).
        let seed = self.conn.record(|| crate::replay::new_seed().to_vec())?;
        let seed: [u8; 32] = seed.try_into().map_err(|_| {
            err(
                io::ErrorKind::InvalidData,
                "recorded TLS seed has another size",
            )
        })?;
        let mut drbg = crate::replay::Drbg::new(seed);
        // The clock too: it goes into session tickets and decides whether
        // one presented has expired.
        let now = self.conn.now()?;
        let secrets = Arc::new(Secrets::default());
        let mut cfg = (**config).clone();
        cfg.key_log = secrets.clone();
        cfg.time_provider = Arc::new(Clock(now));
        // For the record sequence numbers once the session tickets went out.
        cfg.enable_secret_extraction = true;
        let mut sc = drbg
            .enter(|| ServerConnection::new(Arc::new(cfg)))
            .map_err(|e| err(io::ErrorKind::Other, e))?;
        loop {
            while sc.wants_write() {
                sc.write_tls(&mut self.cout)?;
            }
            poll_fn(|cx| self.poll_flush_out(cx)).await?;
            if !sc.is_handshaking() {
                break;
            }
            let avail = &self.cin[self.cin_pos..];
            match record::next_record(avail, record::MAX_RECORD_ANY) {
                Ok(Some(h)) => {
                    // One record at a time: rustls must not see a byte
                    // past the handshake, which belongs to the record layer.
                    let mut rec = &avail[..h.total()];
                    while !rec.is_empty() {
                        sc.read_tls(&mut rec)?;
                    }
                    self.cin_pos += h.total();
                    self.c_proc += h.total() as u64;
                    self.compact_in();
                    if let Err(e) = drbg.enter(|| sc.process_new_packets()) {
                        return Err(self.handshake_failed(&mut sc, e).await);
                    }
                }
                Err(_) => {
                    // Not a record: rustls tells the client so.
                    let _ = sc.read_tls(&mut &avail[..]);
                    let e = match drbg.enter(|| sc.process_new_packets()) {
                        Err(e) => e,
                        Ok(_) => rustls::Error::General("bad record".into()),
                    };
                    return Err(self.handshake_failed(&mut sc, e).await);
                }
                Ok(None) => {
                    if poll_fn(|cx| self.poll_fill(cx)).await? == 0 {
                        return Err(err(
                            io::ErrorKind::UnexpectedEof,
                            "client closed the connection during the TLS handshake",
                        ));
                    }
                }
            }
        }
        let kept = sc.protocol_version() == Some(ProtocolVersion::TLSv1_3)
            && sc
                .negotiated_cipher_suite()
                .is_some_and(|s| keys::is_kept(s.suite()))
            && drbg
                .enter(|| sc.process_new_packets())
                .is_ok_and(|st| st.plaintext_bytes_to_read() == 0);
        let taken = secrets.0.lock().ok().map(|mut s| (s.0.take(), s.1.take()));
        let mut blob = Vec::new();
        match (
            kept,
            taken,
            sc.negotiated_cipher_suite().and_then(|s| s.tls13()),
        ) {
            (true, Some((Some(client), Some(server))), Some(suite)) => {
                // Session tickets went out under the server's first
                // traffic key: the sequence numbers say how many records.
                let ex = sc
                    .dangerous_extract_secrets()
                    .map_err(|e| err(io::ErrorKind::Other, e))?;
                let layer = Layer::new(
                    Direction::new(suite, &client, ex.rx.0),
                    Direction::new(suite, &server, ex.tx.0),
                    0,
                );
                layer.saved(layer.cut(0), 0).encode(&mut blob);
                self.mode = Mode::Rec(Box::new(layer));
            }
            _ => {
                Saved::Opaque.encode(&mut blob);
                self.mode = Mode::Opaque(Box::new(sc));
            }
        }
        // The handshake is the connection's first request.
        let consumed = std::mem::take(&mut self.c_proc);
        let consumed = usize::try_from(consumed).map_err(|e| err(io::ErrorKind::Other, e))?;
        self.conn.commit(consumed, &blob).await
    }

    async fn handshake_failed(&mut self, sc: &mut ServerConnection, e: rustls::Error) -> io::Error {
        // The alert rustls queued goes out before the connection closes.
        while sc.wants_write() {
            if sc.write_tls(&mut self.cout).is_err() {
                break;
            }
        }
        let _ = poll_fn(|cx| self.poll_flush_out(cx)).await;
        tracing::debug!(conn = ?self.conn.id(), error = %e, "TLS handshake failed");
        err(io::ErrorKind::InvalidData, e)
    }

    fn compact_in(&mut self) {
        if self.cin_pos == self.cin.len() {
            self.cin.clear();
            self.cin_pos = 0;
        } else if self.cin_pos > 64 * 1024 {
            self.cin.drain(..self.cin_pos);
            self.cin_pos = 0;
        }
    }

    /// Reads more ciphertext: `Ready(Ok(0))` at the end of input.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let len = self.cin.len();
        self.cin.resize(len + READ_CHUNK, 0);
        let mut rb = ReadBuf::new(&mut self.cin[len..]);
        let r = Pin::new(&mut self.conn).poll_read(cx, &mut rb);
        let n = rb.filled().len();
        self.cin.truncate(len + n);
        r.map_ok(|()| n)
    }

    /// Hands all queued ciphertext to the connection.
    fn poll_flush_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.cout_pos < self.cout.len() {
            let n = ready!(Pin::new(&mut self.conn).poll_write(cx, &self.cout[self.cout_pos..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.cout_pos += n;
        }
        self.cout.clear();
        self.cout_pos = 0;
        Poll::Ready(Ok(()))
    }

    fn fatal_err(&self) -> Option<io::Error> {
        self.fatal.as_ref().map(|(k, m)| err(*k, m))
    }

    /// A fatal error: sends `alert` (if any, and if this side can still
    /// send) and fails every later call.
    fn fail(&mut self, alert: Option<u8>, kind: io::ErrorKind, msg: String) {
        tracing::debug!(conn = ?self.conn.id(), error = %msg, "TLS connection fails");
        if let (Some(a), Mode::Rec(l)) = (alert, &mut self.mode) {
            if !l.tx_closed {
                l.tx_closed = true;
                let _ = l.seal(ContentType::Alert, &[2, a], &mut self.cout);
            }
        }
        if let (Some(_), Mode::Opaque(sc)) = (alert, &mut self.mode) {
            while sc.wants_write() {
                if sc.write_tls(&mut self.cout).is_err() {
                    break;
                }
            }
        }
        self.fatal = Some((kind, msg));
    }

    /// Decrypts and handles the next whole record in `cin`, if there is one.
    fn decode_one(&mut self) -> bool {
        let Mode::Rec(l) = &mut self.mode else {
            return false;
        };
        let avail = &mut self.cin[self.cin_pos..];
        let h = match record::next_record(avail, record::MAX_CIPHERTEXT_13) {
            Ok(Some(h)) => h,
            Ok(None) => return false,
            Err(bad) => {
                self.fail(
                    Some(bad.alert()),
                    io::ErrorKind::InvalidData,
                    bad.to_string(),
                );
                return true;
            }
        };
        if h.typ != record::APPLICATION_DATA {
            self.fail(
                Some(alert::UNEXPECTED_MESSAGE),
                io::ErrorKind::InvalidData,
                format!("unprotected record of type {} after the handshake", h.typ),
            );
            return true;
        }
        let seq = l.rx.seq;
        let msg = InboundOpaqueMessage::new(
            ContentType::ApplicationData,
            ProtocolVersion::TLSv1_2,
            &mut avail[record::HEADER_LEN..h.total()],
        );
        let plain = match l.dec.decrypt(msg, seq) {
            Ok(p) => p,
            Err(e) => {
                let a = match e {
                    rustls::Error::DecryptError => alert::BAD_RECORD_MAC,
                    rustls::Error::PeerSentOversizedRecord => alert::RECORD_OVERFLOW,
                    _ => alert::UNEXPECTED_MESSAGE,
                };
                self.fail(Some(a), io::ErrorKind::InvalidData, e.to_string());
                return true;
            }
        };
        l.rx.seq += 1;
        let cstart = self.c_proc;
        let mut rec = RxRec {
            cstart,
            cend: cstart + h.total() as u64,
            pstart: l.p_end,
            plen: 0,
            seq,
            epoch: l.epoch_base + l.epochs.len() as u64 - 1,
            data: false,
            ku_request: false,
        };
        let mut failure = None;
        match plain.typ {
            ContentType::ApplicationData if !l.peer_closed => {
                let payload = plain.payload;
                rec.data = true;
                rec.plen = payload.len() as u64;
                // After a recovery, the first record's first bytes were
                // consumed before the commit.
                let skip = l.p_read.saturating_sub(rec.pstart);
                if skip > rec.plen {
                    failure = Some((
                        alert::INTERNAL_ERROR,
                        io::ErrorKind::InvalidData,
                        "journaled TLS position lies past its record".to_owned(),
                    ));
                } else {
                    l.plain.extend_from_slice(&payload[skip as usize..]);
                    l.p_end = rec.pstart + rec.plen;
                }
            }
            ContentType::ApplicationData => {}
            ContentType::Alert => match plain.payload {
                [_, alert::CLOSE_NOTIFY] => l.peer_closed = true,
                [_, alert::USER_CANCELED] => {}
                [_, d] => {
                    failure = Some((
                        0,
                        io::ErrorKind::ConnectionAborted,
                        format!("client sent TLS alert {d}"),
                    ))
                }
                _ => {
                    failure = Some((
                        alert::DECODE_ERROR,
                        io::ErrorKind::InvalidData,
                        "malformed alert".to_owned(),
                    ))
                }
            },
            // A KeyUpdate, alone in its record (it must end one: RFC 8446
            // §5.1); the records after it are of the next generation.
            ContentType::Handshake => match plain.payload {
                [24, 0, 0, 1, req @ (0 | 1)] => {
                    rec.ku_request = *req == 1;
                    l.rx.update();
                    l.dec = l.rx.decrypter();
                    l.epochs.push_back(l.rx.secret.clone());
                }
                _ => {
                    failure = Some((
                        alert::UNEXPECTED_MESSAGE,
                        io::ErrorKind::InvalidData,
                        "unsupported post-handshake message".to_owned(),
                    ))
                }
            },
            t => {
                failure = Some((
                    alert::UNEXPECTED_MESSAGE,
                    io::ErrorKind::InvalidData,
                    format!("unsupported TLS message of type {t:?} after the handshake"),
                ))
            }
        }
        l.recs.push_back(rec);
        self.c_proc = rec.cend;
        self.cin_pos += h.total();
        self.compact_in();
        if let Some((a, kind, msg)) = failure {
            self.fail((a != 0).then_some(a), kind, msg);
        }
        true
    }

    fn poll_read_rec(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if let Some(e) = self.fatal_err() {
                let _ = ready!(self.poll_flush_out(cx));
                return Poll::Ready(Err(e));
            }
            let Mode::Rec(l) = &mut self.mode else {
                return Poll::Ready(Ok(()));
            };
            if l.plain_pos < l.plain.len() {
                let n = buf.remaining().min(l.plain.len() - l.plain_pos);
                buf.put_slice(&l.plain[l.plain_pos..l.plain_pos + n]);
                l.plain_pos += n;
                l.p_read += n as u64;
                if l.plain_pos == l.plain.len() {
                    l.plain.clear();
                    l.plain_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if l.peer_closed {
                return Poll::Ready(Ok(()));
            }
            if self.decode_one() {
                continue;
            }
            if ready!(self.poll_fill(cx))? == 0 {
                if self.cin_pos < self.cin.len() {
                    self.fail(
                        None,
                        io::ErrorKind::UnexpectedEof,
                        "connection closed inside a TLS record".to_owned(),
                    );
                    continue;
                }
                // A client that closes without close_notify: the end of
                // input all the same (most HTTP clients do this).
                return Poll::Ready(Ok(()));
            }
        }
    }

    fn poll_read_opaque(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if let Some(e) = self.fatal_err() {
                let _ = ready!(self.poll_flush_out(cx));
                return Poll::Ready(Err(e));
            }
            let Mode::Opaque(sc) = &mut self.mode else {
                return Poll::Ready(Ok(()));
            };
            match sc.reader().read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
            if self.cin_pos < self.cin.len() {
                let n = sc.read_tls(&mut &self.cin[self.cin_pos..])?;
                self.cin_pos += n;
                self.c_proc += n as u64;
                let r = sc.process_new_packets();
                while sc.wants_write() {
                    sc.write_tls(&mut self.cout)?;
                }
                self.compact_in();
                if let Err(e) = r {
                    self.fail(Some(0), io::ErrorKind::InvalidData, e.to_string());
                }
                continue;
            }
            if ready!(self.poll_fill(cx))? == 0 {
                return Poll::Ready(Ok(()));
            }
        }
    }

    /// Computes the cut of a commit of `consumed` plaintext bytes and the
    /// blob to store: (ciphertext consumed, blob, cut for the rebase).
    fn plan_commit(&mut self, consumed: usize, state: &[u8]) -> io::Result<Plan> {
        if let Some(e) = self.fatal_err() {
            return Err(e);
        }
        if state.len() > MAX_APP_STATE {
            return Err(err(
                io::ErrorKind::InvalidInput,
                format!("state blob over {MAX_APP_STATE} bytes (TLS keeps the rest)"),
            ));
        }
        let mut blob = Vec::with_capacity(record::MAX_SAVED + state.len());
        let r = match &mut self.mode {
            Mode::Rec(l) => {
                let t = l.p_commit + consumed as u64;
                if t > l.p_read {
                    return Err(err(
                        io::ErrorKind::InvalidInput,
                        "commit of more input than was read",
                    ));
                }
                let cut = l.cut(t);
                // Key updates happen at commits, where they depend on the
                // input alone: the client asked for one in a record this
                // commit consumes, or this side's sequence numbers are
                // nearing AES-GCM's limit.
                if !l.tx_closed && (l.update_requested_before(cut) || l.tx.seq >= UPDATE_TX_AFTER) {
                    l.send_key_update(&mut self.cout)?;
                }
                l.saved(cut, t).encode(&mut blob);
                (cut.c, Some((cut, t)))
            }
            Mode::Opaque(_) => {
                Saved::Opaque.encode(&mut blob);
                (self.c_proc, None)
            }
            Mode::Handshaking => return Err(err(io::ErrorKind::Other, "handshake not done")),
        };
        blob.extend_from_slice(state);
        Ok((r.0, blob, r.1))
    }

    fn after_commit(&mut self, c: u64, cut: Option<(Cut, u64)>) {
        self.c_proc -= c;
        if let (Mode::Rec(l), Some((cut, t))) = (&mut self.mode, cut) {
            l.rebase(cut, t);
        }
    }

    /// Ends a request: `consumed` more plaintext bytes are done with, the
    /// output so far is their answer, and `state` (at most
    /// [`MAX_APP_STATE`] bytes) is what a new worker needs to carry on. The
    /// TLS session's own state goes into the same journal record.
    pub async fn commit(&mut self, consumed: usize, state: &[u8]) -> io::Result<()> {
        let (c, blob, cut) = self.plan_commit(consumed, state)?;
        poll_fn(|cx| self.poll_flush_out(cx)).await?;
        self.conn.commit(to_usize(c)?, &blob).await?;
        self.after_commit(c, cut);
        self.app_state = state.to_vec();
        // The version the commit saved under: the service's current one.
        self.app_version = self.conn.state().0;
        Ok(())
    }

    /// [`TlsConn::commit`] with an explicit state schema version.
    pub async fn commit_versioned(
        &mut self,
        consumed: usize,
        version: u16,
        state: &[u8],
    ) -> io::Result<()> {
        let (c, blob, cut) = self.plan_commit(consumed, state)?;
        poll_fn(|cx| self.poll_flush_out(cx)).await?;
        self.conn
            .commit_versioned(to_usize(c)?, version, &blob)
            .await?;
        self.after_commit(c, cut);
        self.app_state = state.to_vec();
        self.app_version = version;
        Ok(())
    }

    /// Commits the last request and closes the connection with a
    /// close_notify.
    pub async fn commit_and_close(&mut self, consumed: usize) -> io::Result<()> {
        let (c, _, _) = self.plan_commit(consumed, &[])?;
        self.close_notify()?;
        poll_fn(|cx| self.poll_flush_out(cx)).await?;
        self.conn.commit_and_close(to_usize(c)?).await
    }

    fn close_notify(&mut self) -> io::Result<()> {
        match &mut self.mode {
            Mode::Rec(l) if !l.tx_closed => {
                l.tx_closed = true;
                l.seal(
                    ContentType::Alert,
                    &[1, alert::CLOSE_NOTIFY],
                    &mut self.cout,
                )
            }
            Mode::Opaque(sc) => {
                sc.send_close_notify();
                while sc.wants_write() {
                    sc.write_tls(&mut self.cout)?;
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// The service's part of the state blob saved by the last commit.
    pub fn state(&self) -> (u16, &[u8]) {
        (self.app_version, &self.app_state)
    }

    /// Whether the session runs on the journaled record layer (TLS 1.3),
    /// so it survives the worker; `false` for TLS 1.2, which is served but
    /// closed if its worker dies.
    pub fn kept_session(&self) -> bool {
        matches!(self.mode, Mode::Rec(_))
    }

    /// The negotiated protocol version.
    pub fn protocol(&self) -> &'static str {
        match self.mode {
            Mode::Rec(_) => "TLSv1.3",
            Mode::Opaque(ref sc) => match sc.protocol_version() {
                Some(ProtocolVersion::TLSv1_3) => "TLSv1.3",
                Some(ProtocolVersion::TLSv1_2) => "TLSv1.2",
                _ => "?",
            },
            Mode::Handshaking => "?",
        }
    }

    /// The underlying connection.
    pub fn get_ref(&self) -> &C {
        &self.conn
    }

    /// The underlying connection, for the calls not repeated here (held
    /// channels). Reading or writing it directly breaks the session.
    pub fn get_mut(&mut self) -> &mut C {
        &mut self.conn
    }

    pub fn recovered(&self) -> bool {
        self.conn.recovered()
    }
    pub fn replaying(&self) -> bool {
        self.conn.replaying()
    }
    pub fn poisoned(&self) -> bool {
        self.conn.poisoned()
    }
    pub fn moved(&self) -> bool {
        self.conn.moved()
    }
    pub fn id(&self) -> Option<u64> {
        self.conn.id()
    }
    pub fn record(&mut self, make: impl FnOnce() -> Vec<u8>) -> io::Result<Vec<u8>> {
        self.conn.record(make)
    }
    pub fn now(&mut self) -> io::Result<u64> {
        self.conn.now()
    }
    pub fn skip_output_check(&mut self) {
        self.conn.skip_output_check()
    }
    pub fn replay_policy(&mut self, policy: holdfast::ReplayPolicy) -> io::Result<()> {
        self.conn.replay_policy(policy)
    }
    pub fn set_nodelay(&self, on: bool) -> io::Result<()> {
        self.conn.set_nodelay(on)
    }
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.conn.peer_addr()
    }
}

impl TlsConn<Conn> {
    /// For adapters that record their own choices; see
    /// [`holdfast::tokio::Conn::replayed`].
    pub fn replayed(&mut self) -> io::Result<Option<Vec<u8>>> {
        self.conn.replayed()
    }

    /// [`TlsConn::commit`] for code driven by `poll_*` (an adapter's I/O
    /// object, see [`holdfast::tokio::Conn::poll_commit`]): call again with
    /// the same arguments after `Pending`. The commit is planned at the
    /// first call (a key update it brings is queued then), so the
    /// connection must not be written between the calls.
    pub fn poll_commit(
        &mut self,
        cx: &mut Context<'_>,
        consumed: usize,
        state: &[u8],
    ) -> Poll<io::Result<()>> {
        if self.pending.is_none() {
            self.pending = Some(self.plan_commit(consumed, state)?);
        }
        ready!(self.poll_flush_out(cx))?;
        let Some((c, blob, _)) = &self.pending else {
            return Poll::Ready(Err(err(io::ErrorKind::Other, "no commit planned")));
        };
        ready!(self.conn.poll_commit(cx, to_usize(*c)?, blob))?;
        if let Some((c, _, cut)) = self.pending.take() {
            self.after_commit(c, cut);
        }
        self.app_state = state.to_vec();
        self.app_version = self.conn.state().0;
        Poll::Ready(Ok(()))
    }
}

fn to_usize(c: u64) -> io::Result<usize> {
    usize::try_from(c).map_err(|e| err(io::ErrorKind::Other, e))
}

impl<C: Transport> AsyncRead for TlsConn<C> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // Output the service wrote goes out before it waits for input (a
        // plain connection would have sent it at the write).
        ready!(this.poll_flush_out(cx))?;
        match this.mode {
            Mode::Rec(_) => this.poll_read_rec(cx, buf),
            Mode::Opaque(_) => this.poll_read_opaque(cx, buf),
            Mode::Handshaking => Poll::Ready(Err(err(io::ErrorKind::Other, "handshake not done"))),
        }
    }
}

impl<C: Transport> AsyncWrite for TlsConn<C> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(e) = this.fatal_err() {
            return Poll::Ready(Err(e));
        }
        // Backpressure before taking anything: how much a call takes never
        // depends on the socket.
        if this.cout.len() - this.cout_pos >= OUT_HIGH {
            ready!(this.poll_flush_out(cx))?;
        }
        let n = buf.len().min(WRITE_MAX);
        match &mut this.mode {
            Mode::Rec(l) => {
                if l.tx_closed {
                    return Poll::Ready(Err(err(
                        io::ErrorKind::BrokenPipe,
                        "TLS connection closed for writing",
                    )));
                }
                l.seal(ContentType::ApplicationData, &buf[..n], &mut this.cout)?;
            }
            Mode::Opaque(sc) => {
                let n = sc.writer().write(&buf[..n])?;
                while sc.wants_write() {
                    sc.write_tls(&mut this.cout)?;
                }
                if let Poll::Ready(Err(e)) = this.poll_flush_out(cx) {
                    return Poll::Ready(Err(e));
                }
                return Poll::Ready(Ok(n));
            }
            Mode::Handshaking => {
                return Poll::Ready(Err(err(io::ErrorKind::Other, "handshake not done")))
            }
        }
        // Out now if the socket takes it; else with the next call.
        if let Poll::Ready(Err(e)) = this.poll_flush_out(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_flush_out(cx))?;
        Pin::new(&mut this.conn).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.fatal.is_none() {
            this.close_notify()?;
        }
        ready!(this.poll_flush_out(cx))?;
        Pin::new(&mut this.conn).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(skip: u64) -> Layer {
        let s = keys::suite(0x1302).unwrap();
        Layer::new(
            Direction::new(s, &[1; 48], 5),
            Direction::new(s, &[2; 48], 0),
            skip,
        )
    }

    /// Records of (ciphertext length, plaintext length or None for an
    /// alert), from sequence number 5.
    fn feed(l: &mut Layer, recs: &[(u64, Option<u64>)]) {
        let (mut c, mut seq) = (0, 5);
        for &(clen, plen) in recs {
            l.recs.push_back(RxRec {
                cstart: c,
                cend: c + clen,
                pstart: l.p_end,
                plen: plen.unwrap_or(0),
                seq,
                epoch: 0,
                data: plen.is_some(),
                ku_request: false,
            });
            l.p_end += plen.unwrap_or(0);
            c += clen;
            seq += 1;
        }
        l.p_read = l.p_end;
    }

    fn cut(l: &Layer, t: u64) -> (u64, u64, u64) {
        let c = l.cut(t);
        (c.c, c.seq, t - c.origin)
    }

    #[test]
    fn commits_cut_at_the_record_holding_the_point() {
        let mut l = layer(0);
        feed(
            &mut l,
            &[(30, Some(10)), (40, Some(20)), (10, None), (25, Some(5))],
        );
        // Nothing consumed: the commit point itself.
        assert_eq!(cut(&l, 0), (0, 5, 0));
        // Inside the first record: start of it, offset 4.
        assert_eq!(cut(&l, 4), (0, 5, 4));
        // At the boundary: right after the first record.
        assert_eq!(cut(&l, 10), (30, 6, 0));
        assert_eq!(cut(&l, 29), (30, 6, 19));
        // At the end of the second record: after it, the alert not consumed.
        assert_eq!(cut(&l, 30), (70, 7, 0));
        assert_eq!(cut(&l, 31), (80, 8, 1));
        assert_eq!(cut(&l, 35), (105, 9, 0));
    }

    #[test]
    fn a_recovered_layer_skips_what_was_committed() {
        // Recovered at offset 7 of a record.
        let mut l = layer(7);
        assert_eq!(cut(&l, 7), (0, 5, 7));
        feed(&mut l, &[(30, Some(10)), (30, Some(10))]);
        assert_eq!(cut(&l, 7), (0, 5, 7));
        assert_eq!(cut(&l, 9), (0, 5, 9));
        assert_eq!(cut(&l, 12), (30, 6, 2));
        let c = l.cut(12);
        l.rebase(c, 12);
        assert_eq!((l.p_commit, l.base_seq, l.recs.len()), (2, 6, 1));
        assert_eq!(cut(&l, 10), (30, 7, 0));
    }

    #[test]
    fn a_key_update_is_consumed_only_by_a_commit_past_it() {
        let mut l = layer(0);
        let rec = |cstart, pstart, plen, seq, epoch, data, ku| RxRec {
            cstart,
            cend: cstart + 10,
            pstart,
            plen,
            seq,
            epoch,
            data,
            ku_request: ku,
        };
        // data (gen 0, seq 5), KeyUpdate (gen 0, seq 6), data (gen 1, seq 0).
        l.recs.push_back(rec(0, 0, 4, 5, 0, true, false));
        l.recs.push_back(rec(10, 4, 0, 6, 0, false, true));
        l.recs.push_back(rec(20, 4, 4, 0, 1, true, false));
        l.epochs.push_back(zeroize::Zeroizing::new(vec![9; 48]));
        l.p_end = 8;
        l.p_read = 8;
        // At the boundary before the second data record: the KeyUpdate
        // stays unconsumed, the next record is generation 0's seq 6.
        let c = l.cut(4);
        assert_eq!((c.c, c.seq, c.epoch), (10, 6, 0));
        assert!(!l.update_requested_before(c));
        assert_eq!(l.rx_secret(c.epoch), &[1; 48][..]);
        // Inside it: consumed, generation 1 from seq 0.
        let c = l.cut(6);
        assert_eq!((c.c, c.seq, c.epoch), (20, 0, 1));
        assert!(l.update_requested_before(c));
        assert_eq!(l.rx_secret(c.epoch), &[9; 48][..]);
        l.rebase(c, 6);
        assert_eq!((l.epoch_base, l.epochs.len(), l.recs.len()), (1, 1, 1));
        assert_eq!(l.rx_secret(l.cut(8).epoch), &[9; 48][..]);
    }

    proptest::proptest! {
        /// Where a commit cuts depends only on the records up to its
        /// point: the same commit with more records arrived after it (data,
        /// alerts, KeyUpdates) cuts at the same place, with the same
        /// sequence number, generation and offset. That is what makes a
        /// replayed commit journal the same thing.
        #[test]
        fn a_cut_does_not_depend_on_later_records(
            kinds in proptest::collection::vec((0u8..4, 0u64..40), 1..24),
            pick in 0usize..1000,
        ) {
            // kind 0-1: data of the given length, 2: alert, 3: KeyUpdate.
            let mut all = layer(0);
            let (mut c, mut seq, mut epoch) = (0u64, 5u64, 0u64);
            for &(k, len) in &kinds {
                let data = k < 2;
                all.recs.push_back(RxRec {
                    cstart: c,
                    cend: c + 30,
                    pstart: all.p_end,
                    plen: if data { len } else { 0 },
                    seq,
                    epoch,
                    data,
                    ku_request: k == 3,
                });
                all.p_end += if data { len } else { 0 };
                c += 30;
                seq += 1;
                if k == 3 {
                    epoch += 1;
                    seq = 0;
                    all.epochs.push_back(zeroize::Zeroizing::new(vec![epoch as u8; 48]));
                }
            }
            all.p_read = all.p_end;
            // Every prefix of the records, and every point it covers.
            for m in 0..=all.recs.len() {
                let mut some = layer(0);
                some.recs = all.recs.iter().take(m).copied().collect();
                some.epochs = all.epochs.clone();
                some.p_end = some.recs.back().map_or(0, |r| r.pstart + r.plen);
                some.p_read = some.p_end;
                let t = (pick as u64) % (some.p_end + 1);
                let (a, b) = (some.cut(t), all.cut(t));
                proptest::prop_assert_eq!((a.c, a.seq, a.origin, a.epoch), (b.c, b.seq, b.origin, b.epoch));
                proptest::prop_assert!(b.origin <= t && t - b.origin <= 40);
                proptest::prop_assert!(b.c <= c);
                proptest::prop_assert_eq!(
                    some.update_requested_before(a),
                    all.update_requested_before(b)
                );
            }
        }
    }
}
