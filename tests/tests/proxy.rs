//! hf-proxy, the forward proxy: real clients (curl and our own), real
//! origins (hf-httpd, and a small origin in this file that counts the
//! requests it gets), workers SIGKILLed while requests, answers and tunnels
//! are in flight.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hf_tests::http::{content, make_site, Client};
use hf_tests::{bin, free_port, run_cmd, start_pass_through, Keeper, Proc, TempDir};

// ---------------------------------------------------------------------------
// The origins.

/// A small HTTP/1.1 origin (keep-alive, a thread per connection) that
/// remembers what it was asked. Routes:
///
/// - `POST /post/ID`: counts ID, answers [`post_answer`] in pieces, slowly;
/// - `GET /slow/LEN` (`?chunked`): [`content`]`(LEN, LEN)` in 32 KiB pieces,
///   15 ms apart, with `Content-Length` (or chunked, a chunk a piece);
/// - `GET /n/X`: `X\n`;
/// - `GET /hang`: never answers; `GET /close`: closes without answering;
///   `GET /truncate`: promises 1000 bytes, sends 10 and closes.
struct Origin {
    addr: SocketAddr,
    posts: Arc<Mutex<HashMap<String, u32>>>,
    heads: Arc<Mutex<Vec<String>>>,
    conns: Arc<AtomicUsize>,
}

impl Origin {
    fn start() -> Origin {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind origin");
        let o = Origin {
            addr: l.local_addr().expect("origin address"),
            posts: Arc::default(),
            heads: Arc::default(),
            conns: Arc::default(),
        };
        let (posts, heads, conns) = (o.posts.clone(), o.heads.clone(), o.conns.clone());
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                conns.fetch_add(1, Ordering::Relaxed);
                let (posts, heads) = (posts.clone(), heads.clone());
                std::thread::spawn(move || {
                    let _ = serve_origin(s, &posts, &heads);
                });
            }
        });
        o
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

/// What the origin answers to `POST /post/ID` with `body`.
fn post_answer(id: &str, body: &[u8]) -> Vec<u8> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in body {
        h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
    }
    let mut out = format!("id={id} len={} fnv={h:016x}\n", body.len()).into_bytes();
    out.extend_from_slice(&content(20_000, h));
    out
}

fn serve_origin(
    mut s: TcpStream,
    posts: &Mutex<HashMap<String, u32>>,
    heads: &Mutex<Vec<String>>,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    loop {
        let Some(end) = fill_until(&mut s, &mut buf, b"\r\n\r\n")? else {
            return Ok(());
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end);
        heads.lock().unwrap().push(head.clone());
        let (target, hs) = split_head(&head);
        let header = |n: &str| {
            hs.iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(n))
                .map(|(_, v)| v.clone())
        };
        let body = if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            read_chunked(&mut s, &mut buf)?
        } else {
            let len: usize = header("content-length").map_or(0, |v| v.parse().unwrap_or(0));
            // Large bodies are taken slowly, so a kill lands while a
            // request is being sent.
            while buf.len() < len {
                read_more(&mut s, &mut buf, 16 * 1024)?;
                if len > 64 * 1024 {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            buf.drain(..len).collect()
        };
        if let Some(id) = target.strip_prefix("/post/") {
            *posts.lock().unwrap().entry(id.to_owned()).or_default() += 1;
            let answer = post_answer(id, &body);
            s.write_all(
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
                    answer.len()
                )
                .as_bytes(),
            )?;
            for piece in answer.chunks(answer.len() / 3 + 1) {
                std::thread::sleep(Duration::from_millis(5));
                s.write_all(piece)?;
            }
        } else if let Some(spec) = target.strip_prefix("/slow/") {
            let (len, chunked) = match spec.split_once('?') {
                Some((l, "chunked")) => (l, true),
                _ => (spec, false),
            };
            let len: usize = len.parse().unwrap_or(0);
            let data = content(len, len as u64);
            let mut out = if chunked {
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec()
            } else {
                format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\n\r\n").into_bytes()
            };
            if chunked {
                for (i, c) in data.chunks(50_000).enumerate() {
                    out.extend_from_slice(
                        format!("{:x}{}\r\n", c.len(), [";x=y", ""][i % 2]).as_bytes(),
                    );
                    out.extend_from_slice(c);
                    out.extend_from_slice(b"\r\n");
                }
                out.extend_from_slice(b"0\r\nX-Trailer: 1\r\n\r\n");
            } else {
                out.extend_from_slice(&data);
            }
            // Pauses fall anywhere: inside chunks, their size lines, CRLFs.
            for piece in out.chunks(32 * 1024 + 7) {
                s.write_all(piece)?;
                std::thread::sleep(Duration::from_millis(15));
            }
        } else if let Some(x) = target.strip_prefix("/n/") {
            s.write_all(
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{x}\n",
                    x.len() + 1
                )
                .as_bytes(),
            )?;
        } else if target == "/hang" {
            // Until the proxy gives up.
            while read_more(&mut s, &mut buf, 4096)? > 0 {}
            return Ok(());
        } else if target == "/close" {
            return Ok(());
        } else if target == "/truncate" {
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789")?;
            return Ok(());
        } else {
            s.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")?;
        }
    }
}

/// Reads until `buf` contains `pat`; the offset past it, or `None` at a
/// clean end of stream.
fn fill_until(s: &mut TcpStream, buf: &mut Vec<u8>, pat: &[u8]) -> std::io::Result<Option<usize>> {
    loop {
        if let Some(i) = buf.windows(pat.len()).position(|w| w == pat) {
            return Ok(Some(i + pat.len()));
        }
        if read_more(s, buf, 64 * 1024)? == 0 {
            return Ok(None);
        }
    }
}

fn read_more(s: &mut TcpStream, buf: &mut Vec<u8>, max: usize) -> std::io::Result<usize> {
    let mut chunk = vec![0u8; max];
    let n = s.read(&mut chunk)?;
    buf.extend_from_slice(&chunk[..n]);
    Ok(n)
}

fn eof() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "stream ended early")
}

/// The data of a chunked body read off `s` (trailers skipped).
fn read_chunked(s: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let end = fill_until(s, buf, b"\r\n")?.ok_or_else(eof)?;
        let line = String::from_utf8_lossy(&buf[..end - 2]).into_owned();
        buf.drain(..end);
        let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "chunk size"))?;
        if size == 0 {
            // Trailer lines up to the empty one.
            loop {
                let end = fill_until(s, buf, b"\r\n")?.ok_or_else(eof)?;
                buf.drain(..end);
                if end == 2 {
                    return Ok(body);
                }
            }
        }
        while buf.len() < size + 2 {
            if read_more(s, buf, 64 * 1024)? == 0 {
                return Err(eof());
            }
        }
        body.extend_from_slice(&buf[..size]);
        buf.drain(..size + 2);
    }
}

/// (request target, headers) of a request head.
fn split_head(head: &str) -> (String, Vec<(String, String)>) {
    let mut lines = head.split("\r\n");
    let target = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .unwrap_or_default()
        .to_owned();
    let hs = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    (target, hs)
}

/// An origin that echoes every byte back at about `rate` bytes a second,
/// through a small receive window (so whoever sends to it waits, with bytes
/// in hand), and closes when the client has.
fn start_echo(rate: f64) -> SocketAddr {
    use rustix::net::{bind, listen, socket, sockopt, AddressFamily, SocketType};
    let fd = socket(AddressFamily::INET, SocketType::STREAM, None).expect("socket");
    // Inherited by accepted sockets, and set before their handshake.
    sockopt::set_socket_recv_buffer_size(&fd, 32 * 1024).expect("SO_RCVBUF");
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    bind(&fd, &any).expect("bind echo");
    listen(&fd, 16).expect("listen");
    let l = TcpListener::from(fd);
    let addr = l.local_addr().expect("echo address");
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut buf = [0u8; 8 * 1024];
                let (t0, mut total) = (Instant::now(), 0usize);
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    total += n;
                    let due = Duration::from_secs_f64(total as f64 / rate);
                    if let Some(w) = due.checked_sub(t0.elapsed()) {
                        std::thread::sleep(w);
                    }
                }
            });
        }
    });
    addr
}

/// hf-httpd alone, serving files of `sizes`: (process, address, files).
fn start_httpd(dir: &Path, sizes: &[usize]) -> (Proc, SocketAddr, Vec<(String, Vec<u8>)>) {
    let files = make_site(dir, sizes);
    let (child, addr) = start_pass_through(
        Command::new(bin("hf-httpd"))
            .arg("--root")
            .arg(dir)
            .args(["--listen", "127.0.0.1:0"]),
    );
    (Proc(child), addr, files)
}

// ---------------------------------------------------------------------------
// The proxy and its clients.

/// hf-proxy under the keeper.
fn start_proxy(args: &[&str]) -> Keeper {
    let proxy = bin("hf-proxy").display().to_string();
    let cmd: Vec<&str> = std::iter::once(proxy.as_str())
        .chain(args.iter().copied())
        .collect();
    Keeper::start(&[], &cmd)
}

/// `curl -x PROXY ARGS...`: (exit code, stdout, stderr).
fn curl(proxy: SocketAddr, args: &[&str]) -> (i32, String, String) {
    run_cmd(
        Command::new("curl")
            .args(["-sS", "--max-time", "20", "-x"])
            .arg(format!("http://{proxy}"))
            .args(args),
    )
}

/// Fetches `url` through the proxy into a file and returns its bytes.
fn curl_get(proxy: SocketAddr, dir: &Path, name: &str, args: &[&str], url: &str) -> Vec<u8> {
    let out = dir.join(name);
    let out_s = out.display().to_string();
    let mut all = args.to_vec();
    all.extend_from_slice(&["-o", &out_s, url]);
    let (code, _, err) = curl(proxy, &all);
    assert_eq!(code, 0, "curl {url}: {err}");
    std::fs::read(&out).expect("curl output")
}

/// Sends raw bytes to the proxy and returns everything it answers until it
/// closes.
fn raw_exchange(proxy: SocketAddr, raw: &[u8]) -> String {
    let mut s = TcpStream::connect(proxy).expect("connect proxy");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(raw).expect("send");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// Opens a tunnel to `to` through the proxy.
fn connect_tunnel(proxy: SocketAddr, to: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(proxy).expect("connect proxy");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(format!("CONNECT {to} HTTP/1.1\r\nHost: {to}\r\n\r\n").as_bytes())
        .expect("send CONNECT");
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut b).expect("CONNECT answer"), 1, "proxy closed");
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(
        head.starts_with("HTTP/1.1 200 "),
        "CONNECT answered {head:?}"
    );
    s
}

/// Kills the active worker every `every` while `busy()` holds (at most
/// `max` times); returns how many it killed.
fn kill_while(k: &mut Keeper, every: Duration, max: usize, busy: impl Fn() -> bool) -> usize {
    let mut kills = 0;
    while busy() && kills < max {
        std::thread::sleep(every);
        if busy() {
            k.kill_and_wait();
            kills += 1;
        }
    }
    kills
}

/// The last lines of the keeper's log (kill tests log a lot).
fn log_tail(k: &Keeper) -> String {
    let log = k.log();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

// ---------------------------------------------------------------------------
// 1. What a proxy does, driven by curl.

#[test]
fn curl_through_the_proxy_gets_files_heads_posts_keepalive_and_tunnels() {
    let dir = TempDir::new("proxy-curl");
    let site = TempDir::new("proxy-site");
    let (_httpd, web, files) = start_httpd(site.path(), &[13, 3_000_000]);
    let origin = Origin::start();
    let k = start_proxy(&[]);
    let p = k.addr;
    let (small, large) = (&files[0], &files[1]);

    for (i, (path, want)) in files.iter().enumerate() {
        let got = curl_get(
            p,
            dir.path(),
            &format!("get{i}"),
            &[],
            &format!("http://{web}{path}"),
        );
        assert!(got == *want, "GET {path}: {} bytes differ", got.len());
    }

    let (code, head, err) = curl(p, &["-I", &format!("http://{web}{}", large.0)]);
    assert_eq!(code, 0, "HEAD: {err}");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.contains(&format!("Content-Length: {}", large.1.len())),
        "{head}"
    );
    assert!(head.contains("Via: 1.1 hf-proxy"), "{head}");

    // Bodies by length and chunked; the big one also with curl's
    // `Expect: 100-continue`.
    let body = content(2_500_000, 7);
    std::fs::write(dir.path().join("body"), &body).unwrap();
    let upload = format!("@{}", dir.path().join("body").display());
    for (id, extra) in [
        ("c-len", None),
        ("c-chunked", Some("Transfer-Encoding: chunked")),
    ] {
        let mut args = vec!["--data-binary", upload.as_str()];
        if let Some(h) = extra {
            args.extend_from_slice(&["-H", h]);
        }
        let got = curl_get(
            p,
            dir.path(),
            id,
            &args,
            &origin.url(&format!("/post/{id}")),
        );
        assert!(got == post_answer(id, &body), "POST {id}");
    }

    // Several URLs in one invocation: one client connection, one upstream
    // connection.
    let before = origin.conns.load(Ordering::Relaxed);
    let urls: Vec<String> = (1..=3).map(|i| origin.url(&format!("/n/{i}"))).collect();
    let mut args = vec!["-w", "%{num_connects},"];
    for u in &urls {
        args.extend_from_slice(&["-o", "/dev/null", u]);
    }
    let (code, out, err) = curl(p, &args);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "1,0,0,", "client connections per request");
    assert_eq!(
        origin.conns.load(Ordering::Relaxed) - before,
        1,
        "upstream connections"
    );
    let heads = origin.heads.lock().unwrap().clone();
    let last = heads.last().expect("a request head");
    assert!(last.starts_with("GET /n/3 HTTP/1.1\r\n"), "{last}");
    assert!(
        last.contains(&format!("Host: {}\r\n", origin.addr)),
        "{last}"
    );
    assert!(last.contains("Via: 1.1 hf-proxy\r\n"), "{last}");
    assert!(
        !last.to_ascii_lowercase().contains("proxy-connection"),
        "{last}"
    );

    // A tunnel to the plain-HTTP origin.
    let got = curl_get(
        p,
        dir.path(),
        "tunnel",
        &["-p"],
        &format!("http://{web}{}", large.0),
    );
    assert!(got == large.1, "GET through a tunnel");
    let got = curl_get(
        p,
        dir.path(),
        "tunnel-small",
        &["-p"],
        &format!("http://{web}{}", small.0),
    );
    assert!(got == small.1);
}

// ---------------------------------------------------------------------------
// 2. Kills.

/// Three downloads at once — a slow origin with `Content-Length`, a slow
/// origin sending chunks, hf-httpd to a slow reader — while the worker is
/// killed again and again: every byte arrives exactly once.
#[test]
fn downloads_survive_kills_mid_answer() {
    let dir = TempDir::new("proxy-dl");
    let site = TempDir::new("proxy-dl-site");
    let (_httpd, web, files) = start_httpd(site.path(), &[12 << 20]);
    let origin = Origin::start();
    let mut k = start_proxy(&[]);
    let p = k.addr;
    let running = Arc::new(AtomicUsize::new(3));
    let len = 3 << 20;
    let want = content(len, len as u64);
    let curls: Vec<_> = ["", "?chunked"]
        .into_iter()
        .map(|q| {
            let (url, out, running) = (
                origin.url(&format!("/slow/{len}{q}")),
                dir.path().join(format!("dl{q}")),
                running.clone(),
            );
            std::thread::spawn(move || {
                let out_s = out.display().to_string();
                let r = curl(p, &["-o", &out_s, &url]);
                running.fetch_sub(1, Ordering::Relaxed);
                (r, std::fs::read(&out).unwrap_or_default())
            })
        })
        .collect();
    let (path, big) = files[0].clone();
    let reader = {
        let running = running.clone();
        std::thread::spawn(move || {
            let mut s = hf_tests::connect_small_rcvbuf(p, 32 * 1024).expect("connect");
            s.write_all(
                format!("GET http://{web}{path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .expect("send");
            let r = hf_tests::paced_read_to_end(s, 5e6, Arc::default());
            running.fetch_sub(1, Ordering::Relaxed);
            r
        })
    };
    let kills = kill_while(&mut k, Duration::from_millis(250), 12, || {
        running.load(Ordering::Relaxed) > 0
    });
    for c in curls {
        let ((code, _, err), got) = c.join().expect("curl thread");
        assert_eq!(code, 0, "curl: {err}\nkeeper log (end):\n{}", log_tail(&k));
        assert!(
            got == want,
            "download differs: {} bytes of {}",
            got.len(),
            want.len()
        );
    }
    let got = reader
        .join()
        .expect("reader")
        .unwrap_or_else(|e| panic!("{e}\n{}", log_tail(&k)));
    let h = got.windows(4).position(|w| w == b"\r\n\r\n").expect("head") + 4;
    assert!(got.starts_with(b"HTTP/1.1 200 OK\r\n"));
    assert!(
        got[h..] == big[..],
        "slow read: {} body bytes of {}",
        got.len() - h,
        big.len()
    );
    let s = k.status().unwrap();
    eprintln!(
        "{kills} kills, {} restarts, {} connections recovered",
        s.restarts, s.recovered_connections
    );
    assert!(
        kills >= 4 && s.restarts >= 4,
        "only {} restarts",
        s.restarts
    );
    assert!(
        s.recovered_connections >= 4,
        "recovered {}",
        s.recovered_connections
    );
}

/// A POST written to the origin before a crash is never written again.
///
/// 16 keep-alive clients POST (bodies of 0 to 300 kB, by length or chunked,
/// some with `Expect: 100-continue`) to an origin that takes big bodies
/// slowly and answers in slow pieces, while the worker is killed every
/// ~80 ms: every POST is answered right and the origin saw each id exactly
/// once.
#[test]
fn posts_reach_the_origin_exactly_once_across_kills() {
    let origin = Origin::start();
    let mut k = start_proxy(&[]);
    let p = k.addr;
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..16)
        .map(|c| {
            let (stop, url) = (stop.clone(), origin.url("/post/"));
            std::thread::spawn(move || -> Result<Vec<String>, String> {
                let mut cl = Client::connect(p).map_err(|e| format!("client {c}: {e}"))?;
                let mut sent = Vec::new();
                let sizes = [0, 100, 5_000, 70_000, 300_000];
                for n in 0.. {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let id = format!("{c}-{n}");
                    let body = content(sizes[(c + n) % sizes.len()], (c * 1000 + n) as u64);
                    let (chunked, expect) = (n % 3 == 1, n % 4 == 2);
                    let mut head = format!("POST {url}{id} HTTP/1.1\r\nHost: x\r\n");
                    head += &if chunked {
                        "Transfer-Encoding: chunked\r\n".to_owned()
                    } else {
                        format!("Content-Length: {}\r\n", body.len())
                    };
                    if expect {
                        head += "Expect: 100-continue\r\n";
                    }
                    head += "\r\n";
                    let fail = |what: &str, e: &dyn std::fmt::Display| {
                        format!("client {c} POST {id}: {what}: {e}")
                    };
                    cl.send(head.as_bytes())
                        .map_err(|e| fail("send head", &e))?;
                    sent.push(id.clone());
                    // A body follows (if only `0\r\n\r\n`): the proxy says go on.
                    if expect && (chunked || !body.is_empty()) {
                        let r = cl
                            .read_response(true)
                            .map_err(|e| fail("100 Continue", &e))?;
                        if r.status != 100 {
                            return Err(fail("interim status", &r.status));
                        }
                    }
                    if chunked {
                        for piece in body.chunks(40_000) {
                            cl.send(format!("{:x}\r\n", piece.len()).as_bytes())
                                .and_then(|_| cl.send(piece))
                                .and_then(|_| cl.send(b"\r\n"))
                                .map_err(|e| fail("send chunk", &e))?;
                        }
                        cl.send(b"0\r\n\r\n").map_err(|e| fail("send end", &e))?;
                    } else {
                        cl.send(&body).map_err(|e| fail("send body", &e))?;
                    }
                    let r = cl.read_response(false).map_err(|e| fail("answer", &e))?;
                    if r.status != 200 || r.body != post_answer(&id, &body) {
                        return Err(fail("wrong answer, status", &r.status));
                    }
                }
                Ok(sent)
            })
        })
        .collect();
    let t0 = Instant::now();
    let kills = kill_while(&mut k, Duration::from_millis(80), 60, || {
        t0.elapsed() < Duration::from_secs(5)
    });
    stop.store(true, Ordering::Relaxed);
    let (mut sent, mut errors) = (Vec::new(), Vec::new());
    for c in clients {
        match c.join().expect("client thread") {
            Ok(ids) => sent.extend(ids),
            Err(e) => errors.push(e),
        }
    }
    let seen = origin.posts.lock().unwrap().clone();
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n != 1).collect();
    assert!(
        twice.is_empty() && errors.is_empty(),
        "ids the origin got more than once: {twice:?}\nclient errors: {errors:#?}\nkeeper log (end):\n{}",
        log_tail(&k)
    );
    for id in &sent {
        assert_eq!(seen.get(id), Some(&1), "POST {id} never reached the origin");
    }
    assert_eq!(seen.len(), sent.len());
    let s = k.status().unwrap();
    eprintln!(
        "{} POSTs, {kills} kills, {} restarts, {} recovered",
        sent.len(),
        s.restarts,
        s.recovered_connections
    );
    assert!(s.restarts >= 20, "only {} restarts", s.restarts);
    assert!(sent.len() > 200, "only {} POSTs", sent.len());
}

/// A tunnel carrying an echo protocol, 8 MB each way, across kills: every
/// byte comes back once, in order, and the tunnel closes cleanly after the
/// client does. The client writes as fast as it can, the origin takes 3 MB/s:
/// past the first few megabytes (the proxy's send buffer) kills land while
/// the proxy waits to hand on bytes it has read.
#[test]
fn tunnel_survives_kills_byte_exact() {
    let echo = start_echo(3e6);
    let mut k = start_proxy(&[]);
    let s = connect_tunnel(k.addr, echo);
    let total = 8_000_000;
    let data = Arc::new(content(total, 99));
    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let (mut s, data) = (s.try_clone().unwrap(), data.clone());
        std::thread::spawn(move || {
            let (mut off, mut i) = (0, 0usize);
            while off < data.len() {
                let n = (1 + i * 7919 % 48_000).min(data.len() - off);
                s.write_all(&data[off..off + n])
                    .expect("write to the tunnel");
                off += n;
                i += 1;
            }
            s.shutdown(Shutdown::Write).expect("half-close");
        })
    };
    let reader = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut s = s;
            let mut got = Vec::with_capacity(total);
            let r = s.read_to_end(&mut got);
            done.store(true, Ordering::Relaxed);
            r.map(|_| got)
        })
    };
    let kills = kill_while(&mut k, Duration::from_millis(200), 12, || {
        !done.load(Ordering::Relaxed)
    });
    writer.join().expect("writer");
    let got = reader
        .join()
        .expect("reader")
        .unwrap_or_else(|e| panic!("read: {e}\n{}", log_tail(&k)));
    assert_eq!(got.len(), total, "echoed bytes");
    assert!(got == *data, "echo differs");
    let s = k.status().unwrap();
    assert!(
        kills >= 5 && s.restarts >= 5,
        "only {} restarts",
        s.restarts
    );
    assert!(s.recovered_connections >= 5);
}

// ---------------------------------------------------------------------------
// 3. Failures.

/// Unreachable origin → 502, silent origin → 504 (short timeout), origin
/// that hangs up → 502 (before the answer) or a closed connection (after
/// part of it), malformed requests → 400, huge heads → 431; the proxy, run
/// alone this time, keeps serving.
#[test]
fn upstream_failures_and_bad_requests_get_error_answers() {
    let origin = Origin::start();
    let (child, p) = start_pass_through(Command::new(bin("hf-proxy")).args([
        "--listen",
        "127.0.0.1:0",
        "--upstream-timeout-ms",
        "400",
    ]));
    let _proxy = Proc(child);
    let status = |url: &str| {
        let (code, out, err) = curl(p, &["-o", "/dev/null", "-w", "%{http_code}", url]);
        assert_eq!(code, 0, "{url}: {err}");
        out
    };

    assert_eq!(status(&format!("http://127.0.0.1:{}/", free_port())), "502");
    let t0 = Instant::now();
    assert_eq!(status(&origin.url("/hang")), "504");
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "504 after {:?}",
        t0.elapsed()
    );
    assert_eq!(status(&origin.url("/close")), "502");
    let (code, _, _) = curl(p, &["-o", "/dev/null", &origin.url("/truncate")]);
    assert_eq!(
        code, 18,
        "a cut answer is a cut connection (curl: partial file)"
    );

    for raw in [
        &b"GARBAGE\r\n\r\n"[..],
        b"GET /origin-form HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET http://h:0/ HTTP/1.1\r\n\r\n",
        b"POST http://127.0.0.1:1/ HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
    ] {
        let got = raw_exchange(p, raw);
        assert!(
            got.starts_with("HTTP/1.1 400 "),
            "{:?} → {got:?}",
            String::from_utf8_lossy(raw)
        );
    }
    let mut huge = format!("GET {} HTTP/1.1\r\nX-Big: ", origin.url("/n/1")).into_bytes();
    huge.resize(100_000, b'a');
    huge.extend_from_slice(b"\r\n\r\n");
    let got = raw_exchange(p, &huge);
    assert!(got.starts_with("HTTP/1.1 431 "), "{got:?}");

    assert_eq!(status(&origin.url("/n/ok")), "200", "still serving");
}

/// Connections through the proxy survive upgrades of the proxy: a keep-alive
/// client fetching files over and over, and a CONNECT tunnel carrying an
/// echo conversation, through two `holdfast upgrade`s; every byte exact,
/// and the old versions gone while both go on (they moved at commit points
/// with their upstream connections).
#[test]
fn keepalive_and_tunnel_survive_upgrades() {
    let site = TempDir::new("proxy-up-site");
    let (_httpd, web, files) = start_httpd(site.path(), &[200_000, 3000]);
    let echo = start_echo(4e6);
    let mut k = start_proxy(&[]);
    let p = k.addr;
    let stop = Arc::new(AtomicBool::new(false));
    let fetcher = {
        let (stop, files) = (stop.clone(), files.clone());
        std::thread::spawn(move || {
            let mut c = Client::connect(p).expect("connect proxy");
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let (path, want) = &files[n % files.len()];
                let r = c
                    .get(&format!("http://{web}{path}"))
                    .unwrap_or_else(|e| panic!("GET {n}: {e}"));
                assert_eq!(r.status, 200, "GET {n}");
                assert!(r.body == *want, "GET {n}: body differs");
                n += 1;
            }
            n
        })
    };
    let talker = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut s = connect_tunnel(p, echo);
            let mut back = s.try_clone().expect("clone");
            let (mut sent, mut got) = (0usize, 0usize);
            let mut buf = vec![0u8; 16 * 1024];
            while !stop.load(Ordering::Relaxed) {
                let piece = content(8 * 1024, sent as u64);
                s.write_all(&piece).expect("tunnel write");
                sent += piece.len();
                let mut echoed = Vec::new();
                while echoed.len() < piece.len() {
                    let n = back.read(&mut buf).expect("tunnel read");
                    assert!(n > 0, "tunnel closed after {got} bytes");
                    echoed.extend_from_slice(&buf[..n]);
                }
                assert!(echoed == piece, "echo differs after {got} bytes");
                got += echoed.len();
            }
            got
        })
    };
    let proxy = bin("hf-proxy").display().to_string();
    for gen in 2..=3u32 {
        std::thread::sleep(Duration::from_millis(300));
        let (code, out, err) = k.upgrade(&[], &[&proxy]);
        assert_eq!(code, 0, "upgrade to generation {gen}: {out}{err}");
        k.wait_for("the older versions to hand over and exit", |s| {
            s.workers.iter().all(|w| w.generation == gen)
        });
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let gets = fetcher.join().expect("fetcher");
    let echoed = talker.join().expect("talker");
    assert!(
        gets > 10 && echoed > 64 * 1024,
        "{gets} GETs, {echoed} bytes echoed"
    );
    let s = k.status().unwrap();
    assert_eq!((s.upgrades, s.restarts), (2, 0), "{s:?}");
}

/// Issue: hf-proxy answered an HTTP/1.0 request with `Connection:
/// Keep-Alive` with `Connection: close`. It now keeps such a connection
/// open and says so (`Connection: keep-alive`), as HTTP/1.0 clients need.
#[test]
fn http10_keep_alive_is_kept() {
    let site = TempDir::new("proxy-10");
    let (_httpd, web, files) = start_httpd(site.path(), &[3000]);
    let k = start_proxy(&[]);
    let mut s = TcpStream::connect(k.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let (path, want) = &files[0];
    for round in 0..3 {
        s.write_all(
            format!("GET http://{web}{path} HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").as_bytes(),
        )
        .unwrap();
        let mut buf = Vec::new();
        let end = fill_until(&mut s, &mut buf, b"\r\n\r\n")
            .unwrap()
            .unwrap_or_else(|| panic!("round {round}: the connection closed"));
        let (status, headers) = split_head(&String::from_utf8_lossy(&buf[..end]));
        assert_eq!(status, "200", "round {round}");
        let conn = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("connection"))
            .map(|(_, v)| v.to_ascii_lowercase());
        assert_eq!(
            conn.as_deref(),
            Some("keep-alive"),
            "round {round}: {headers:?}"
        );
        while buf.len() < end + want.len() {
            assert!(read_more(&mut s, &mut buf, 1 << 16).unwrap() > 0);
        }
        assert!(
            buf[end..end + want.len()] == want[..],
            "round {round}: body"
        );
    }
}
