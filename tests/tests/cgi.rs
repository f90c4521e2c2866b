//! CGI under holdfast: real programs (the examples in
//! `services/hf-httpd/cgi-bin`), real clients (curl and our own), workers
//! killed while programs start and run. Every program runs exactly once per
//! request — its side effect, a line in a ledger file, proves it — and every
//! response arrives whole.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hf_tests::http::Client;
use hf_tests::{bin, run_cmd, Keeper, TempDir};

/// A document root with an index page and a CGI directory holding copies
/// of the example programs (their ledger goes there).
fn site() -> (TempDir, PathBuf, PathBuf) {
    let tmp = TempDir::new("cgi");
    let www = tmp.path().join("www");
    let cgi = tmp.path().join("cgi");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::create_dir_all(&cgi).unwrap();
    std::fs::write(www.join("index.html"), "<p>index</p>\n").unwrap();
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../services/hf-httpd/cgi-bin");
    for e in std::fs::read_dir(&examples).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), cgi.join(e.file_name())).unwrap();
    }
    std::fs::write(cgi.join("not-executable"), "#!/bin/sh\necho x\n").unwrap();
    (tmp, www, cgi)
}

fn keeper(www: &Path, cgi: &Path, extra: &[&str]) -> Keeper {
    let httpd = bin("hf-httpd");
    let mut cmd = vec![
        httpd.to_str().unwrap(),
        "--root",
        www.to_str().unwrap(),
        "--cgi-dir",
        cgi.to_str().unwrap(),
    ];
    cmd.extend_from_slice(extra);
    Keeper::start(&[], &cmd)
}

/// What `ledger.py` sends for `id` and `size`.
fn ledger_body(id: &str, size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(size + 32);
    while out.len() < size {
        let line = format!("{id}:{:010}\n", out.len());
        out.extend_from_slice(line.as_bytes());
    }
    out.truncate(size);
    out
}

/// The ledger's lines, counted.
fn ledger(cgi: &Path) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for l in std::fs::read_to_string(cgi.join("ledger.txt"))
        .unwrap_or_default()
        .lines()
    {
        *m.entry(l.to_owned()).or_default() += 1;
    }
    m
}

fn curl(args: &[&str]) -> String {
    let (code, out, err) = run_cmd(
        Command::new("curl")
            .args(["-s", "-S", "--max-time", "20"])
            .args(args),
    );
    assert_eq!(code, 0, "curl {args:?}: {err}");
    out
}

fn url(addr: SocketAddr, path: &str) -> String {
    format!("http://{addr}{path}")
}

#[test]
fn curl_gets_cgi_and_static_answers() {
    let (_tmp, www, cgi) = site();
    let mut k = keeper(&www, &cgi, &[]);
    let a = k.addr;
    // Programs' channels are pipes and memfds: count what the keeper holds.
    let proc_fd = format!("/proc/{}/fd", k.pid());
    let channels = || {
        std::fs::read_dir(&proc_fd)
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .map(|l| l.to_string_lossy().into_owned())
            .filter(|l| l.starts_with("pipe:") || l.contains("pipe-spool"))
            .collect::<Vec<_>>()
    };
    let channels_before = channels();

    assert_eq!(curl(&[&url(a, "/index.html")]), "<p>index</p>\n");

    let env = curl(&[
        "-H",
        "X-Test: yes",
        &url(a, "/cgi-bin/env.py/x/y%20z?a=1&b=2"),
    ]);
    for want in [
        "GATEWAY_INTERFACE=CGI/1.1",
        "REQUEST_METHOD=GET",
        "SCRIPT_NAME=/cgi-bin/env.py",
        "PATH_INFO=/x/y z",
        "QUERY_STRING=a=1&b=2",
        "SERVER_PROTOCOL=HTTP/1.1",
        "REMOTE_ADDR=127.0.0.1",
        "HTTP_X_TEST=yes",
        &format!("SERVER_PORT={}", a.port()),
    ] {
        assert!(
            env.lines().any(|l| l == want),
            "{want} missing from:\n{env}"
        );
    }

    // The body reaches the program on standard input.
    let body: String = (0..20_000)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let echoed = curl(&[
        "-H",
        "Content-Type: text/plain",
        "--data-binary",
        &body,
        &url(a, "/cgi-bin/echo.py"),
    ]);
    assert_eq!(echoed, body);

    // Status, Location and a response that is not CGI.
    let head = curl(&["-i", &url(a, "/cgi-bin/not-found.sh")]);
    assert!(head.starts_with("HTTP/1.1 404 Not Here\r\n"), "{head}");
    assert!(head.ends_with("no such thing\n"), "{head}");
    let head = curl(&["-i", &url(a, "/cgi-bin/redirect.sh")]);
    assert!(head.starts_with("HTTP/1.1 302 Found\r\n"), "{head}");
    assert!(head.contains("Location: /index.html\r\n"), "{head}");
    let head = curl(&["-i", &url(a, "/cgi-bin/broken.sh")]);
    assert!(head.starts_with("HTTP/1.1 502 Bad Gateway\r\n"), "{head}");

    // Chunked for HTTP/1.1, close-delimited for HTTP/1.0; several requests
    // on one keep-alive connection.
    let u1 = url(a, "/cgi-bin/ledger.py?id=c1&size=70000&pieces=7");
    let u2 = url(a, "/cgi-bin/ledger.py?id=c2&size=500");
    let both = curl(&[&u1, &u2]);
    let mut want = ledger_body("c1", 70_000);
    want.extend(ledger_body("c2", 500));
    assert!(both.as_bytes() == want, "two keep-alive answers differ");
    let old = curl(&[
        "-0",
        "-i",
        &url(a, "/cgi-bin/ledger.py?id=c3&size=3000&pieces=3"),
    ]);
    assert!(
        old.contains("Connection: close\r\n") && !old.contains("chunked"),
        "{old}"
    );
    assert!(old.ends_with(std::str::from_utf8(&ledger_body("c3", 3000)).unwrap()));
    let l = ledger(&cgi);
    assert_eq!(l.values().sum::<usize>(), 3);
    assert!(
        ["c1", "c2", "c3"].iter().all(|id| l.get(*id) == Some(&1)),
        "{l:?}"
    );
    // The keeper let go of every connection and every program's channels.
    k.wait_for("every connection closed", |s| s.connections == 0);
    assert_eq!(
        channels(),
        channels_before,
        "the keeper holds channels of finished programs"
    );
}

#[test]
fn bad_cgi_requests_get_clear_errors() {
    let (_tmp, www, cgi) = site();
    let k = keeper(&www, &cgi, &["--cgi-max-body", "1000"]);
    let a = k.addr;
    let code = |args: &[&str]| curl(&[&["-o", "/dev/null", "-w", "%{http_code}"], args].concat());
    assert_eq!(code(&[&url(a, "/cgi-bin/nope")]), "404");
    assert_eq!(code(&[&url(a, "/cgi-bin/not-executable")]), "403");
    assert_eq!(
        code(&["--path-as-is", &url(a, "/cgi-bin/../../../etc/passwd")]),
        "404"
    );
    assert_eq!(code(&[&url(a, "/cgi-bin/..%2F..%2Fetc%2Fpasswd")]), "404");
    assert_eq!(
        code(&[
            "--data-binary",
            &"x".repeat(2000),
            &url(a, "/cgi-bin/echo.py")
        ]),
        "413"
    );
    assert_eq!(
        code(&[
            "-H",
            "Transfer-Encoding: chunked",
            "--data-binary",
            "abc",
            &url(a, "/cgi-bin/echo.py")
        ]),
        "411"
    );
    assert_eq!(
        code(&["--data-binary", "abc", &url(a, "/index.html")]),
        "405"
    );
    // Still serving, nothing ran.
    assert_eq!(
        curl(&["--data-binary", "ok", &url(a, "/cgi-bin/echo.py")]),
        "ok"
    );
    assert!(ledger(&cgi).is_empty());
    assert_eq!(k.status().unwrap().restarts, 0);
}

/// The worker dies at each step of starting a program: after the request
/// is recorded as launching but before the program starts (the next worker
/// must start it), and right after it started (the next worker must not
/// start it again); and while the program has started but written nothing.
#[test]
fn program_starts_once_whenever_the_worker_dies() {
    for (point, wait_ms) in [
        ("cgi-before-spawn", 0),
        ("cgi-after-spawn", 0),
        ("none", 400),
    ] {
        let (tmp, www, cgi) = site();
        let flag = tmp.path().join("fault-fired");
        let fault = format!("{point}:{}", flag.display());
        let mut k = keeper(&www, &cgi, &["--fault", &fault]);
        let mut c = Client::connect(k.addr).unwrap();
        let id = format!("start-{point}");
        let path =
            format!("/cgi-bin/ledger.py?id={id}&size=50000&pieces=5&delay_ms=20&wait_ms={wait_ms}");
        c.send(format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
            .unwrap();
        if point == "none" {
            // The program appends to its ledger, then waits: kill then.
            hf_tests::eventually(Duration::from_secs(10), "the program to start", || {
                ledger(&cgi).contains_key(&id).then_some(())
            });
            k.kill_active();
        }
        let r = c.read_response(false).unwrap();
        assert_eq!(r.status, 200, "{point}");
        assert!(r.body == ledger_body(&id, 50_000), "{point}: body differs");
        assert_eq!(
            ledger(&cgi).get(&id),
            Some(&1),
            "{point}: ran {:?} times",
            ledger(&cgi)
        );
        // The connection goes on.
        assert_eq!(c.get("/index.html").unwrap().body, b"<p>index</p>\n");
        let s = k.status().unwrap();
        assert_eq!(s.restarts, 1, "{point}: the worker must have died once");
        if point != "none" {
            assert!(flag.exists(), "{point}: the fault did not fire");
        }
    }
}

/// 12 clients run a program that streams its answer slowly while workers
/// are killed every 120 ms: every answer is whole and byte-exact, and every
/// program ran exactly once.
#[test]
fn programs_run_once_and_answers_arrive_whole_under_kills() {
    let (_tmp, www, cgi) = site();
    let mut k = keeper(&www, &cgi, &[]);
    let addr = k.addr;
    let done = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..12)
        .map(|t| {
            std::thread::spawn(move || {
                let mut c = Client::connect(addr).unwrap();
                let mut ids = Vec::new();
                for r in 0..4 {
                    let id = format!("k{t}-{r}");
                    let size = 20_000 + t * 7_919 + r * 1_013;
                    let path =
                        format!("/cgi-bin/ledger.py?id={id}&size={size}&pieces=8&delay_ms=25");
                    let resp = c.get(&path).unwrap_or_else(|e| panic!("{id}: {e}"));
                    assert_eq!(resp.status, 200, "{id}");
                    assert!(resp.body == ledger_body(&id, size), "{id}: body differs");
                    ids.push(id);
                }
                ids
            })
        })
        .collect();
    let killer = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut kills = 0;
            let t0 = Instant::now();
            while !done.load(Ordering::Relaxed) && t0.elapsed() < Duration::from_secs(30) {
                std::thread::sleep(Duration::from_millis(120));
                k.kill_and_wait();
                kills += 1;
            }
            (k, kills)
        })
    };
    let mut ids: Vec<String> = clients
        .into_iter()
        .flat_map(|c| c.join().unwrap())
        .collect();
    done.store(true, Ordering::Relaxed);
    let (k, kills) = killer.join().unwrap();
    ids.sort();
    let l = ledger(&cgi);
    let twice: Vec<_> = l.iter().filter(|(_, n)| **n != 1).collect();
    assert!(
        twice.is_empty(),
        "programs that ran more than once: {twice:?}"
    );
    assert_eq!(l.keys().cloned().collect::<Vec<_>>(), ids);
    let s = k.status().unwrap();
    assert!(
        kills >= 5 && s.recovered_connections >= 5,
        "{kills} kills, {s:?}"
    );
}

/// A slow reader of a long program answer: the worker is often blocked in
/// the middle of a chunk when it dies, and the program has written more by
/// the time the next worker regenerates that chunk. The chunk sizes are
/// recorded, so the regenerated chunk is the same and the answer whole.
#[test]
fn slow_reader_of_a_long_program_answer_survives_kills() {
    use std::sync::atomic::AtomicUsize;
    let (_tmp, www, cgi) = site();
    let mut k = keeper(&www, &cgi, &[]);
    let size = 3_000_000;
    let mut s = hf_tests::connect_small_rcvbuf(k.addr, 16 * 1024).unwrap();
    std::io::Write::write_all(
        &mut s,
        format!(
            "GET /cgi-bin/ledger.py?id=slow&size={size}&pieces=300&delay_ms=1 HTTP/1.1\r\n\
             Host: t\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .unwrap();
    let progress = Arc::new(AtomicUsize::new(0));
    let reader = {
        let p = progress.clone();
        std::thread::spawn(move || hf_tests::paced_read_to_end(s, 4e6, p))
    };
    for at in [300_000, 900_000, 1_500_000, 2_100_000] {
        hf_tests::eventually(Duration::from_secs(20), "the download to progress", || {
            (progress.load(Ordering::Relaxed) >= at).then_some(())
        });
        k.kill_and_wait();
    }
    let raw = reader
        .join()
        .unwrap()
        .expect("the whole answer, then a clean close");
    let r = hf_tests::http::parse_all(&raw, &[false]).expect("one well-formed answer");
    assert!(r[0].body == ledger_body("slow", size), "body differs");
    assert_eq!(ledger(&cgi).get("slow"), Some(&1));
    assert_eq!(k.status().unwrap().restarts, 4);
}

/// A program's answer in progress survives what moves connections without
/// a crash: an upgrade to a new version (the answer goes on from the new
/// version at a commit point) and a re-exec of the keeper itself (the
/// program's pipe and spool pass through it); then a kill.
#[test]
fn program_answer_survives_upgrade_and_keeper_reexec() {
    let (_tmp, www, cgi) = site();
    let mut k = keeper(&www, &cgi, &[]);
    let mut c = Client::connect(k.addr).unwrap();
    let id = "moving";
    let size = 400_000;
    c.send(
        format!("GET /cgi-bin/ledger.py?id={id}&size={size}&pieces=60&delay_ms=40 HTTP/1.1\r\nHost: t\r\n\r\n")
            .as_bytes(),
    )
    .unwrap();
    hf_tests::eventually(Duration::from_secs(10), "the program to start", || {
        ledger(&cgi).contains_key(id).then_some(())
    });
    std::thread::sleep(Duration::from_millis(200));
    let httpd = bin("hf-httpd");
    let new = [
        httpd.to_str().unwrap(),
        "--root",
        www.to_str().unwrap(),
        "--cgi-dir",
        cgi.to_str().unwrap(),
        "--server-name",
        "v2",
    ];
    let (code, out, err) = k.upgrade(&[], &new);
    assert_eq!(code, 0, "upgrade: {out}{err}");
    // The answer moved at its next commit, long before the program ends
    // (60 pieces 40 ms apart): the old version holds nothing and is gone.
    let t0 = Instant::now();
    let s = k.wait_for("the old version to hand over and exit", |s| {
        s.workers.iter().all(|w| w.generation == 2)
    });
    assert!(
        t0.elapsed() < Duration::from_millis(500),
        "{:?} {s:?}",
        t0.elapsed()
    );
    std::thread::sleep(Duration::from_millis(150));
    let (code, out, err) = k.upgrade(&["--keeper"], &[]);
    assert_eq!(code, 0, "keeper re-exec: {out}{err}");
    std::thread::sleep(Duration::from_millis(150));
    k.kill_and_wait();
    let r = c.read_response(false).unwrap();
    assert_eq!(r.status, 200);
    assert!(r.body == ledger_body(id, size), "body differs");
    assert_eq!(ledger(&cgi).get(id), Some(&1));
    // The connection is the new version's now.
    let r = c.get("/index.html").unwrap();
    assert_eq!(r.header("Server"), Some("v2"));
    let s = k.status().unwrap();
    assert!(
        s.upgrades == 1 && s.keeper_execs == 1 && s.restarts >= 1,
        "{s:?}"
    );
}

/// A program whose output stops short of its Content-Length: the client's
/// answer ends there (a close it can tell), and the log has no false alarm
/// (it used to warn twice that the worker let go of channels of a
/// connection it did not own: the unhold came after the close).
#[test]
fn short_cgi_answer_closes_without_false_warnings() {
    use std::io::{Read, Write};
    use std::os::unix::fs::PermissionsExt;
    let (_tmp, www, cgi) = site();
    let short = cgi.join("short.sh");
    std::fs::write(
        &short,
        "#!/bin/sh\nprintf 'Content-Type: text/plain\\r\\nContent-Length: 100\\r\\n\\r\\nonly this'\n",
    )
    .unwrap();
    std::fs::set_permissions(&short, std::fs::Permissions::from_mode(0o755)).unwrap();
    let k = keeper(&www, &cgi, &[]);
    let mut s = std::net::TcpStream::connect(k.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /cgi-bin/short.sh HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).expect("a clean close");
    let text = String::from_utf8_lossy(&got);
    assert!(text.ends_with("\r\n\r\nonly this"), "{text}");
    hf_tests::eventually(Duration::from_secs(5), "the short answer logged", || {
        k.log()
            .contains("short of its Content-Length")
            .then_some(())
    });
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        !k.log().contains("does not own"),
        "no false warnings:\n{}",
        k.log()
    );
}
