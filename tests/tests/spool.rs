//! Requests larger than the socket buffers: the library moves uncommitted
//! input into a spool the keeper holds, so the client's window stays open
//! and a crash in the middle of the upload loses nothing.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use hf_tests::http::content;
use hf_tests::testsvc::keeper;

/// FNV-1a 64, as hf-testsvc answers `BODY` with.
fn fnv(body: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in body {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn upload_through_kills(svc: &[&str]) {
    let mut k = keeper(&[], svc);
    let body = content(24 << 20, 99);
    let s = TcpStream::connect(k.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    // Without a spool the window closes and the upload stalls: fail, not hang.
    s.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut w = s.try_clone().unwrap();
    let writer = {
        let body = body.clone();
        std::thread::spawn(move || {
            w.write_all(format!("BODY 1 {}\n", body.len()).as_bytes())
                .unwrap();
            // About 24 MiB in 1.5 s, so the kills land mid-upload.
            let t0 = Instant::now();
            for (i, chunk) in body.chunks(256 * 1024).enumerate() {
                w.write_all(chunk)
                    .expect("upload: the connection must stay open");
                let due = Duration::from_millis(16 * (i as u64 + 1));
                if let Some(wait) = due.checked_sub(t0.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
            w.write_all(b"REQ 2 100 0\n").unwrap();
        })
    };
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(350));
        k.kill_and_wait();
    }
    writer.join().expect("writer");
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert_eq!(line, format!("SUM 1 {} {:016x}\n", body.len(), fnv(&body)));
    line.clear();
    r.read_line(&mut line).unwrap();
    assert_eq!(
        line, "RESP 2 100\n",
        "the request after the upload is answered too"
    );
    let st = k.status().unwrap();
    assert_eq!(st.restarts, 3);
    assert!(
        k.log().contains("input spool held") || k.log().contains("input spooled"),
        "the spool was used"
    );
}

#[test]
fn large_upload_survives_kills_blocking() {
    upload_through_kills(&[]);
}

#[test]
fn large_upload_survives_kills_tokio() {
    upload_through_kills(&["--tokio"]);
}

/// Issue: the tokio flavour never served input that sat in the spool when
/// its worker died, until the client sent more. Here the request that
/// follows a large body is spooled with it; its worker is killed halfway
/// through its answer, and the client sends nothing more. The next worker
/// must find the request in the spool (its socket has nothing to read, so
/// waiting for readiness would wait forever) and finish the answer.
fn spooled_request_served_after_kill(svc: &[&str]) {
    use hf_tests::testsvc::{answer, half, LineClient};
    let mut k = keeper(&[], svc);
    let body = content(200_000, 7);
    let mut c = LineClient::connect(k.addr, "spooled");
    let mut req = format!("BODY 1 {}\n", body.len()).into_bytes();
    req.extend_from_slice(&body);
    // HOLD answers its first half, then waits to be killed.
    req.extend_from_slice(b"HOLD 2 1000\n");
    c.stream().write_all(&req).unwrap();
    c.expect(
        format!("SUM 1 {} {:016x}\n", body.len(), fnv(&body)).as_bytes(),
        "the body's sum",
    );
    let full = answer(2, 1000, 0);
    let first = half(2, 1000);
    c.expect(&full[..first], "the first half of the held answer");
    // The keeper logs the spool once its event loop has taken it.
    hf_tests::eventually(
        Duration::from_secs(5),
        "the request after the body spooled",
        || k.log().contains("input spool held").then_some(()),
    );
    k.kill_and_wait();
    // Waiting for more input would wait forever: fail in bounded time.
    c.stream()
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    c.expect(&full[first..], "the rest of the answer, from the spool");
}

#[test]
fn spooled_request_served_after_kill_blocking() {
    spooled_request_served_after_kill(&[]);
}

#[test]
fn spooled_request_served_after_kill_tokio() {
    spooled_request_served_after_kill(&["--tokio"]);
}
