//! The control connection: read a command line, answer it, commit.
//!
//! Each command runs between two commits. Its input is peeked (holdfast
//! keeps it in the kernel until the commit), its reply written, and then
//! `commit(line, session)` says the line is done and saves the session
//! blob. A command cut off by a crash is read and run again by the next
//! worker, whose reply must be the same bytes: replies therefore depend
//! only on the session, the command and the file system.
//!
//! A command that changes the file system (`DELE`, `MKD`, `RMD`, `RNTO`)
//! would fail on its own side effect if replayed (the file is gone
//! already). So once its checks pass it commits the session with
//! `effect_started` set — output so far final, its line still uncommitted —
//! before it touches anything; a replay that finds the flag takes "already
//! gone" (or "already there", for `MKD`) as the success of the first run,
//! and answers the same.

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;

use holdfast::Conn;

use crate::config::Config;
use crate::data::DataChannel;
use crate::listing;
use crate::proto::{self, reply, BadLine, MAX_LINE};
use crate::session::{DataMode, Direction, Login, Session, Transfer, MAX_USER};
use crate::vfs;

/// Every command this server knows.
const COMMANDS: &[&str] = &[
    "ABOR", "ALLO", "APPE", "CDUP", "CWD", "DELE", "EPRT", "EPSV", "FEAT", "HELP", "LIST", "MDTM",
    "MKD", "MLSD", "MLST", "MODE", "NLST", "NOOP", "OPTS", "PASS", "PASV", "PORT", "PWD", "QUIT",
    "REST", "RETR", "RMD", "RNFR", "RNTO", "SIZE", "STOR", "STRU", "SYST", "TYPE", "USER", "XCUP",
    "XCWD", "XMKD", "XPWD", "XRMD",
];

/// Commands allowed before login.
const BEFORE_LOGIN: &[&str] = &[
    "FEAT", "HELP", "NOOP", "OPTS", "PASS", "QUIT", "SYST", "USER",
];

const FEATURES: &str =
    "211-Features:\r\n EPRT\r\n EPSV\r\n MDTM\r\n MLST type*;size*;modify*;perm*;\r\n \
                        PASV\r\n REST STREAM\r\n SIZE\r\n TVFS\r\n UTF8\r\n211 End\r\n";

/// What the command loop does after a command has answered.
enum Flow {
    /// Commit the line.
    Done,
    /// Commit the line and close the connection (`QUIT`).
    Quit,
    /// `150` sent: commit the line with the transfer in the session, then
    /// run it (a new worker continues it from the session).
    Transfer(Transfer),
    /// `150` sent: send this listing, then commit the line.
    Listing(Vec<u8>),
}

/// Why a file-system change failed, in words that do not depend on the
/// run (no errno text).
fn why(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::NotFound => "no such file or directory",
        io::ErrorKind::PermissionDenied => "permission denied",
        io::ErrorKind::AlreadyExists => "already exists",
        io::ErrorKind::DirectoryNotEmpty => "directory not empty",
        io::ErrorKind::NotADirectory => "not a directory",
        io::ErrorKind::IsADirectory => "is a directory",
        _ => "failed",
    }
}

/// One control connection and everything it owns.
pub struct Control<'a> {
    pub(crate) conn: Conn,
    pub(crate) cfg: &'a Config,
    pub(crate) s: Session,
    pub(crate) data: DataChannel,
    /// Input peeked since the last commit.
    pub(crate) input: Vec<u8>,
    pub(crate) eof: bool,
    /// Control input the transfer's `ABOR` watch has seen (see
    /// `Control::abort_requested`).
    pub(crate) watch: crate::transfer::Watch,
    peer: SocketAddr,
    local: SocketAddr,
}

/// Serves one control connection, new or taken over from a dead worker,
/// until the client leaves.
pub fn serve(mut conn: Conn, cfg: &Config) -> io::Result<()> {
    // Replies are small and often two in a row (150, then 226): without
    // NODELAY the second waits for the client's delayed ACK (~40 ms).
    conn.set_nodelay(true)?;
    let peer = canonical(conn.peer_addr()?);
    let local = rustix::net::getsockname(conn.as_fd())
        .ok()
        .and_then(|a| SocketAddr::try_from(a).ok())
        .map(canonical)
        .ok_or_else(|| io::Error::other("no local address"))?;
    let (version, blob) = conn.state();
    let fresh = blob.is_empty();
    let session = if fresh {
        Some(Session::default())
    } else {
        Session::decode(version, blob)
    };
    let Some(s) = session else {
        tracing::warn!(%peer, version, "unreadable session state; closing");
        conn.write_all(reply(421, "Session state unreadable, closing.").as_bytes())?;
        return conn.commit_and_close(0);
    };
    if conn.recovered() {
        tracing::info!(%peer, cwd = %s.cwd, transfer = ?s.transfer, "session recovered");
    }
    let data = DataChannel::recover(&mut conn, &s);
    let mut c = Control {
        conn,
        cfg,
        s,
        data,
        input: Vec::new(),
        eof: false,
        watch: Default::default(),
        peer,
        local,
    };
    c.run(fresh)
}

/// IPv4-mapped IPv6 addresses as IPv4 (a dual-stack listener's clients).
fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

impl Control<'_> {
    fn run(&mut self, fresh: bool) -> io::Result<()> {
        if fresh {
            self.send(&reply(220, "hf-ftpd ready."))?;
            self.commit(0)?;
        } else {
            // A finished data connection the dead worker had not released.
            self.data.after_commit(&mut self.conn);
        }
        if let Some(t) = self.s.transfer.clone() {
            self.transfer(&t, true)?;
        }
        while let Some((line, used)) = self.next_line()? {
            match self.execute(&line)? {
                Flow::Done => self.commit(used)?,
                Flow::Quit => return self.conn.commit_and_close(used),
                Flow::Transfer(t) => {
                    self.s.transfer = Some(t.clone());
                    self.commit(used)?;
                    self.transfer(&t, false)?;
                }
                Flow::Listing(bytes) => {
                    let outcome = self.send_listing(&bytes, used)?;
                    self.end_transfer(outcome, used)?;
                }
            }
        }
        Ok(())
    }

    pub(crate) fn send(&mut self, text: &str) -> io::Result<()> {
        self.conn.write_all(text.as_bytes())
    }

    /// Commits `consumed` input bytes with the session as it is now.
    pub(crate) fn commit(&mut self, consumed: usize) -> io::Result<()> {
        self.conn.commit(consumed, &self.s.encode())?;
        self.input.drain(..consumed.min(self.input.len()));
        self.data.after_commit(&mut self.conn);
        Ok(())
    }

    /// The next command line and the input bytes it takes; `None` once the
    /// client has closed. Overlong lines are answered `500` and skipped
    /// (committed piece by piece, the session remembering that the rest of
    /// the line is to be skipped too); empty lines are skipped silently.
    fn next_line(&mut self) -> io::Result<Option<(Vec<u8>, usize)>> {
        let mut chunk = [0u8; 4096];
        loop {
            if let Some((line, used)) = proto::next_line(&self.input) {
                if std::mem::take(&mut self.s.discarding) || line.is_empty() {
                    self.commit(used)?;
                    continue;
                }
                if line.len() > MAX_LINE {
                    self.send(&reply(500, "Command line too long."))?;
                    self.commit(used)?;
                    continue;
                }
                return Ok(Some((line.to_vec(), used)));
            }
            if self.input.len() > MAX_LINE {
                if !self.s.discarding {
                    self.send(&reply(500, "Command line too long."))?;
                    self.s.discarding = true;
                }
                self.commit(self.input.len())?;
                continue;
            }
            if self.eof {
                return Ok(None);
            }
            let n = self.conn.read(&mut chunk)?;
            if n == 0 {
                self.eof = true;
            }
            self.input.extend_from_slice(&chunk[..n]);
        }
    }

    fn answer(&mut self, code: u16, text: &str) -> io::Result<Flow> {
        self.send(&reply(code, text))?;
        Ok(Flow::Done)
    }

    fn may_write(&self) -> bool {
        match self.s.login {
            Login::User(_) => true,
            Login::Anonymous => self.cfg.anonymous_write,
            Login::Out | Login::Named(_) => false,
        }
    }

    /// Runs a file-system change `op` whose `check` passed, so that a
    /// replay answers like the first run (see the module docs): an error
    /// of kind `done_if` in a replay is the first run's success.
    fn effect(
        &mut self,
        check: io::Result<()>,
        done_if: io::ErrorKind,
        op: impl FnOnce() -> io::Result<()>,
    ) -> io::Result<io::Result<()>> {
        let replay = self.s.effect_started;
        if !replay {
            if let Err(e) = check {
                return Ok(Err(e));
            }
            self.s.effect_started = true;
            self.commit(0)?;
        }
        let r = op();
        self.s.effect_started = false;
        Ok(match r {
            Err(e) if replay && e.kind() == done_if => Ok(()),
            r => r,
        })
    }

    fn execute(&mut self, line: &[u8]) -> io::Result<Flow> {
        if self.conn.poisoned() {
            tracing::warn!("refusing a command that crashed the server twice");
            return self.answer(451, "Requested action aborted: local error in processing.");
        }
        let cmd = match proto::parse(line) {
            Ok(c) => c,
            Err(BadLine::NotUtf8) => return self.answer(501, "Command line is not UTF-8."),
            Err(BadLine::NoVerb) => return self.answer(500, "Syntax error, command unrecognized."),
        };
        let (verb, arg) = (cmd.verb.as_str(), cmd.arg);
        tracing::debug!(verb, "command");
        // RNTO must come right after RNFR. (RNTO clears it itself, after
        // its change: a replay must find it where the first run did.)
        let rnfr = if verb == "RNTO" {
            self.s.rnfr.clone()
        } else {
            self.s.rnfr.take()
        };
        if !COMMANDS.contains(&verb) {
            return self.answer(502, "Command not implemented.");
        }
        if !self.s.logged_in() && !BEFORE_LOGIN.contains(&verb) {
            return self.answer(530, "Please login with USER and PASS.");
        }
        match verb {
            "USER" => self.user(arg),
            "PASS" => self.pass(arg),
            "QUIT" => {
                self.send(&reply(221, "Goodbye."))?;
                Ok(Flow::Quit)
            }
            "NOOP" => self.answer(200, "NOOP ok."),
            "SYST" => self.answer(215, "UNIX Type: L8"),
            "FEAT" => {
                self.send(FEATURES)?;
                Ok(Flow::Done)
            }
            "HELP" => self.answer(214, &format!("Commands: {}.", COMMANDS.join(" "))),
            "OPTS" => match arg.to_ascii_uppercase().trim() {
                "UTF8 ON" | "UTF-8 ON" => self.answer(200, "Always in UTF8 mode."),
                _ => self.answer(501, "Option not understood."),
            },
            "PWD" | "XPWD" => {
                let text = format!("{} is the current directory", proto::quote(&self.s.cwd));
                self.answer(257, &text)
            }
            "CWD" | "XCWD" => self.cwd(arg),
            "CDUP" | "XCUP" => self.cwd(".."),
            "TYPE" => match arg.to_ascii_uppercase().trim() {
                "I" | "L 8" | "L8" => {
                    self.s.binary = true;
                    self.answer(200, "Switching to Binary mode.")
                }
                "A" | "A N" => {
                    self.s.binary = false;
                    self.answer(200, "Switching to ASCII mode.")
                }
                "" => self.answer(501, "TYPE needs an argument."),
                _ => self.answer(504, "Unsupported type."),
            },
            "MODE" => self.only(arg, "S", "Mode set to S."),
            "STRU" => self.only(arg, "F", "Structure set to F."),
            "ALLO" => self.answer(202, "ALLO command ignored."),
            "PASV" => self.pasv(false, arg),
            "EPSV" => self.pasv(true, arg),
            "PORT" => self.port(proto::parse_port(arg)),
            "EPRT" => self.port(proto::parse_eprt(arg)),
            "REST" => match arg.trim().parse::<u64>() {
                Ok(n) => {
                    self.s.rest = n;
                    self.answer(350, &format!("Restart position accepted ({n})."))
                }
                Err(_) => self.answer(501, "REST needs a byte offset."),
            },
            "RETR" => self.retr(arg),
            "STOR" => self.store(arg, false),
            "APPE" => self.store(arg, true),
            "LIST" | "NLST" | "MLSD" => self.list(verb, arg),
            "MLST" => self.mlst(arg),
            "SIZE" | "MDTM" => self.stat(verb, arg),
            "DELE" => self.remove(arg, false),
            "RMD" | "XRMD" => self.remove(arg, true),
            "MKD" | "XMKD" => self.mkd(arg),
            "RNFR" => self.rnfr(arg),
            "RNTO" => self.rnto(rnfr, arg),
            "ABOR" => {
                self.data.drop_listener(&mut self.conn);
                self.data.close();
                self.s.data = DataMode::None;
                self.s.data_open = false;
                self.answer(225, "No transfer to ABOR.")
            }
            _ => self.answer(502, "Command not implemented."),
        }
    }

    fn only(&mut self, arg: &str, want: &str, ok: &str) -> io::Result<Flow> {
        match arg.trim() {
            "" => self.answer(501, "Missing argument."),
            a if a.eq_ignore_ascii_case(want) => self.answer(200, ok),
            _ => self.answer(504, "Unsupported parameter."),
        }
    }

    fn user(&mut self, name: &str) -> io::Result<Flow> {
        let name = name.trim();
        if name.is_empty() || name.len() > MAX_USER {
            return self.answer(501, "USER needs a name of at most 64 bytes.");
        }
        self.s.login = Login::Named(name.to_owned());
        self.s.cwd = "/".to_owned();
        if self.cfg.is_anonymous(name) {
            self.answer(
                331,
                "Anonymous login ok, send your e-mail address as password.",
            )
        } else {
            self.answer(331, "Please specify the password.")
        }
    }

    fn pass(&mut self, password: &str) -> io::Result<Flow> {
        let name = match &self.s.login {
            Login::Named(n) => n.clone(),
            Login::User(_) | Login::Anonymous => return self.answer(230, "Already logged in."),
            Login::Out => return self.answer(503, "Login with USER first."),
        };
        if self.cfg.is_anonymous(&name) {
            self.s.login = Login::Anonymous;
        } else if self.cfg.users.check(&name, password) {
            self.s.login = Login::User(name.clone());
        } else {
            tracing::info!(user = %name, "login refused");
            self.s.login = Login::Out;
            return self.answer(530, "Login incorrect.");
        }
        tracing::info!(user = %name, "logged in");
        self.answer(230, "Login successful.")
    }

    fn cwd(&mut self, arg: &str) -> io::Result<Flow> {
        let target = vfs::join(&self.s.cwd, arg);
        let is_dir = self.cfg.root.existing(&target).is_ok_and(|p| p.is_dir());
        let old = std::mem::replace(&mut self.s.cwd, target);
        if !is_dir {
            self.s.cwd = old;
            return self.answer(550, "Failed to change directory.");
        }
        if !self.s.fits() {
            self.s.cwd = old;
            return self.answer(550, "Path too long.");
        }
        self.answer(250, "Directory successfully changed.")
    }

    fn pasv(&mut self, extended: bool, arg: &str) -> io::Result<Flow> {
        let arg = arg.trim();
        if extended && arg.eq_ignore_ascii_case("ALL") {
            return self.answer(200, "EPSV ALL ok.");
        }
        let family_ok = match (arg, self.local.ip()) {
            ("", _) => true,
            ("1", IpAddr::V4(_)) | ("2", IpAddr::V6(_)) => extended,
            _ => false,
        };
        if !family_ok {
            return self.answer(522, "Network protocol not supported, use (1,2).");
        }
        if !extended && self.local.is_ipv6() {
            return self.answer(425, "PASV works over IPv4 only; use EPSV.");
        }
        let committed = match self.s.data {
            DataMode::Passive(port) => Some(port),
            _ => None,
        };
        match self
            .data
            .passive(&mut self.conn, self.local.ip(), committed)
        {
            Ok(a) => {
                self.s.data = DataMode::Passive(a.port());
                let text = match a {
                    SocketAddr::V4(v4) if !extended => proto::pasv_reply(v4),
                    _ => proto::epsv_reply(a.port()),
                };
                self.send(&text)?;
                Ok(Flow::Done)
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot open a passive listener");
                self.answer(425, "Cannot open passive connection.")
            }
        }
    }

    /// `PORT`/`EPRT`: only to the client's own address and an unprivileged
    /// port (no FTP bounce).
    fn port(&mut self, addr: Option<SocketAddr>) -> io::Result<Flow> {
        let Some(addr) = addr.map(canonical) else {
            return self.answer(501, "Illegal PORT command.");
        };
        if addr.ip() != self.peer.ip() || addr.port() < 1024 {
            return self.answer(501, "Illegal PORT command: not your address.");
        }
        self.data.drop_listener(&mut self.conn);
        self.s.data = DataMode::Active(addr);
        self.answer(200, "PORT command successful. Consider using PASV.")
    }

    /// Opens the data connection for a transfer command; on failure
    /// answers (`425`) and returns false.
    fn open_data(&mut self) -> io::Result<bool> {
        if self.s.data == DataMode::None {
            self.send(&reply(425, "Use PORT or PASV first."))?;
            return Ok(false);
        }
        match self.data.open(
            &mut self.conn,
            self.s.data,
            self.s.data_open,
            self.peer.ip(),
        ) {
            Ok(()) => {
                if !std::mem::replace(&mut self.s.data_open, true) {
                    if let DataMode::Active(_) = self.s.data {
                        // Nothing of this command has been sent yet.
                        self.commit(0)?;
                    }
                }
                Ok(true)
            }
            Err(e) => {
                tracing::info!(error = %e, "no data connection");
                self.data.drop_listener(&mut self.conn);
                self.data.close();
                self.s.data = DataMode::None;
                self.s.data_open = false;
                self.send(&reply(425, "Failed to establish connection."))?;
                Ok(false)
            }
        }
    }

    /// A transfer path: `None` (answered) if the session could not keep it.
    fn transfer_path(&mut self, arg: &str) -> io::Result<Option<String>> {
        if arg.is_empty() {
            self.send(&reply(501, "A file name is needed."))?;
            return Ok(None);
        }
        let path = vfs::join(&self.s.cwd, arg);
        let probe = Session {
            transfer: Some(Transfer {
                dir: Direction::Send,
                path: path.clone(),
                start: 0,
            }),
            ..self.s.clone()
        };
        if !probe.fits() {
            self.send(&reply(553, "Path too long."))?;
            return Ok(None);
        }
        Ok(Some(path))
    }

    fn retr(&mut self, arg: &str) -> io::Result<Flow> {
        let start = std::mem::take(&mut self.s.rest);
        let Some(path) = self.transfer_path(arg)? else {
            return Ok(Flow::Done);
        };
        let size = match self.cfg.root.open_read(&path).and_then(|f| f.metadata()) {
            Ok(m) => m.len(),
            Err(_) => return self.answer(550, "Failed to open file."),
        };
        if start > size {
            return self.answer(554, "Restart offset beyond the end of the file.");
        }
        if !self.open_data()? {
            return Ok(Flow::Done);
        }
        let mode = if self.s.binary { "BINARY" } else { "ASCII" };
        let text = format!(
            "Opening {mode} mode data connection for {} ({size} bytes).",
            vfs::base_name(&path)
        );
        self.send(&reply(150, &text))?;
        Ok(Flow::Transfer(Transfer {
            dir: Direction::Send,
            path,
            start,
        }))
    }

    /// `STOR` (at the `REST` offset, the file cut there) or `APPE` (at the
    /// file's end).
    fn store(&mut self, arg: &str, append: bool) -> io::Result<Flow> {
        let rest = std::mem::take(&mut self.s.rest);
        if !self.may_write() {
            return self.answer(550, "Permission denied.");
        }
        let Some(path) = self.transfer_path(arg)? else {
            return Ok(Flow::Done);
        };
        let start = self.cfg.root.open_write(&path).and_then(|f| {
            if append {
                Ok(f.metadata()?.len())
            } else {
                f.set_len(rest)?;
                Ok(rest)
            }
        });
        let Ok(start) = start else {
            return self.answer(553, "Could not create file.");
        };
        if !self.open_data()? {
            return Ok(Flow::Done);
        }
        self.send(&reply(150, "Ok to send data."))?;
        Ok(Flow::Transfer(Transfer {
            dir: Direction::Receive,
            path,
            start,
        }))
    }

    fn list(&mut self, verb: &str, arg: &str) -> io::Result<Flow> {
        self.s.rest = 0;
        // `ls` options some clients send (`LIST -la`).
        let mut arg = arg.trim();
        if verb != "MLSD" {
            while arg.starts_with('-') {
                arg = arg.split_once(' ').map_or("", |(_, r)| r.trim_start());
            }
        }
        let path = vfs::join(&self.s.cwd, arg);
        let Ok(real) = self.cfg.root.existing(&path) else {
            return self.answer(550, "No such file or directory.");
        };
        let entries = if real.is_dir() {
            listing::read_dir(&self.cfg.root, &real)
        } else if verb == "MLSD" {
            return self.answer(501, "Not a directory.");
        } else {
            listing::Entry::of(&self.cfg.root, vfs::base_name(&path).to_owned(), &real)
                .map(|e| vec![e])
        };
        let Ok(entries) = entries else {
            return self.answer(550, "Cannot read the directory.");
        };
        let bytes = match verb {
            "LIST" => listing::list(&entries, std::time::SystemTime::now()),
            "NLST" => listing::names(&entries),
            _ => listing::mlsd(&entries, self.may_write()),
        };
        if !self.open_data()? {
            return Ok(Flow::Done);
        }
        self.send(&reply(150, "Here comes the directory listing."))?;
        Ok(Flow::Listing(bytes))
    }

    fn mlst(&mut self, arg: &str) -> io::Result<Flow> {
        let path = vfs::join(&self.s.cwd, arg);
        let meta = self.cfg.root.existing(&path).and_then(|p| p.metadata());
        let Ok(meta) = meta else {
            return self.answer(550, "No such file or directory.");
        };
        let facts = listing::facts(&meta, self.may_write());
        let text = format!(
            "250-Listing {}\r\n {facts} {}\r\n250 End.\r\n",
            path.replace(['\r', '\n'], " "),
            path.replace(['\r', '\n'], " ")
        );
        self.send(&text)?;
        Ok(Flow::Done)
    }

    /// `SIZE` and `MDTM` of a plain file.
    fn stat(&mut self, verb: &str, arg: &str) -> io::Result<Flow> {
        let path = vfs::join(&self.s.cwd, arg);
        let meta = self.cfg.root.open_read(&path).and_then(|f| f.metadata());
        match meta {
            Ok(m) if verb == "SIZE" => self.answer(213, &m.len().to_string()),
            Ok(m) => {
                use std::os::unix::fs::MetadataExt;
                self.answer(213, &listing::timestamp(m.mtime()))
            }
            Err(_) => self.answer(550, "Could not get file status."),
        }
    }

    /// `DELE` (a file or symlink) or `RMD` (an empty directory).
    fn remove(&mut self, arg: &str, dir: bool) -> io::Result<Flow> {
        if !self.may_write() {
            return self.answer(550, "Permission denied.");
        }
        if arg.is_empty() {
            return self.answer(501, "A name is needed.");
        }
        let path = vfs::join(&self.s.cwd, arg);
        let entry = self.cfg.root.entry(&path);
        let check = match &entry {
            Ok(p) => match p.symlink_metadata() {
                Ok(m) if m.is_dir() == dir => Ok(()),
                Ok(_) if dir => Err(io::ErrorKind::NotADirectory.into()),
                Ok(_) => Err(io::ErrorKind::IsADirectory.into()),
                Err(e) => Err(e),
            },
            Err(e) => Err(e.kind().into()),
        };
        let r = self.effect(check, io::ErrorKind::NotFound, || {
            let p = entry?;
            if dir {
                std::fs::remove_dir(p)
            } else {
                std::fs::remove_file(p)
            }
        })?;
        match (r, dir) {
            (Ok(()), false) => self.answer(250, "Delete operation successful."),
            (Ok(()), true) => self.answer(250, "Remove directory operation successful."),
            (Err(e), _) => self.answer(550, &format!("Remove failed: {}.", why(&e))),
        }
    }

    fn mkd(&mut self, arg: &str) -> io::Result<Flow> {
        if !self.may_write() {
            return self.answer(550, "Permission denied.");
        }
        if arg.is_empty() {
            return self.answer(501, "MKD needs a directory name.");
        }
        let path = vfs::join(&self.s.cwd, arg);
        let entry = self.cfg.root.entry(&path);
        let check = match &entry {
            Ok(p) if p.symlink_metadata().is_ok() => Err(io::ErrorKind::AlreadyExists.into()),
            Ok(_) => Ok(()),
            Err(e) => Err(e.kind().into()),
        };
        match self.effect(check, io::ErrorKind::AlreadyExists, || {
            std::fs::create_dir(entry?)
        })? {
            Ok(()) => self.answer(257, &format!("{} created.", proto::quote(&path))),
            Err(e) => self.answer(550, &format!("Create directory failed: {}.", why(&e))),
        }
    }

    fn rnfr(&mut self, arg: &str) -> io::Result<Flow> {
        if !self.may_write() {
            return self.answer(550, "Permission denied.");
        }
        if arg.is_empty() {
            return self.answer(501, "A name is needed.");
        }
        let path = vfs::join(&self.s.cwd, arg);
        let exists = self
            .cfg
            .root
            .entry(&path)
            .is_ok_and(|p| p.symlink_metadata().is_ok());
        if !exists {
            return self.answer(550, "No such file or directory.");
        }
        self.s.rnfr = Some(path);
        if !self.s.fits() {
            self.s.rnfr = None;
            return self.answer(553, "Path too long.");
        }
        self.answer(350, "Ready for RNTO.")
    }

    fn rnto(&mut self, from: Option<String>, arg: &str) -> io::Result<Flow> {
        let Some(from) = from else {
            return self.answer(503, "RNFR required first.");
        };
        if arg.is_empty() {
            self.s.rnfr = None;
            return self.answer(501, "RNTO needs a name.");
        }
        let to = vfs::join(&self.s.cwd, arg);
        let root = &self.cfg.root;
        let paths = root.entry(&from).and_then(|f| Ok((f, root.entry(&to)?)));
        let check = match &paths {
            Ok((f, _)) => f.symlink_metadata().map(|_| ()),
            Err(e) => Err(e.kind().into()),
        };
        let r = self.effect(check, io::ErrorKind::NotFound, || {
            let (f, t) = paths?;
            std::fs::rename(f, t)
        })?;
        self.s.rnfr = None;
        match r {
            Ok(()) => self.answer(250, "Rename successful."),
            Err(e) => self.answer(550, &format!("Rename failed: {}.", why(&e))),
        }
    }
}
