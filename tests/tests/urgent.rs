//! TCP urgent data (`send(MSG_OOB)`): a service under holdfast receives it
//! inline, as the ordinary byte it is in the stream, exactly as it does
//! without a keeper, and every position the library and a new worker
//! compute stays exact while an urgent byte is pending or after it was
//! read. Python's `ftplib.FTP.abort()` sends `ABOR\r\n` this way.

use std::io::{BufRead, BufReader, Read};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use hf_tests::http::{make_site, parse_all, Client};
use hf_tests::testsvc::{answer, keeper, LineClient};
use hf_tests::{
    bin, eventually, kill9, start_pass_through, wait_exit, Keeper, Phase, Proc, Role, Snapshot,
    TempDir,
};

/// Sends `bytes` with `MSG_OOB`: the kernel sends them as one segment whose
/// urgent pointer marks the last byte.
fn send_urgent(s: &TcpStream, bytes: &[u8]) {
    let n = rustix::net::send(s, bytes, rustix::net::SendFlags::OOB).expect("send MSG_OOB");
    assert_eq!(n, bytes.len(), "short MSG_OOB send");
}

/// Sends `REQ id len 0` with its urgent byte inside the line (the last
/// digit of `len`), then the rest of the line plainly, and checks the
/// answer byte for byte: the service must have read the line as sent.
fn urgent_request(c: &mut LineClient, id: u64, len: usize) {
    let line = format!("REQ {id} {len} 0\n");
    let cut = line.find(" 0\n").expect("line");
    send_urgent(c.stream(), &line.as_bytes()[..cut]);
    c.send(&line[cut..]);
    c.expect(
        &answer(id, len, 0),
        &format!("answer to REQ {id} {len} 0 with an urgent byte inside"),
    );
}

/// Sends `REQ id len 0` with a doubled space whose second space is the
/// urgent byte, and a space after the line (the next line starts with it),
/// then checks the answer. The service reads the same request whether the
/// urgent byte reaches it or not, and whether a space is read twice or not:
/// this framing gets past the urgent byte even where it is mishandled, so
/// the tests using it check what comes later (discards, a recovery).
fn urgent_spaced_request(c: &mut LineClient, id: u64, len: usize) {
    send_urgent(c.stream(), format!("REQ {id} {len}  ").as_bytes());
    c.send("0\n ");
    c.expect(
        &answer(id, len, 0),
        &format!("answer to REQ {id} {len} 0 with an urgent space"),
    );
}

/// Asks `QUIT` and checks that `BYE` is the only thing left on the
/// connection: no request answered twice, no stray answer.
fn quit_cleanly(c: &mut LineClient, id: u64) {
    c.send(&format!("QUIT {id}\n"));
    c.expect(format!("BYE {id}\n").as_bytes(), "answer to QUIT");
    c.expect_eof(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("after QUIT: {e}"));
}

/// An urgent byte inside a request reaches the service once, in place:
/// no extra `ERR` answer, every answer exactly once (issue: the urgent byte
/// was skipped by the peek while the peek offset lagged one byte, so the
/// last byte of the next read arrived twice).
#[test]
fn urgent_byte_inside_a_request_is_read_once_in_place() {
    let k = keeper(&[], &[]);
    let mut c = LineClient::connect(k.addr, "urgent");
    c.request(1, 100, 0);
    urgent_request(&mut c, 2, 100);
    c.request(3, 100, 0);
    urgent_request(&mut c, 4, 10);
    urgent_request(&mut c, 5, 10);
    c.request(6, 10, 0);
    quit_cleanly(&mut c, 7);
    assert_eq!(k.status().unwrap().restarts, 0, "{}", k.log());
}

/// Input well past the library's discard batch (4 KiB) after an urgent
/// byte: every request is answered and the connection stays open (issue:
/// it was closed, with nothing in the log).
#[test]
fn input_past_the_discard_batch_after_an_urgent_byte_is_all_answered() {
    let k = keeper(&[], &[]);
    let mut c = LineClient::connect(k.addr, "urgent-then-8k");
    urgent_spaced_request(&mut c, 1, 10);
    // Pipelined, in one write: 8 KiB of requests, then their answers.
    let (mut lines, mut want) = (String::new(), Vec::new());
    let mut id = 2;
    while lines.len() < 8 * 1024 {
        lines.push_str(&format!("REQ {id} 20 0\n"));
        want.extend_from_slice(&answer(id, 20, 0));
        id += 1;
    }
    c.send(&lines);
    c.expect(&want, "answers to 8 KiB of requests after an urgent byte");
    quit_cleanly(&mut c, id);
    assert!(
        !k.log().contains("closing connection"),
        "a connection was closed:\n{}",
        k.log()
    );
}

/// A worker killed after urgent data went through: the new worker starts
/// exactly at the last commit, also with an urgent byte still queued
/// (issue: the kernel's queue length stopped at the urgent mark, so the
/// consumed position computed from it was wrong, and 19 answered requests
/// were answered again). Both library flavours.
#[test]
fn kill_after_urgent_data_answers_no_request_twice() {
    for flavour in [&[][..], &["--tokio"][..]] {
        let mut k = keeper(&[], flavour);
        let mut c = LineClient::connect(k.addr, format!("kill-after-urgent {flavour:?}"));
        c.request(1, 10, 0);
        urgent_spaced_request(&mut c, 2, 10);
        for id in 3..=21 {
            c.request(id, 10, 0);
        }
        k.kill_and_wait();
        c.request(22, 10, 0);
        // An urgent byte not yet read when the worker dies.
        send_urgent(c.stream(), b"REQ 23 10  ");
        k.kill_and_wait();
        c.send("0\n");
        c.expect(&answer(23, 10, 0), "answer to REQ 23 sent across a kill");
        urgent_spaced_request(&mut c, 24, 10);
        c.request(25, 10, 0);
        quit_cleanly(&mut c, 26);
        assert_eq!(k.status().unwrap().restarts, 2, "{}", k.log());
    }
}

/// The same service alone (pass-through) reads the urgent byte inline too:
/// with and without holdfast it receives the same bytes.
#[test]
fn urgent_byte_reaches_a_service_without_keeper_inline() {
    let (child, addr) =
        start_pass_through(Command::new(bin("hf-testsvc")).args(["--listen", "127.0.0.1:0"]));
    let _child = Proc(child);
    let mut c = LineClient::connect(addr, "urgent-alone");
    c.request(1, 10, 0);
    urgent_request(&mut c, 2, 10);
    c.request(3, 10, 0);
    quit_cleanly(&mut c, 4);
}

/// ftplib's side: `abort()` (ABOR with `MSG_OOB`), `MKD`, then, once the
/// test has killed the worker, the next commands get their own replies.
const FTPLIB: &str = r#"
import ftplib, os, sys, time
port, go = sys.argv[1], sys.argv[2]
f = ftplib.FTP(timeout=15)
f.connect('127.0.0.1', int(port))
f.login('alice', 'secret')
resp = f.abort()
assert resp[:3] in ('225', '226'), resp
assert f.mkd('once') == '/once'
print('ready', flush=True)
deadline = time.time() + 30
while not os.path.exists(go):
    assert time.time() < deadline, 'never told to go on'
    time.sleep(0.01)
# A "550 ... already exists" or a second 257 here: the MKD ran again.
assert f.mkd('twice') == '/twice'
assert f.pwd() == '/'
assert f.sendcmd('NOOP').startswith('200')
assert f.quit().startswith('221')
print('ok', flush=True)
"#;

/// hf-ftpd: ftplib's `abort()`, a `MKD`, a SIGKILL of the worker: the new
/// worker does not run the commands since the `ABOR` again (issue: `550
/// Create directory failed: already exists`, then a second `257`).
#[test]
fn ftplib_abort_then_a_kill_runs_no_command_twice() {
    let dir = TempDir::new("ftp-urgent");
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    std::fs::write(dir.path().join("users"), "alice:secret\n").unwrap();
    std::fs::write(dir.path().join("abort.py"), FTPLIB).unwrap();
    let go = dir.path().join("go");
    let ftpd = bin("hf-ftpd").display().to_string();
    let (root_s, users) = (
        root.display().to_string(),
        dir.path().join("users").display().to_string(),
    );
    let mut k = Keeper::start(&[], &[&ftpd, "--root", &root_s, "--users", &users]);
    let mut py = Proc(
        Command::new("python3")
            .arg(dir.path().join("abort.py"))
            .arg(k.addr.port().to_string())
            .arg(&go)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("python3"),
    );
    let mut out = BufReader::new(py.0.stdout.take().expect("stdout"));
    let mut err = py.0.stderr.take().expect("stderr");
    let mut line = String::new();
    out.read_line(&mut line).expect("driver output");
    if line.trim() != "ready" {
        let mut e = String::new();
        let _ = err.read_to_string(&mut e);
        panic!(
            "ftplib driver before the kill: {line:?}\n{e}\nserver log:\n{}",
            k.log()
        );
    }
    k.kill_and_wait();
    std::fs::write(&go, b"").unwrap();
    let st = wait_exit(&mut py.0, Duration::from_secs(30));
    let mut rest = String::new();
    let _ = out.read_to_string(&mut rest);
    let mut e = String::new();
    let _ = err.read_to_string(&mut e);
    assert!(
        matches!(st, Some(s) if s.success()) && rest.trim() == "ok",
        "ftplib driver after the kill ({st:?}): {rest}\n{e}\nserver log:\n{}",
        k.log()
    );
    assert!(root.join("once").is_dir() && root.join("twice").is_dir());
}

/// hf-httpd: a request carrying an urgent byte, a kill, then one more
/// request gets exactly one response (issue: it got four).
#[test]
fn http_get_after_urgent_data_and_a_kill_gets_one_response() {
    let dir = TempDir::new("http-urgent");
    let files = make_site(dir.path(), &[10, 1000]);
    let root = dir.path().display().to_string();
    let httpd = bin("hf-httpd").display().to_string();
    let mut k = Keeper::start(&[], &[&httpd, "--root", &root]);
    let mut c = Client::connect(k.addr).expect("connect");
    let (path, want) = &files[0];
    let head = format!("GET {path} HTTP/1.1\r\nHost: t");
    send_urgent(c.stream(), head.as_bytes());
    c.send(b"est\r\n\r\n").unwrap();
    let r = c
        .read_response(false)
        .expect("response with an urgent byte");
    assert_eq!((r.status, &r.body), (200, want));
    let r = c.get(path).expect("plain response");
    assert_eq!((r.status, &r.body), (200, want));
    k.kill_and_wait();
    let (path, want) = &files[1];
    c.send(format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes())
        .unwrap();
    let mut raw = Vec::new();
    c.stream()
        .read_to_end(&mut raw)
        .expect("read to the end after the kill");
    let rs = parse_all(&raw, &[false]).unwrap_or_else(|e| {
        panic!(
            "after the kill: {e}; {} bytes: {:?}\nserver log:\n{}",
            raw.len(),
            String::from_utf8_lossy(&raw[..raw.len().min(400)]),
            k.log()
        )
    });
    assert_eq!((rs[0].status, &rs[0].body), (200, want));
}

/// Plays systemd: binds a listener, says its port, waits for the test to
/// queue a connection on it, then execs the keeper with the listener at
/// fd 3 (`LISTEN_FDS`). `python3 - DIR holdfast ARGS...`
const ACTIVATE: &str = r#"
import os, socket, sys, time
d = sys.argv[1]
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.bind(("127.0.0.1", 0))
s.listen(128)
with open(os.path.join(d, "port.tmp"), "w") as f:
    f.write(str(s.getsockname()[1]))
os.rename(os.path.join(d, "port.tmp"), os.path.join(d, "port"))
deadline = time.time() + 30
while not os.path.exists(os.path.join(d, "go")):
    assert time.time() < deadline, "never told to go on"
    time.sleep(0.01)
if s.fileno() != 3:
    os.dup2(s.fileno(), 3)
os.set_inheritable(3, True)
env = dict(os.environ, LISTEN_FDS="1", LISTEN_PID=str(os.getpid()))
os.execve(sys.argv[2], sys.argv[2:], env)
"#;

/// A connection that completed its handshake on a socket-activated
/// listener before the keeper started, so before the keeper could give the
/// listener the flag, with an urgent byte already queued: the worker that
/// adopts it still reads the byte inline, in place, and a kill after it
/// repeats nothing.
#[test]
fn urgent_byte_queued_before_socket_activation_is_read_in_place() {
    let dir = TempDir::new("urgent-activation");
    let control = dir.path().join("control.sock");
    let mut keeper = Proc(
        Command::new("python3")
            .arg("-c")
            .arg(ACTIVATE)
            .arg(dir.path())
            .arg(bin("holdfast"))
            .args(["run", "--control"])
            .arg(&control)
            .arg("--")
            .arg(bin("hf-testsvc"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3"),
    );
    let port: u16 = eventually(Duration::from_secs(20), "the listener's port", || {
        std::fs::read_to_string(dir.path().join("port"))
            .ok()?
            .parse()
            .ok()
    });
    let mut c = LineClient::connect(([127, 0, 0, 1], port).into(), "queued");
    let line = "REQ 1 10 0\n";
    send_urgent(c.stream(), &line.as_bytes()[..8]);
    c.send(&line[8..]);
    std::fs::write(dir.path().join("go"), b"").unwrap();
    let active = |s: &Snapshot| {
        (s.phase == Phase::Serving)
            .then(|| s.workers.iter().find(|w| w.role == Role::Active))
            .flatten()
            .map(|w| w.pid)
    };
    let pid = eventually(Duration::from_secs(20), "an active worker", || {
        active(&hf_keeper::status::query(&control).ok()?)
    });
    c.expect(&answer(1, 10, 0), "answer to the queued REQ 1");
    c.request(2, 10, 0);
    kill9(pid);
    eventually(Duration::from_secs(20), "a new active worker", || {
        active(&hf_keeper::status::query(&control).ok()?).filter(|p| *p != pid)
    });
    c.request(3, 10, 0);
    quit_cleanly(&mut c, 4);
    let _ = keeper.0.kill();
}

/// An FTP control connection: commands and their replies' codes.
struct Ftp(BufReader<TcpStream>);

impl Ftp {
    fn connect(addr: std::net::SocketAddr) -> Ftp {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut c = Ftp(BufReader::new(s));
        assert_eq!(c.reply().0, 220);
        c
    }

    /// One reply: its code and its last line.
    fn reply(&mut self) -> (u16, String) {
        loop {
            let mut line = String::new();
            let n = self.0.read_line(&mut line).expect("FTP reply");
            assert!(n > 0, "control connection closed");
            let b = line.as_bytes();
            if b.len() >= 4 && b[..3].iter().all(u8::is_ascii_digit) && b[3] == b' ' {
                return (line[..3].parse().unwrap(), line);
            }
        }
    }

    fn cmd(&mut self, line: &str, want: u16) -> String {
        std::io::Write::write_all(self.0.get_mut(), format!("{line}\r\n").as_bytes()).unwrap();
        let (code, text) = self.reply();
        assert_eq!(code, want, "{line:?} → {text:?}");
        text
    }
}

/// hf-ftpd: uploads whose data connection carries urgent bytes, one still
/// queued when the worker is killed, on an active (the service connects)
/// and a passive (the keeper accepts) data connection: the stored file is
/// exactly the bytes sent, urgent ones in place.
#[test]
fn upload_with_urgent_bytes_across_a_kill_is_stored_exactly() {
    let dir = TempDir::new("ftp-urgent-stor");
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    std::fs::write(dir.path().join("users"), "alice:secret\n").unwrap();
    let ftpd = bin("hf-ftpd").display().to_string();
    let (root_s, users) = (
        root.display().to_string(),
        dir.path().join("users").display().to_string(),
    );
    let mut k = Keeper::start(&[], &[&ftpd, "--root", &root_s, "--users", &users]);
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    for active in [true, false] {
        let name = if active { "port.bin" } else { "pasv.bin" };
        let mut c = Ftp::connect(k.addr);
        c.cmd("USER alice", 331);
        c.cmd("PASS secret", 230);
        c.cmd("TYPE I", 200);
        let mut d = if active {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let p = l.local_addr().unwrap().port();
            c.cmd(&format!("PORT 127,0,0,1,{},{}", p >> 8, p & 0xff), 200);
            c.cmd(&format!("STOR {name}"), 150);
            l.accept().unwrap().0
        } else {
            let text = c.cmd("PASV", 227);
            let inner = &text[text.find('(').unwrap() + 1..text.find(')').unwrap()];
            let n: Vec<u16> = inner
                .split(',')
                .map(|x| x.trim().parse().unwrap())
                .collect();
            let d = TcpStream::connect(("127.0.0.1", n[4] << 8 | n[5])).unwrap();
            c.cmd(&format!("STOR {name}"), 150);
            d
        };
        std::io::Write::write_all(&mut d, &data[..100_000]).unwrap();
        send_urgent(&d, &data[100_000..100_010]);
        std::io::Write::write_all(&mut d, &data[100_010..200_000]).unwrap();
        send_urgent(&d, &data[200_000..200_001]);
        k.kill_and_wait();
        std::io::Write::write_all(&mut d, &data[200_001..]).unwrap();
        drop(d);
        assert_eq!(c.reply().0, 226, "{name}:\n{}", k.log());
        let got = std::fs::read(root.join(name)).unwrap();
        assert_eq!(got.len(), data.len(), "{name}: stored length");
        assert!(got == data, "{name}: stored bytes differ");
        c.cmd("QUIT", 221);
    }
    assert_eq!(k.status().unwrap().restarts, 2, "{}", k.log());
}
