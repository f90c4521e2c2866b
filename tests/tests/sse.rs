//! A resumable streaming response (hf-chat's `GET /events`, Server-Sent
//! Events on `holdfast_http::stream::Resumable`) under the keeper: workers
//! SIGKILLed every ~100 ms and `holdfast upgrade` while clients read the
//! stream. Each client checks the chunked body byte for byte — every
//! event exactly once, in order, then the terminating chunk and keep-alive
//! — and the workers' logs show that recovery resumed the stream after the
//! last event committed instead of regenerating it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hf_tests::{bin, start_pass_through, tail, Keeper, NetNs, Proc, TempDir};

/// hf-chat under the keeper, logging its resumed streams
/// (`resuming /events after event K`) and the library's recoveries into the
/// keeper's log.
fn chat_cmd(data: &TempDir) -> Vec<String> {
    vec![
        "/usr/bin/env".into(),
        "RUST_LOG=hf_chat=info,holdfast=debug".into(),
        bin("hf-chat").display().to_string(),
        "--data-dir".into(),
        data.path().display().to_string(),
    ]
}

fn chat(data: &TempDir) -> Keeper {
    let cmd = chat_cmd(data);
    let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
    Keeper::start(&[], &cmd)
}

/// The `i`-th event exactly as it must arrive: one chunk, framed the way
/// hyper frames it (or, to HTTP/1.0, unframed).
fn event_chunk(i: u64, chunked: bool) -> Vec<u8> {
    let data = format!("id: {i}\ndata: event {i}\n\n");
    if !chunked {
        return data.into_bytes();
    }
    format!("{:X}\r\n{data}\r\n", data.len()).into_bytes()
}

/// What a stream client asks for.
#[derive(Clone, Copy, Debug)]
struct Plan {
    events: u64,
    /// Bytes of padding header, to make the request large (then the
    /// adapter keeps it in a held memfd rather than the state blob).
    pad: usize,
    /// Sends the follow-up `GET /hello` right behind the stream's request
    /// instead of after the stream.
    pipelined: bool,
    /// The server's pace (`every_ms`); 0: as fast as the client reads.
    every_ms: u64,
    /// Read at about this many bytes a second, with a small receive
    /// buffer, so the server's writes block in the middle of an event.
    rate: Option<f64>,
    /// An HTTP/1.0 request: the events come unframed, and the connection
    /// closes after them.
    http10: bool,
}

impl Plan {
    fn new(events: u64) -> Plan {
        Plan {
            events,
            pad: 0,
            pipelined: false,
            every_ms: 10,
            rate: None,
            http10: false,
        }
    }

    fn http10(self) -> Plan {
        Plan {
            http10: true,
            ..self
        }
    }

    fn pad(self, pad: usize) -> Plan {
        Plan { pad, ..self }
    }

    fn pipelined(self) -> Plan {
        Plan {
            pipelined: true,
            ..self
        }
    }
}

/// A reader at a steady pace.
struct Paced {
    s: TcpStream,
    rate: f64,
    got: usize,
    t0: Instant,
}

impl Read for Paced {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let max = buf.len().min(4096);
        let n = self.s.read(&mut buf[..max])?;
        self.got += n;
        let due = Duration::from_secs_f64(self.got as f64 / self.rate);
        if let Some(wait) = due.checked_sub(self.t0.elapsed()) {
            std::thread::sleep(wait);
        }
        Ok(n)
    }
}

/// Reads one `/events` stream and a `/hello` after it on the same
/// connection, checking every byte; counts the events in `seen`.
fn stream_client(addr: SocketAddr, plan: Plan, seen: &AtomicU64) -> Result<(), String> {
    let s = match plan.rate {
        Some(_) => hf_tests::connect_small_rcvbuf(addr, 4096),
        None => TcpStream::connect(addr),
    }
    .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(15)))
        .map_err(|e| e.to_string())?;
    let mut w = s.try_clone().map_err(|e| e.to_string())?;
    let read: Box<dyn Read + Send> = match plan.rate {
        Some(rate) => Box::new(Paced {
            s,
            rate,
            got: 0,
            t0: Instant::now(),
        }),
        None => Box::new(s),
    };
    let mut r = BufReader::new(read);
    let pad = if plan.pad > 0 {
        format!("X-Pad: {}\r\n", "p".repeat(plan.pad))
    } else {
        String::new()
    };
    let events = format!(
        "GET /events?n={}&every_ms={} HTTP/1.{}\r\nHost: t\r\nAccept: text/event-stream\r\n{pad}\r\n",
        plan.events,
        plan.every_ms,
        if plan.http10 { 0 } else { 1 }
    );
    let hello = "GET /hello?n=7 HTTP/1.1\r\nHost: t\r\n\r\n";
    let first = if plan.pipelined {
        format!("{events}{hello}")
    } else {
        events
    };
    w.write_all(first.as_bytes())
        .map_err(|e| format!("send: {e}"))?;

    let head = read_head(&mut r).map_err(|e| format!("stream head: {e}"))?;
    let lower = head.to_ascii_lowercase();
    let chunked = !plan.http10;
    if !head.starts_with(if chunked {
        "HTTP/1.1 200 "
    } else {
        "HTTP/1.0 200 "
    }) || !lower.contains("\r\ncontent-type: text/event-stream\r\n")
        || lower.contains("\r\ntransfer-encoding: chunked\r\n") != chunked
    {
        return Err(format!("unexpected head: {head:?}"));
    }
    for i in 1..=plan.events {
        let want = event_chunk(i, chunked);
        let mut got = vec![0u8; want.len()];
        if let Err(e) = r.read_exact(&mut got) {
            return Err(format!("event {i}: {e} (after {} events)", i - 1));
        }
        if got != want {
            let mut more = vec![0u8; 256];
            let n = r.read(&mut more).unwrap_or(0);
            got.extend_from_slice(&more[..n]);
            return Err(format!(
                "event {i}: got {:?}, want {:?}",
                String::from_utf8_lossy(&got),
                String::from_utf8_lossy(&want)
            ));
        }
        seen.fetch_add(1, Ordering::Relaxed);
    }
    if !chunked {
        // The body ends with the connection, cleanly.
        let mut rest = Vec::new();
        return match r.read_to_end(&mut rest) {
            Ok(_) if rest.is_empty() => Ok(()),
            Ok(_) => Err(format!(
                "after the last event: {:?}",
                String::from_utf8_lossy(&rest)
            )),
            Err(e) => Err(format!("after the last event: {e}")),
        };
    }
    let mut end = [0u8; 5];
    r.read_exact(&mut end)
        .map_err(|e| format!("last chunk: {e}"))?;
    if &end != b"0\r\n\r\n" {
        return Err(format!("last chunk: {:?}", String::from_utf8_lossy(&end)));
    }
    if !plan.pipelined {
        w.write_all(hello.as_bytes())
            .map_err(|e| format!("send hello: {e}"))?;
    }
    let head = read_head(&mut r).map_err(|e| format!("hello head after the stream: {e}"))?;
    let mut body = [0u8; 8];
    r.read_exact(&mut body)
        .map_err(|e| format!("hello body: {e}"))?;
    if !head.starts_with("HTTP/1.1 200 ") || &body != b"hello 7\n" {
        return Err(format!(
            "hello after the stream: {head:?} {:?}",
            String::from_utf8_lossy(&body)
        ));
    }
    Ok(())
}

fn read_head(r: &mut impl BufRead) -> std::io::Result<String> {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("connection ended in a head: {head:?}"),
            ));
        }
        head.push_str(&line);
        if line == "\r\n" {
            return Ok(head);
        }
    }
}

struct Clients {
    seen: Vec<Arc<AtomicU64>>,
    done: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Result<(), String>>>,
    plans: Vec<Plan>,
}

impl Clients {
    fn start(addr: SocketAddr, plans: &[Plan]) -> Clients {
        let seen: Vec<Arc<AtomicU64>> = plans.iter().map(|_| Arc::default()).collect();
        let running = Arc::new(AtomicU64::new(plans.len() as u64));
        let done = Arc::new(AtomicBool::new(false));
        let threads = plans
            .iter()
            .zip(&seen)
            .map(|(&plan, seen)| {
                let (seen, running, done) = (seen.clone(), running.clone(), done.clone());
                std::thread::spawn(move || {
                    let r = stream_client(addr, plan, &seen);
                    if running.fetch_sub(1, Ordering::SeqCst) == 1 || r.is_err() {
                        done.store(true, Ordering::SeqCst);
                    }
                    r
                })
            })
            .collect();
        Clients {
            seen,
            done,
            threads,
            plans: plans.to_vec(),
        }
    }

    /// All clients finished (or one failed).
    fn done(&self) -> bool {
        self.done.load(Ordering::SeqCst)
    }

    /// Events seen by the client that has seen the fewest.
    fn least_seen(&self) -> u64 {
        self.seen
            .iter()
            .map(|s| s.load(Ordering::Relaxed))
            .min()
            .unwrap_or(0)
    }

    fn finish(self, k: &Keeper) {
        let mut failures = Vec::new();
        for ((t, plan), seen) in self.threads.into_iter().zip(&self.plans).zip(&self.seen) {
            if let Err(e) = t.join().expect("client thread") {
                failures.push(format!(
                    "{plan:?} ({} events seen): {e}",
                    seen.load(Ordering::Relaxed)
                ));
            }
        }
        assert!(
            failures.is_empty(),
            "stream clients failed: {failures:#?}\nkeeper log tail:\n{}",
            tail(&k.log(), 60)
        );
    }
}

/// SIGKILLs the active worker every 70–130 ms until the clients are done;
/// returns how many times.
fn kill_storm(k: &mut Keeper, clients: &Clients) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut kills = 0u32;
    while !clients.done() {
        assert!(
            Instant::now() < deadline,
            "the stream clients did not finish"
        );
        std::thread::sleep(Duration::from_millis(70 + u64::from(kills % 7) * 10));
        if clients.done() {
            break;
        }
        k.kill_active();
        kills += 1;
    }
    kills
}

/// The library's recoveries (its debug log): the output positions each
/// recovered connection had — (committed, written by the kernel, announced
/// by the dead worker).
fn recoveries(log: &str) -> Vec<(u64, u64, u64)> {
    let field = |l: &str, name: &str| -> Option<u64> {
        let (_, v) = l.split_once(&format!("{name}="))?;
        v.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
    };
    log.lines()
        .filter(|l| l.contains("recovered connection"))
        .map(strip_ansi)
        .filter_map(|l| {
            Some((
                field(&l, "out_commit")?,
                field(&l, "written")?,
                field(&l, "out_rec")?,
            ))
        })
        .collect()
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::new();
    let mut esc = false;
    for ch in s.chars() {
        match (esc, ch) {
            (false, '\x1b') => esc = true,
            (true, 'm') => esc = false,
            (true, _) => {}
            (false, c) => out.push(c),
        }
    }
    out
}

/// The progress each resumed `/events` started from, from the log.
fn resumes(log: &str) -> Vec<u64> {
    log.lines()
        .filter_map(|l| {
            let (_, after) = l.split_once("resuming /events after event ")?;
            after
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

/// Four streams — a plain one, one whose request is too large for the
/// state blob (kept in a held memfd), one with a request pipelined behind
/// it, and an HTTP/1.0 one (unframed, ended by the connection's end) —
/// while the worker is SIGKILLed every 70–130 ms: each client gets every
/// event exactly once, in order, in hyper's chunk framing, the terminating
/// chunk, and its next request answered (or, HTTP/1.0, a clean end); no
/// connection resets.
/// The new workers resumed the streams after a committed event (their log
/// says from which), instead of regenerating them from the start.
#[test]
fn sse_streams_survive_a_kill_storm_resuming_after_the_last_event() {
    let data = TempDir::new("sse-kill");
    let mut k = chat(&data);
    let plans = [
        Plan::new(400),
        Plan::new(400).pad(600),
        Plan::new(250).pipelined(),
        Plan::new(300).http10(),
    ];
    let clients = Clients::start(k.addr, &plans);
    let kills = kill_storm(&mut k, &clients);
    clients.finish(&k);
    let log = k.log();
    let resumed = resumes(&log);
    eprintln!(
        "{kills} kills, {} stream resumptions, from events {resumed:?}",
        resumed.len()
    );
    assert!(kills >= 20, "only {kills} kills: the storm was too short");
    for bad in [
        "is no longer followed",
        "cannot continue",
        "closing connection",
    ] {
        assert!(
            !log.contains(bad),
            "the log says {bad:?}:\n{}",
            tail(&log, 60)
        );
    }
    assert!(
        resumed.len() as u32 >= kills / 2,
        "{kills} kills but only {} streams resumed from their progress:\n{}",
        resumed.len(),
        tail(&log, 60)
    );
    assert!(
        resumed.iter().all(|&e| (1..=400).contains(&e)),
        "resumed from impossible progress: {resumed:?}"
    );
    assert!(
        resumed.iter().any(|&e| e > 100),
        "no stream resumed deep into its events: {resumed:?}"
    );
}

/// Events as fast as a slow reader with a small receive window takes them,
/// with send buffers of at most 16 KiB (in a network namespace of the
/// test's own): the worker is mostly killed while blocked writing an
/// event, part of which may already be out. The next worker resumes after
/// the last committed event and regenerates the one in flight, which the
/// library checks against what the dead worker announced and sends only
/// the part the client lacks: each event arrives once, without a seam.
#[test]
fn a_stream_killed_in_the_middle_of_an_event_resumes_without_a_seam() {
    let data = TempDir::new("sse-seam");
    let ns = NetNs::new("sse", &["net.ipv4.tcp_wmem=4096 16384 16384"]);
    ns.enter();
    let mut k = chat(&data);
    let fast = Plan {
        every_ms: 0,
        rate: Some(300_000.0),
        ..Plan::new(40_000)
    };
    let clients = Clients::start(k.addr, &[fast, fast.pad(600)]);
    let kills = kill_storm(&mut k, &clients);
    clients.finish(&k);
    let log = k.log();
    let resumed = resumes(&log);
    let recovered = recoveries(&log);
    let in_flight = recovered.iter().filter(|(c, _, r)| r > c).count();
    let partly_out = recovered.iter().filter(|(c, w, _)| w > c).count();
    eprintln!(
        "{kills} kills, {} resumptions, {} recoveries: {in_flight} with an event in flight, {partly_out} with part of it out",
        resumed.len(),
        recovered.len()
    );
    assert!(kills >= 10, "only {kills} kills: the storm was too short");
    assert!(
        resumed.len() as u32 >= kills,
        "{kills} kills but only {} streams resumed from their progress",
        resumed.len()
    );
    assert!(
        in_flight > 0 && partly_out > 0,
        "no kill came with (part of) an event in flight: the test missed its window ({recovered:?})"
    );
}

/// Killed right after the request, before the first event (the first
/// commit point): the next worker replays the response from its start,
/// head and all, and the client sees one stream.
#[test]
fn sse_stream_killed_before_its_first_event_is_replayed_from_the_start() {
    let data = TempDir::new("sse-early");
    let mut k = chat(&data);
    for round in 0..4 {
        let seen = AtomicU64::new(0);
        let plan = Plan::new(30);
        let addr = k.addr;
        std::thread::scope(|s| {
            let client = s.spawn(|| stream_client(addr, plan, &seen));
            // The first event is 10 ms after the request.
            std::thread::sleep(Duration::from_millis(2));
            k.kill_active();
            client
                .join()
                .expect("client thread")
                .unwrap_or_else(|e| panic!("round {round}: {e}\n{}", tail(&k.log(), 40)));
        });
    }
    // Some kills came before the first commit: those streams were not
    // resumed from a progress but replayed whole.
    let resumed = resumes(&k.log());
    assert!(
        resumed.len() < 4,
        "every stream had committed an event before its kill ({resumed:?}): the test missed the window it is about"
    );
}

/// `holdfast upgrade` twice while two streams run (one with a request kept
/// in a held memfd): each stream moves to the new version at an event
/// boundary — a commit point — without waiting for its end or for the
/// drain timeout, and the new version carries on after that event.
#[test]
fn sse_streams_move_to_a_new_version_at_an_event() {
    let data = TempDir::new("sse-upgrade");
    let k = chat(&data);
    let cmd = chat_cmd(&data);
    let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
    let plans = [Plan::new(500), Plan::new(500).pad(600)];
    let clients = Clients::start(k.addr, &plans);
    for (i, at) in [60, 200].into_iter().enumerate() {
        hf_tests::eventually(Duration::from_secs(30), "events flowing", || {
            (clients.least_seen() >= at || clients.done()).then_some(())
        });
        assert!(!clients.done(), "the streams ended before upgrade {i}");
        let before = resumes(&k.log()).len();
        let (code, out, err) = k.upgrade(&["--settle", "50", "--json"], &cmd);
        assert_eq!(code, 0, "upgrade {i}: {out}{err}\n{}", k.log());
        let done: serde_json::Value = out
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["event"] == "done")
            .unwrap_or_else(|| panic!("upgrade {i}: no done event: {out}"));
        assert_eq!(done["recovered"], 0, "upgrade {i}: {out}");
        assert_eq!(done["moved"], 2, "upgrade {i}: both streams move: {out}");
        hf_tests::eventually(Duration::from_secs(10), "the new version resuming", || {
            (resumes(&k.log()).len() >= before + 2).then_some(())
        });
        let after = resumes(&k.log())[before..].to_vec();
        assert!(
            after.iter().all(|&e| e >= at),
            "upgrade {i}: resumed from {after:?}, but the clients had {at} events"
        );
    }
    clients.finish(&k);
}

/// Without a keeper the same route is a plain streaming response (chunked,
/// or unframed to HTTP/1.0).
#[test]
fn sse_stream_alone_is_a_plain_stream() {
    let data = TempDir::new("sse-alone");
    let (child, addr) = start_pass_through(
        std::process::Command::new(bin("hf-chat"))
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data.path()),
    );
    let _child = Proc(child);
    let seen = AtomicU64::new(0);
    for plan in [
        Plan::new(20).pad(600),
        Plan::new(20).pipelined(),
        Plan::new(20).http10(),
    ] {
        stream_client(addr, plan, &seen).unwrap_or_else(|e| panic!("{plan:?}: {e}"));
    }
    assert_eq!(seen.load(Ordering::Relaxed), 60);
}
