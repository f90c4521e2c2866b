//! Poison requests: a request that kills every worker that runs it is
//! refused after two crashes in a row, with the service's own error reply;
//! the connection and every other one go on.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

use hf_tests::testsvc::{answer, keeper};

fn poison_is_refused(svc: &[&str]) {
    let mut k = keeper(&[], svc);
    // A bystander with a request of its own across the crashes.
    let mut other = TcpStream::connect(k.addr).unwrap();
    other
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let s = TcpStream::connect(k.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    w.write_all(b"REQ 1 10 0\nCRASH 2\nREQ 3 10 0\n").unwrap();
    let mut line = Vec::new();
    r.read_until(b'\n', &mut line).unwrap();
    assert_eq!(line, b"RESP 1 10\n");
    line.clear();
    r.read_until(b'\n', &mut line).unwrap();
    assert_eq!(
        &line[..],
        &answer(1, 10, 0)[b"RESP 1 10\n".len()..],
        "REQ 1's body"
    );
    line.clear();
    r.read_until(b'\n', &mut line).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&line),
        "ERR POISON 2\n",
        "the poison request is refused"
    );
    let mut rest = vec![0u8; answer(3, 10, 0).len()];
    std::io::Read::read_exact(&mut r, &mut rest).unwrap();
    assert!(rest == answer(3, 10, 0), "the request after it is served");

    other.write_all(b"REQ 4 100 0\n").unwrap();
    let mut got = vec![0u8; answer(4, 100, 0).len()];
    std::io::Read::read_exact(&mut other, &mut got).unwrap();
    assert!(got == answer(4, 100, 0));

    // Exactly two crashes: the third worker refused the request.
    let st = k.status().unwrap();
    assert_eq!(st.restarts, 2, "{:?}", st.last_exits);
    assert_eq!(
        st.last_exits
            .iter()
            .filter(|e| e.contains("SIGABRT"))
            .count(),
        2,
        "{:?}",
        st.last_exits
    );
    assert!(k.log().contains("poison request"), "logged");
    let st = k.wait_for("the poison request counted", |s| s.poisoned >= 1);
    assert_eq!(st.poisoned, 1, "counted once");
}

#[test]
fn poison_request_is_refused_blocking() {
    poison_is_refused(&[]);
}

#[test]
fn poison_request_is_refused_tokio() {
    poison_is_refused(&["--tokio"]);
}

/// Kills from outside (SIGKILL: an operator, a test, the OOM killer) are not
/// the request's fault: a request in flight across several of them is still
/// answered normally.
#[test]
fn external_kills_do_not_make_poison() {
    let mut k = keeper(&[], &["--tokio"]);
    let mut s = TcpStream::connect(k.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(b"HOLD 1 300\n").unwrap();
    let half = hf_tests::testsvc::half(1, 300);
    let mut got = vec![0u8; half];
    std::io::Read::read_exact(&mut s, &mut got).unwrap();
    // HOLD completes on replay; kill the replaying workers too, quickly.
    for _ in 0..3 {
        k.kill_and_wait();
    }
    let mut rest = vec![0u8; answer(1, 300, 0).len() - half];
    std::io::Read::read_exact(&mut s, &mut rest).unwrap();
    got.extend_from_slice(&rest);
    assert!(got == answer(1, 300, 0));
    assert!(!k.log().contains("poison request"));
}

/// `--poison-after 3`: the request is refused only after three crashes.
#[test]
fn poison_threshold_is_configurable() {
    let k = keeper(&["--poison-after", "3"], &["--tokio"]);
    let mut s = TcpStream::connect(k.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(b"CRASH 9\n").unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert_eq!(line, "ERR POISON 9\n");
    assert_eq!(k.status().unwrap().restarts, 3);
}

/// Issue: innocent requests were poisoned. A request that was merely
/// running beside a poison request through its two crashes was flagged as
/// poison too. Now a request counts a crash only if the dead worker was
/// running it (had read it or begun its answer), and the suspects of a
/// crash run one at a time, so the second crash singles out the request
/// that caused it.
fn bystander_is_not_poisoned(svc: &[&str]) {
    use hf_tests::testsvc::{half, LineClient};
    let mut k = keeper(&[], svc);
    let mut b = LineClient::connect(k.addr, "bystander");
    b.send("REQ 1 1000 1500\n");
    let want = answer(1, 1000, 0);
    b.expect(&want[..half(1, 1000)], "the bystander's first half");
    let mut p = LineClient::connect(k.addr, "poison");
    p.send("CRASH 2\n");
    p.expect(b"ERR POISON 2\n", "the poison request refused");
    b.expect(&want[half(1, 1000)..], "the rest of the bystander's answer");
    b.request(3, 10, 0);
    let st = k.wait_for("the poison request counted", |s| s.poisoned >= 1);
    assert_eq!(st.restarts, 2, "{:?}", st.last_exits);
    std::thread::sleep(Duration::from_millis(100));
    let st = k.status().unwrap();
    assert_eq!(
        st.poisoned,
        1,
        "only the request that crashed the workers is poison\n{}",
        k.log()
    );
}

#[test]
fn bystander_is_not_poisoned_blocking() {
    bystander_is_not_poisoned(&[]);
}

#[test]
fn bystander_is_not_poisoned_tokio() {
    bystander_is_not_poisoned(&["--tokio"]);
}

/// Issue: a poison request whose answer had begun got the service's error
/// reply after the first part of its answer (a `200` head, then the tail of
/// a `500` page). An error cannot follow part of an answer: such a request
/// runs once more, alone, and a third crash with it running closes it
/// cleanly. The answer is unchecked output (`skip_output_check`, as
/// hf-httpd sends files) and shorter than the error, so no checksum or
/// length would catch a splice. Before the fix the client read "RESP 1 "
/// then "SON 1".
fn poison_with_answer_begun_is_never_spliced(svc: &[&str]) {
    use hf_tests::testsvc::{half, LineClient};
    use rustix::process::{kill_process, Pid, Signal};
    let mut args = vec!["--unchecked"];
    args.extend_from_slice(svc);
    let mut k = keeper(&[], &args);
    let mut c = LineClient::connect(k.addr, "begun");
    c.send("REQ 1 4 20000\n");
    c.expect(&answer(1, 4, 0)[..half(1, 4)], "the first half");
    // Crashes of its own making (SIGABRT) while it runs, each after the
    // next worker has taken the request up again.
    let abort = |pid: u32| kill_process(Pid::from_raw(pid as i32).unwrap(), Signal::ABORT).unwrap();
    for round in 1..=3u64 {
        let pid = k.active_pid();
        abort(pid);
        if round == 3 {
            break;
        }
        k.wait_for("the next worker holds the request", |s| {
            s.restarts == round
                && s.workers
                    .iter()
                    .any(|w| w.pid != pid && w.role == hf_tests::Role::Active && w.connections == 1)
        });
        // Let the replay start running before the next crash.
        std::thread::sleep(Duration::from_millis(300));
    }
    c.expect_eof(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}\n{}", k.log()));
}

#[test]
fn poison_with_answer_begun_is_never_spliced_blocking() {
    poison_with_answer_begun_is_never_spliced(&[]);
}

#[test]
fn poison_with_answer_begun_is_never_spliced_tokio() {
    poison_with_answer_begun_is_never_spliced(&["--tokio"]);
}

/// Under a stream of poison requests (a fresh `CRASH` every 0.2 s) beside
/// 8 busy keep-alive clients, only the poison requests are refused: every
/// other request is answered byte for byte. Before the keeper checked
/// which requests a crash caught running, this failed in two runs of three
/// (an innocent request closed: a worker that died before taking it up
/// counted an earlier worker's reading again).
#[test]
fn poison_stream_spares_the_bystanders() {
    use hf_tests::testsvc::LineClient;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    let k = keeper(&[], &[]);
    let addr = k.addr;
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..8u64)
        .map(|t| {
            let (stop, answered) = (stop.clone(), answered.clone());
            std::thread::spawn(move || -> Result<(), String> {
                let mut c = LineClient::connect(addr, format!("client {t}"));
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let id = t * 1_000_000 + i;
                    let len = ((i * 131) % 20_000) as usize;
                    c.send(&format!("REQ {id} {len} {}\n", i % 3));
                    let want = answer(id, len, 0);
                    let got = c.read_n(want.len())?;
                    if got != want {
                        return Err(format!("client {t}: request {id} answered wrongly"));
                    }
                    answered.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            })
        })
        .collect();
    let t0 = std::time::Instant::now();
    let mut poisons = 0u64;
    while t0.elapsed() < Duration::from_secs(5) {
        poisons += 1;
        let mut p = LineClient::connect(addr, format!("poison {poisons}"));
        p.send(&format!("CRASH {poisons}\n"));
        p.expect(
            format!("ERR POISON {poisons}\n").as_bytes(),
            "the poison request refused",
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join()
            .unwrap()
            .unwrap_or_else(|e| panic!("{e}\n{}", k.log()));
    }
    assert!(answered.load(Ordering::Relaxed) > 100);
    let st = k.status().unwrap();
    assert_eq!(
        st.poisoned, poisons,
        "only the poison requests were refused"
    );
}
