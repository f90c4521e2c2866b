//! Replay after a crash, with hf-testsvc on both library flavours (blocking
//! and tokio): requests in flight are answered again by the next worker, the
//! client gets every byte exactly once, and a replay that comes out different
//! closes that one connection cleanly instead of splicing two answers.

use std::io::Read;
use std::time::{Duration, Instant};

use hf_tests::testsvc::{answer, half, keeper, LineClient};
use hf_tests::{connect_small_rcvbuf, tail, Keeper, Phase, Role};

/// Each scenario runs on both of hf-testsvc's flavours: the blocking one
/// (a thread per connection) and the tokio one (`--tokio`, one thread).
macro_rules! on_both_flavours {
    ($($name:ident),* $(,)?) => {
        mod blocking {
            $(#[test]
            fn $name() {
                super::$name(&[])
            })*
        }
        mod tokio {
            $(#[test]
            fn $name() {
                super::$name(&["--tokio"])
            })*
        }
    };
}

on_both_flavours!(
    pipelined_requests_across_kills,
    kill_mid_response_on_many_connections,
    holds_complete_across_kills,
    divergent_replay_closes_only_that_connection,
    kill_while_blocked_writing_to_a_slow_reader,
    divergent_replay_after_a_partial_write_sends_nothing_new,
    long_pipeline_across_input_discards_and_kills,
    half_closed_client_gets_every_answer_across_a_kill,
    no_standby_connections_wait_for_a_slow_worker,
    hundreds_of_in_flight_connections_recovered_in_batches,
    killing_the_standby_leaves_service_alone,
    kills_during_the_replay_itself,
    slow_reader_outlives_two_killed_workers,
    storm_of_kills_under_pipelining_clients,
    divergent_storm_never_splices,
);

/// A keeper running hf-testsvc with the flavour flags `fl` and `svc_args`.
fn start(fl: &[&str], keeper_args: &[&str], svc_args: &[&str]) -> Keeper {
    let args: Vec<&str> = fl.iter().chain(svc_args).copied().collect();
    keeper(keeper_args, &args)
}

/// One write of 20 pipelined `REQ i 3000 40`; the active worker is killed
/// twice while it works through them (each time with an answer half
/// written): every request is answered once, in order, byte-exact, and
/// nothing else arrives.
fn pipelined_requests_across_kills(fl: &[&str]) {
    let mut k = start(fl, &[], &[]);
    let mut c = LineClient::connect(k.addr, "pipelined");
    let n = 20u64;
    let batch: String = (0..n).map(|i| format!("REQ {i} 3000 40\n")).collect();
    c.send(&batch);
    let mut killed = Vec::new();
    for i in 0..n {
        let want = answer(i, 3000, 0);
        if i == 3 || i == 11 {
            // The first half of answer i is out and the worker sleeps
            // before the rest: kill it there.
            let h = half(i, 3000);
            c.expect(&want[..h], &format!("first half of answer {i}"));
            killed.push(k.kill_and_wait());
            c.expect(&want[h..], &format!("second half of answer {i} (replayed)"));
        } else {
            c.expect(&want, &format!("answer {i}"));
        }
    }
    // Nothing extra (a duplicated answer) sits before the next answer.
    c.request(1000, 17, 0);
    let s = k.status().unwrap();
    assert_eq!(s.restarts, 2, "{s:?}");
    assert!(s.recovered_connections >= 2, "{s:?}");
    assert!(
        !s.workers.iter().any(|w| killed.contains(&w.pid)),
        "a killed worker is still listed: {s:?}"
    );
}

/// Six connections, each with an answer of a different size half written
/// and the worker sleeping before the rest; one kill: every client gets its
/// full exact answer, and the connections go on working.
fn kill_mid_response_on_many_connections(fl: &[&str]) {
    let delay = Duration::from_millis(1500);
    let mut k = start(fl, &[], &[]);
    let lens = [1usize, 10, 1000, 3000, 65_536, 1_000_000];
    let mut clients: Vec<(u64, usize, LineClient)> = lens
        .iter()
        .enumerate()
        .map(|(i, &len)| {
            let mut c = LineClient::connect(k.addr, format!("conn {i} ({len} bytes)"));
            // A first, complete request, so the interrupted one is not the
            // connection's first.
            c.request(500 + i as u64, 100, 0);
            (i as u64, len, c)
        })
        .collect();
    let t0 = Instant::now();
    for (id, len, c) in &mut clients {
        c.send(&format!("REQ {id} {len} {}\n", delay.as_millis()));
    }
    for (id, len, c) in &mut clients {
        let h = half(*id, *len);
        c.expect(&answer(*id, *len, 0)[..h], "first half before the kill");
    }
    assert!(
        t0.elapsed() < delay,
        "too slow to kill inside the {delay:?} pause ({:?})",
        t0.elapsed()
    );
    k.kill_and_wait();
    for (id, len, c) in &mut clients {
        let h = half(*id, *len);
        c.expect(&answer(*id, *len, 0)[h..], "second half after the kill");
    }
    for (id, _, c) in &mut clients {
        c.request(600 + *id, 2000, 0);
    }
    let s = k.status().unwrap();
    assert_eq!(s.restarts, 1);
    assert!(s.recovered_connections >= lens.len() as u64, "{s:?}");
}

/// Five connections each with a `HOLD` in flight (the worker will never
/// finish it); kill: all complete exactly. Twice, so the second round runs
/// on a worker that itself took over.
fn holds_complete_across_kills(fl: &[&str]) {
    let mut k = start(fl, &[], &[]);
    let lens = [0usize, 7, 4096, 100_000, 400_000];
    let mut clients: Vec<LineClient> = (0..lens.len())
        .map(|i| LineClient::connect(k.addr, format!("hold conn {i}")))
        .collect();
    for round in 0..2u64 {
        let ids: Vec<u64> = (0..lens.len() as u64).map(|i| round * 100 + i).collect();
        for (c, (id, len)) in clients.iter_mut().zip(ids.iter().zip(lens)) {
            c.send(&format!("HOLD {id} {len}\n"));
        }
        for (c, (id, len)) in clients.iter_mut().zip(ids.iter().zip(lens)) {
            c.expect(
                &answer(*id, len, 0)[..half(*id, len)],
                &format!("round {round}: first half of HOLD"),
            );
        }
        // The worker really holds the rest back until it dies.
        clients[2].assert_quiet(Duration::from_millis(150), "HOLD before the kill");
        k.kill_and_wait();
        for (c, (id, len)) in clients.iter_mut().zip(ids.iter().zip(lens)) {
            c.expect(
                &answer(*id, len, 0)[half(*id, len)..],
                &format!("round {round}: rest of HOLD after the kill"),
            );
        }
    }
    for (i, c) in clients.iter_mut().enumerate() {
        c.request(900 + i as u64, 333, 0);
    }
    assert_eq!(k.status().unwrap().restarts, 2);
}

/// `--diverge`: the next worker's answer differs from what the client
/// already has. That connection (A) must end cleanly — exactly the first half
/// already sent, then EOF; no reset, no byte of the other answer — while
/// another connection (B) and new connections carry on.
fn divergent_replay_closes_only_that_connection(fl: &[&str]) {
    let mut k = start(fl, &[], &["--diverge"]);
    let p1 = u64::from(k.active_pid());
    let mut b = LineClient::connect(k.addr, "B");
    b.request(1, 50, p1);
    b.request(2, 5000, p1);

    let mut a = LineClient::connect(k.addr, "A");
    // A second request queued behind: input the closing worker must drop
    // (closing with unread input would reset the connection).
    a.send("REQ 7 5000 10000\nREQ 8 10 0\n");
    let first = &answer(7, 5000, p1)[..half(7, 5000)];
    a.expect(first, "A: first half before the kill");
    b.request(3, 10, p1);

    let killed = k.kill_and_wait();
    assert_eq!(u64::from(killed), p1);
    let p2 = u64::from(k.active_pid());
    assert_ne!(p1, p2);

    // A: clean end of stream, nothing more (the rest of either answer would
    // be a splice).
    if let Err(e) = a.expect_eof(Duration::from_secs(8)) {
        panic!("{e}\nkeeper log:\n{}", k.log());
    }
    // B is untouched: answers now come from the new worker.
    b.request(4, 50, p2);
    b.request(5, 70_000, p2);
    // New connections are served.
    let mut c = LineClient::connect(k.addr, "C");
    c.request(6, 1234, p2);

    let s = k.wait_for("A's connection released, B and C held", |s| {
        s.connections == 2
    });
    assert_eq!(s.phase, Phase::Serving);
    assert_eq!(s.restarts, 1);
    assert!(s
        .workers
        .iter()
        .any(|w| w.role == Role::Active && u64::from(w.pid) == p2));
    let log = k.log();
    assert!(
        log.contains("replayed output differs"),
        "the keeper log does not mention the divergence:\n{log}"
    );
    // B still works after A was closed.
    b.request(8, 1, p2);
}

/// Bytes waiting in `s`'s receive queue.
fn queued(s: &std::net::TcpStream) -> usize {
    rustix::io::ioctl_fionread(s)
        .map(|n| n as usize)
        .unwrap_or(0)
}

/// Starts a big answer to a client that does not read (small receive
/// window): the worker is blocked in the middle of writing the first half
/// when it is killed, so the kernel holds only part of what the journal
/// says was about to be written. Returns the client.
fn blocked_big_answer(k: &Keeper, id: u64, len: usize, name: &str) -> LineClient {
    let s = connect_small_rcvbuf(k.addr, 16 * 1024).unwrap();
    let mut c = LineClient::from_stream(s, name);
    c.send(&format!("REQ {id} {len} 0\n"));
    // Wait until the window is full (the worker's write cannot go on).
    let mut last = 0;
    hf_tests::eventually(
        Duration::from_secs(10),
        "the client's receive queue full and still",
        || {
            let n = queued(c.stream());
            let full = n > 0 && n == last;
            last = n;
            std::thread::sleep(Duration::from_millis(20));
            full.then_some(())
        },
    );
    c
}

/// The worker is killed while blocked writing a large first half to a
/// client that reads nothing: the next worker sends exactly the missing
/// tail, and the client ends up with the whole answer.
fn kill_while_blocked_writing_to_a_slow_reader(fl: &[&str]) {
    let len = 8 << 20;
    let mut k = start(fl, &[], &[]);
    let mut c = blocked_big_answer(&k, 1, len, "slow reader");
    k.kill_and_wait();
    c.expect(&answer(1, len, 0), "the whole 8 MiB answer after the kill");
    c.request(2, 10, 0);
    assert_eq!(k.status().unwrap().restarts, 1);
}

/// `--diverge` with the first half only partly written when the worker died:
/// the client gets exactly the bytes the kernel had taken from the dead
/// worker (a strict prefix of its answer), then EOF. The regenerated bytes
/// the new worker holds back are never sent.
fn divergent_replay_after_a_partial_write_sends_nothing_new(fl: &[&str]) {
    let len = 8 << 20;
    let mut k = start(fl, &[], &["--diverge"]);
    let p1 = u64::from(k.active_pid());
    let mut c = blocked_big_answer(&k, 3, len, "slow reader");
    k.kill_and_wait();
    let old = answer(3, len, p1);
    let mut got = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    let end = loop {
        match c.stream().read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => break Err(e),
        }
    };
    if let Some(at) = got.iter().zip(&old).position(|(a, b)| a != b) {
        panic!(
            "byte {at} of {} is not the dead worker's: two answers spliced",
            got.len()
        );
    }
    assert!(
        got.len() < half(3, len),
        "{} bytes: the dead worker was not cut short inside the first half",
        got.len()
    );
    assert!(!got.is_empty());
    if let Err(e) = end {
        panic!(
            "{e} ({:?}) after {} bytes instead of a clean EOF\nkeeper log:\n{}",
            e.kind(),
            got.len(),
            k.log()
        );
    }
    k.wait_for("the divergent connection released", |s| s.connections == 0);
    let p2 = u64::from(k.active_pid());
    LineClient::connect(k.addr, "after").request(4, 100, p2);
    assert!(k.log().contains("replayed output differs"));
}

/// 1500 pipelined requests — more input than the library discards in one
/// batch (16 KiB) — with kills before and after the first discard: every
/// answer exactly once, in order.
fn long_pipeline_across_input_discards_and_kills(fl: &[&str]) {
    let mut k = start(fl, &[], &[]);
    let mut c = LineClient::connect(k.addr, "long pipeline");
    let n = 1500u64;
    let batch: String = (0..n)
        .map(|i| format!("REQ {} 20 1\n", 100_000 + i))
        .collect();
    assert!(batch.len() > 20_000);
    c.send(&batch);
    for i in 0..n {
        let id = 100_000 + i;
        if i == 300 || i == 1200 {
            k.kill_and_wait();
        }
        c.expect(&answer(id, 20, 0), &format!("answer {i}"));
    }
    c.request(7, 7, 0);
    assert_eq!(k.status().unwrap().restarts, 2);
}

/// The client sends its requests and half-closes (FIN) at once; the worker
/// is killed in the middle: the next worker answers the rest, then sees the
/// end of input and closes — a clean EOF after the last answer.
fn half_closed_client_gets_every_answer_across_a_kill(fl: &[&str]) {
    let mut k = start(fl, &[], &[]);
    let mut c = LineClient::connect(k.addr, "half-closed");
    let batch: String = (0..10u64).map(|i| format!("REQ {i} 2000 30\n")).collect();
    c.send(&batch);
    c.stream().shutdown(std::net::Shutdown::Write).unwrap();
    for i in 0..10u64 {
        let want = answer(i, 2000, 0);
        if i == 4 {
            let h = half(i, 2000);
            c.expect(&want[..h], "first half");
            k.kill_and_wait();
            c.expect(&want[h..], "second half (replayed)");
        } else {
            c.expect(&want, &format!("answer {i}"));
        }
    }
    c.expect_eof(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}\nkeeper log:\n{}", k.log()));
    k.wait_for("the connection released", |s| s.connections == 0);
}

/// No standby and a slow-starting service: after the kill the keeper is
/// `recovering` and holds the connections (one with an answer half out, one
/// that arrives meanwhile) until the new worker is ready; then both complete.
fn no_standby_connections_wait_for_a_slow_worker(fl: &[&str]) {
    let mut k = start(fl, &["--standby", "0"], &["--init-ms", "600"]);
    let mut a = LineClient::connect(k.addr, "A");
    a.send("REQ 1 3000 300\n");
    let h = half(1, 3000);
    a.expect(&answer(1, 3000, 0)[..h], "first half");
    let pid = k.kill_active();
    let s = k.wait_for("phase recovering", |s| s.phase == Phase::Recovering);
    assert!(s.workers.iter().all(|w| w.role != Role::Active), "{s:?}");
    let mut b = LineClient::connect(k.addr, "B");
    b.send("REQ 2 100 0\n");
    let s = k.wait_for("both connections waiting", |s| {
        s.waiting == 2 || s.phase == Phase::Serving
    });
    assert_eq!(
        s.phase,
        Phase::Recovering,
        "the new worker was ready too soon to see the wait: {s:?}"
    );
    a.expect(&answer(1, 3000, 0)[h..], "rest of A's answer");
    b.expect(&answer(2, 100, 0), "B's answer");
    let s = k.wait_for("serving again", |s| s.phase == Phase::Serving);
    assert!(s.workers.iter().all(|w| w.pid != pid));
    assert_eq!((s.restarts, s.waiting), (1, 0));
    let us = s.last_recovery_us.expect("last recovery time");
    assert!(
        us >= 500_000,
        "recovery took {us} µs with a worker that needs 600 ms to start"
    );
}

/// 600 connections, each with an answer half written, recovered at once:
/// more than one hand-over message's worth (253 fds), all complete exactly.
fn hundreds_of_in_flight_connections_recovered_in_batches(fl: &[&str]) {
    let n = 600u64;
    let delay = Duration::from_millis(2500);
    let mut k = start(fl, &[], &[]);
    let t0 = Instant::now();
    let mut clients: Vec<LineClient> = (0..n)
        .map(|i| {
            let mut c = LineClient::connect(k.addr, format!("conn {i}"));
            c.send(&format!("REQ {i} {} {}\n", 50 + i, delay.as_millis()));
            c
        })
        .collect();
    for (i, c) in clients.iter_mut().enumerate() {
        let i = i as u64;
        let len = 50 + i as usize;
        c.expect(&answer(i, len, 0)[..half(i, len)], "first half");
    }
    assert!(
        t0.elapsed() < delay,
        "too slow to kill inside the pause ({:?})",
        t0.elapsed()
    );
    // Twice back to back: the second worker dies while (or before) it takes
    // the hand-over batches in.
    k.kill_and_wait();
    k.kill_and_wait();
    for (i, c) in clients.iter_mut().enumerate() {
        let i = i as u64;
        let len = 50 + i as usize;
        c.expect(&answer(i, len, 0)[half(i, len)..], "rest after the kill");
    }
    let s = k.status().unwrap();
    assert!(s.recovered_connections >= n, "{s:?}");
    assert_eq!(s.connections, n as usize);
    // Every connection still works.
    for (i, c) in clients.iter_mut().enumerate() {
        c.send(&format!("REQ {} 5 0\n", 10_000 + i));
    }
    for (i, c) in clients.iter_mut().enumerate() {
        c.expect(&answer(10_000 + i as u64, 5, 0), "after the recovery");
    }
}

/// Killing the standby does not disturb serving: no restart is counted, a
/// new standby is started, and it then takes over an in-flight answer.
fn killing_the_standby_leaves_service_alone(fl: &[&str]) {
    let mut k = start(fl, &[], &[]);
    let mut c = LineClient::connect(k.addr, "client");
    c.request(1, 100, 0);
    let s = k.wait_for("a standby", |s| {
        s.workers.iter().any(|w| w.role == Role::Standby)
    });
    let standby = s
        .workers
        .iter()
        .find(|w| w.role == Role::Standby)
        .unwrap()
        .pid;
    hf_tests::kill9(standby);
    let s = k.wait_for("a new standby", |s| {
        s.workers
            .iter()
            .any(|w| w.role == Role::Standby && w.pid != standby)
    });
    assert_eq!(s.restarts, 0, "{s:?}");
    assert_eq!(s.phase, Phase::Serving);
    let exit = s.last_exits.last().expect("the standby's exit is reported");
    assert!(
        exit.contains(&format!("pid {standby}")) && exit.contains("killed by SIGKILL"),
        "{exit}"
    );
    c.request(2, 100, 0);
    c.send("REQ 3 5000 300\n");
    c.expect(&answer(3, 5000, 0)[..half(3, 5000)], "first half");
    let active = k.kill_and_wait();
    c.expect(&answer(3, 5000, 0)[half(3, 5000)..], "rest after the kill");
    let s = k.status().unwrap();
    assert_eq!(s.restarts, 1);
    let exit = s
        .last_exits
        .last()
        .expect("the active worker's exit is reported");
    assert!(
        exit.contains(&format!("pid {active}"))
            && exit.contains("Active")
            && exit.contains("SIGKILL"),
        "{exit}"
    );
    assert!(s.last_recovery_us.is_some_and(|us| us < 5_000_000), "{s:?}");
}

/// The worker that took over is itself killed — once right after the
/// takeover, once during the replayed request's pause — and a third worker
/// finishes the answer: exact bytes, nothing twice.
fn kills_during_the_replay_itself(fl: &[&str]) {
    let mut k = start(fl, &[], &[]);
    let mut clients: Vec<LineClient> = (0..4u64)
        .map(|i| {
            let mut c = LineClient::connect(k.addr, format!("conn {i}"));
            c.send(&format!("REQ {i} {} 700\n", 1000 * (i as usize + 1)));
            c
        })
        .collect();
    for (i, c) in clients.iter_mut().enumerate() {
        let (i, len) = (i as u64, 1000 * (i + 1));
        c.expect(&answer(i, len, 0)[..half(i, len)], "first half");
    }
    // Back to back: the second kill hits a worker that has just been handed
    // the connections.
    k.kill_and_wait();
    k.kill_and_wait();
    // The third worker is in the pause of the replayed request.
    std::thread::sleep(Duration::from_millis(200));
    k.kill_and_wait();
    for (i, c) in clients.iter_mut().enumerate() {
        let (i, len) = (i as u64, 1000 * (i + 1));
        c.expect(&answer(i, len, 0)[half(i, len)..], "rest after three kills");
        c.request(100 + i, 10, 0);
    }
    assert_eq!(k.status().unwrap().restarts, 3);
}

/// A slow reader's big answer outlives two workers: the first is killed
/// while blocked writing the first half, the second while it is still
/// pushing out the verified replayed bytes the client has not taken.
fn slow_reader_outlives_two_killed_workers(fl: &[&str]) {
    let len = 8 << 20;
    let mut k = start(fl, &[], &[]);
    let mut c = blocked_big_answer(&k, 1, len, "slow reader");
    k.kill_and_wait();
    // Let the second worker regenerate and start flushing into the full
    // window before it dies too.
    std::thread::sleep(Duration::from_millis(100));
    k.kill_and_wait();
    c.expect(&answer(1, len, 0), "the whole answer after two kills");
    c.request(2, 10, 0);
}

/// 16 clients pipelining batches of requests of random sizes (some with a
/// pause inside the answer) while the active worker is killed every
/// 30–80 ms for 4 s: every answer exact, in order, once.
fn storm_of_kills_under_pipelining_clients(fl: &[&str]) {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    let mut k = start(fl, &[], &[]);
    let addr = k.addr;
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..16u64)
        .map(|c| {
            let (stop, done) = (stop.clone(), done.clone());
            std::thread::spawn(move || {
                let mut cl = LineClient::connect(addr, format!("client {c}"));
                let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ (c + 1);
                let mut next = move || {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x
                };
                let mut id = c << 32;
                while !stop.load(Ordering::Relaxed) {
                    let n = 1 + next() % 8;
                    let reqs: Vec<(u64, usize)> = (0..n)
                        .map(|_| {
                            id += 1;
                            (id, (next() % 20_000) as usize)
                        })
                        .collect();
                    let batch: String = reqs
                        .iter()
                        .map(|(i, len)| format!("REQ {i} {len} {}\n", next() % 4))
                        .collect();
                    cl.send(&batch);
                    for (i, len) in reqs {
                        cl.expect(&answer(i, len, 0), &format!("answer to request {i}"));
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    let t0 = Instant::now();
    let mut seed = 0x5eed_u64;
    let mut kills = 0;
    while t0.elapsed() < Duration::from_secs(4) {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(Duration::from_millis(30 + seed % 51));
        k.kill_active();
        kills += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let mut failed = None;
    for c in clients {
        if let Err(e) = c.join() {
            failed.get_or_insert(e);
        }
    }
    if let Some(e) = failed {
        let msg = e.downcast_ref::<String>().cloned().unwrap_or_default();
        panic!("{msg}\nkeeper log (tail):\n{}", tail(&k.log(), 60));
    }
    let s = k.status().unwrap();
    let total = done.load(Ordering::Relaxed);
    eprintln!(
        "{total} answers, {kills} kills, {} restarts, {} recovered",
        s.restarts, s.recovered_connections
    );
    assert!(s.restarts >= 30, "{s:?}");
    assert!(total > 1000, "only {total} answers");
}

/// `--diverge` under a storm of kills: every answer a client receives is
/// wholly one worker's (its pid is the salt), and an answer cut short by a
/// divergent replay is a prefix of one worker's answer followed by a clean
/// EOF — never a reset, never two workers' bytes spliced.
fn divergent_storm_never_splices(fl: &[&str]) {
    use std::collections::HashSet;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};
    let mut k = start(fl, &[], &["--diverge"]);
    let addr = k.addr;
    let control = k.control.clone();
    let pids: Arc<Mutex<HashSet<u64>>> = Arc::default();
    let learn = {
        let pids = pids.clone();
        move || {
            if let Ok(s) = hf_keeper::status::query(&control) {
                pids.lock()
                    .unwrap()
                    .extend(s.workers.iter().map(|w| u64::from(w.pid)));
            }
        }
    };
    learn();
    let stop = Arc::new(AtomicBool::new(false));
    let (whole, cut) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let clients: Vec<_> = (0..8u64)
        .map(|c| {
            let (stop, whole, cut, pids, learn) =
                (stop.clone(), whole.clone(), cut.clone(), pids.clone(), learn.clone());
            std::thread::spawn(move || -> Result<(), String> {
                let mut cl = LineClient::connect(addr, format!("client {c}"));
                let mut id = c << 32;
                let mut x = c + 7;
                while !stop.load(Ordering::Relaxed) {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    id += 1;
                    let len = (x >> 33) as usize % 30_000;
                    cl.send(&format!("REQ {id} {len} {}\n", (x >> 20) % 6));
                    let n = format!("RESP {id} {len}\n").len() + len + 1;
                    let (got, end) = cl.read_upto(n);
                    // Whose answer is it? Learn new pids once if none fits.
                    let fits = |pids: &HashSet<u64>| pids.iter().any(|&p| answer(id, len, p).starts_with(&got));
                    if !fits(&pids.lock().unwrap()) {
                        learn();
                        if !fits(&pids.lock().unwrap()) {
                            return Err(format!(
                                "{}: request {id}: {} bytes match no single worker's answer (spliced?)",
                                cl.name,
                                got.len()
                            ));
                        }
                    }
                    match end {
                        None => {
                            whole.fetch_add(1, Ordering::Relaxed);
                        }
                        Some(Ok(())) => {
                            cut.fetch_add(1, Ordering::Relaxed);
                            cl = LineClient::connect(addr, format!("client {c}"));
                        }
                        Some(Err(e)) => {
                            return Err(format!(
                                "{}: request {id}: {e} ({:?}) after {} of {n} bytes",
                                cl.name,
                                e.kind(),
                                got.len()
                            ))
                        }
                    }
                }
                Ok(())
            })
        })
        .collect();
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(60));
        let pid = k.active_pid();
        pids.lock().unwrap().insert(u64::from(pid));
        hf_tests::kill9(pid);
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        if let Err(e) = c.join().expect("client thread") {
            panic!("{e}\nkeeper log (tail):\n{}", tail(&k.log(), 40));
        }
    }
    let (whole, cut) = (whole.load(Ordering::Relaxed), cut.load(Ordering::Relaxed));
    eprintln!("{whole} whole answers, {cut} cut short by a divergent replay");
    assert!(whole > 200, "{whole}");
    assert!(
        cut > 5,
        "only {cut} divergent replays: the test hardly exercised them"
    );
}
