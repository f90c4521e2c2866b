//! The `holdfast` command line: argument errors, start-up failures, `status`,
//! `demo`, and `--max-conns`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use hf_tests::http::{make_site, Client};
use hf_tests::site::{sample_bytes, BIG_BIN_LEN, BIG_BIN_SEED, HELLO_TXT};
use hf_tests::testsvc::{answer, half, LineClient};
use hf_tests::{
    bin, connect_small_rcvbuf, exit_and_stderr, free_port, kill9, paced_read_to_end, run_cmd, term,
    wait_exit, wait_status, Keeper, Proc, Role, TempDir,
};

fn holdfast(args: &[&str]) -> (i32, String, String) {
    run_cmd(Command::new(bin("holdfast")).args(args))
}

fn assert_usage_error(args: &[&str], names: &[&str]) {
    let (code, out, err) = holdfast(args);
    assert_eq!(
        code, 2,
        "holdfast {args:?}: exit code {code}\nstdout: {out}\nstderr: {err}"
    );
    for n in names {
        assert!(
            err.contains(n),
            "holdfast {args:?}: stderr does not name {n:?}:\n{err}"
        );
    }
}

#[test]
fn argument_errors_exit_2_and_name_the_problem() {
    assert_usage_error(&["--bogus"], &["--bogus", "Usage"]);
    assert_usage_error(&["run", "--bogus", "--", "x"], &["--bogus"]);
    assert_usage_error(&["run"], &["required", "<CMD>"]);
    assert_usage_error(&["run", "--listen", "127.0.0.1:0"], &["required", "<CMD>"]);
    assert_usage_error(
        &["run", "--listen", "nonsense", "--", "x"],
        &["nonsense", "--listen"],
    );
    assert_usage_error(
        &[
            "run",
            "--listen",
            "127.0.0.1:0",
            "--max-conns",
            "0",
            "--",
            "x",
        ],
        &["--max-conns"],
    );
    assert_usage_error(
        &[
            "run",
            "--listen",
            "127.0.0.1:0",
            "--standby",
            "many",
            "--",
            "x",
        ],
        &["many", "--standby"],
    );
    assert_usage_error(&["frobnicate"], &["frobnicate"]);
    assert_usage_error(&[], &["Usage"]);
}

#[test]
fn worker_that_cannot_start_is_reported_at_once() {
    let dir = TempDir::new("cli-nobin");
    let control = dir.path().join("control.sock");
    let t0 = Instant::now();
    let (st, err) = exit_and_stderr(
        Command::new(bin("holdfast"))
            .args(["run", "--listen", "127.0.0.1:0", "--control"])
            .arg(&control)
            .args(["--", "/nonexistent/binary", "--flag"]),
        Duration::from_secs(10),
        "holdfast run on a command that cannot start",
    );
    assert!(!st.success(), "exit status {st}");
    assert!(
        err.contains("/nonexistent/binary"),
        "stderr does not name the command:\n{err}"
    );
    assert!(err.contains("cannot start worker"), "stderr:\n{err}");
    eprintln!("failed in {:?}", t0.elapsed());
}

#[test]
fn listen_address_in_use_is_reported() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = TempDir::new("cli-inuse");
    let control = dir.path().join("control.sock");
    let (st, err) = exit_and_stderr(
        Command::new(bin("holdfast"))
            .args(["run", "--listen", &addr, "--control"])
            .arg(&control)
            .args(["--", "/bin/true"]),
        Duration::from_secs(10),
        "holdfast run on an address in use",
    );
    assert!(!st.success());
    assert!(err.contains(&addr), "stderr does not name {addr}:\n{err}");
}

#[test]
fn status_without_keeper_fails_clearly() {
    let (code, out, err) = holdfast(&["status", "--control", "/nonexistent.sock"]);
    assert_ne!(code, 0, "stdout: {out}");
    assert!(
        err.contains("/nonexistent.sock"),
        "stderr does not name the socket:\n{err}"
    );
    assert!(err.contains("no keeper answers"), "stderr:\n{err}");
    let (code, _, err) = holdfast(&["status", "--json", "--control", "/nonexistent.sock"]);
    assert_ne!(code, 0);
    assert!(err.contains("/nonexistent.sock"), "stderr:\n{err}");
}

#[test]
fn status_json_and_text_of_a_running_keeper() {
    let dir = TempDir::new("cli-status");
    // The keeper creates the socket's directory itself, owner-only.
    let control = dir.path().join("run").join("holdfast").join("control.sock");
    let svc = bin("hf-testsvc").display().to_string();
    let mut k = Keeper::start_with(Some(control.clone()), &[], &[&svc]);
    let active = k.active_pid();
    // The standby is reported once it is ready.
    k.wait_for("a ready standby", |s| {
        s.workers.iter().any(|w| w.role == Role::Standby)
    });

    let mode = std::fs::metadata(&control).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "control socket mode {mode:o}");
    let dmode = std::fs::metadata(control.parent().unwrap())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(dmode, 0o700, "control directory mode {dmode:o}");

    let ctl = control.display().to_string();
    let (code, out, err) = holdfast(&["status", "--json", "--control", &ctl]);
    assert_eq!(code, 0, "stderr: {err}");
    let v: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}):\n{out}"));
    assert_eq!(v["phase"], "serving", "{out}");
    assert_eq!(v["keeper_pid"], k.pid(), "{out}");
    assert_eq!(
        v["listeners"],
        serde_json::json!([k.addr.to_string()]),
        "{out}"
    );
    let workers = v["workers"].as_array().expect("workers array");
    assert_eq!(workers.len(), 2, "active + one standby by default:\n{out}");
    let mut roles: Vec<&str> = workers
        .iter()
        .map(|w| w["role"].as_str().expect("role"))
        .collect();
    roles.sort_unstable();
    assert_eq!(roles, ["active", "standby"], "{out}");
    let active_json = workers.iter().find(|w| w["role"] == "active").unwrap();
    assert_eq!(active_json["pid"], active, "{out}");
    assert_eq!(v["connections"], 0, "{out}");
    assert_eq!(v["restarts"], 0, "{out}");

    let (code, out, err) = holdfast(&["status", "--control", &ctl]);
    assert_eq!(code, 0, "stderr: {err}");
    // At a glance: the state and where in the first line, each worker a
    // row of the table.
    let first = out.lines().next().unwrap_or_default();
    assert!(
        first.starts_with(&format!("serving on {} (generation 1,", k.addr)),
        "{out}"
    );
    assert!(
        out.lines().any(
            |l| l.split_whitespace().collect::<Vec<_>>()[..].ends_with(&[
                &active.to_string(),
                "1",
                "active",
                "0"
            ])
        ),
        "text status does not show the active worker {active} as a row:\n{out}"
    );
    assert!(out.contains(&k.addr.to_string()), "{out}");

    // A second keeper on the same control socket refuses to start.
    let (code, _, err) = run_cmd(Command::new(bin("holdfast")).args([
        "run",
        "--listen",
        "127.0.0.1:0",
        "--control",
        &ctl,
        "--",
        &svc,
    ]));
    assert_ne!(code, 0);
    assert!(err.contains("another keeper"), "{err}");
    // ...and the first is unharmed.
    assert_eq!(k.status().unwrap().phase, hf_tests::Phase::Serving);
}

#[test]
fn help_mentions_the_key_options() {
    let (code, out, _) = holdfast(&["--help"]);
    assert_eq!(code, 0);
    for w in ["run", "status", "demo", "--help", "--version"] {
        assert!(
            out.contains(w),
            "holdfast --help does not mention {w}:\n{out}"
        );
    }
    let (code, out, _) = holdfast(&["run", "--help"]);
    assert_eq!(code, 0);
    for w in [
        "--listen",
        "--standby",
        "--control",
        "--max-conns",
        "<CMD>",
        "LISTEN_FDS",
        "Examples",
    ] {
        assert!(
            out.contains(w),
            "holdfast run --help does not mention {w}:\n{out}"
        );
    }
    let (code, out, _) = holdfast(&["status", "--help"]);
    assert_eq!(code, 0);
    for w in ["--control", "--json"] {
        assert!(
            out.contains(w),
            "holdfast status --help does not mention {w}:\n{out}"
        );
    }
    let (code, out, _) = holdfast(&["demo", "--help"]);
    assert_eq!(code, 0);
    for w in ["--listen", "--control"] {
        assert!(
            out.contains(w),
            "holdfast demo --help does not mention {w}:\n{out}"
        );
    }
    let (code, out, _) = holdfast(&["--version"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("holdfast "), "{out}");
}

/// `holdfast demo` (without its proof): prints what to try once it serves;
/// what it says works: hello.txt, the 8 MiB big.bin downloaded slowly
/// through a kill of the active worker arrives intact, and the checksum it
/// prints is the file's. SIGTERM stops it and it cleans up after itself.
#[test]
fn demo_serves_the_sample_site_through_a_kill() {
    let dir = TempDir::new("cli-demo");
    let control = dir.path().join("control.sock");
    let ctl = control.display().to_string();
    let listen = format!("127.0.0.1:{}", free_port());
    let mut demo = Proc(
        Command::new(bin("holdfast"))
            .args(["demo", "--no-proof", "--listen", &listen, "--control", &ctl])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.path().join("demo.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let stdout = demo.0.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut out = String::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !out.contains("Stop with Ctrl-C.") {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                out.push_str(&line);
                out.push('\n');
            }
            Err(e) => panic!("demo's instructions incomplete ({e}):\n{out}"),
        }
    }
    // The checksum it prints is the served file's.
    let big = dir.path().join("big.bin");
    std::fs::write(&big, sample_bytes(BIG_BIN_LEN, BIG_BIN_SEED)).unwrap();
    let (code, sum, err) = run_cmd(Command::new("sha256sum").arg(&big));
    assert_eq!(code, 0, "sha256sum: {err}");
    let sum = sum.split_whitespace().next().unwrap().to_owned();
    for w in [
        format!("curl -i http://{listen}/hello.txt"),
        format!("--limit-rate 200K http://{listen}/big.bin"),
        format!("holdfast status --control {ctl}"),
        "kill -9".to_owned(),
        format!("sha256sum big.bin    # once it is done: {sum}"),
    ] {
        assert!(
            out.contains(&w),
            "the demo's instructions do not mention {w:?}:\n{out}"
        );
    }
    let site = out
        .split_once("serving a sample site from ")
        .and_then(|(_, r)| r.split_once(" on http"))
        .map(|(p, _)| std::path::PathBuf::from(p))
        .unwrap_or_else(|| panic!("no site directory in:\n{out}"));

    let s = wait_status(&control, "the demo serving", Duration::from_secs(20), |s| {
        s.phase == hf_tests::Phase::Serving && s.workers.iter().any(|w| w.role == Role::Standby)
    });
    assert_eq!(s.listeners, [listen.as_str()]);

    // What the instructions say: curl hello.txt.
    let (code, body, err) = run_cmd(Command::new("curl").args([
        "-sS",
        "--fail",
        &format!("http://{listen}/hello.txt"),
    ]));
    assert_eq!(code, 0, "curl: {err}");
    assert_eq!(body.as_bytes(), HELLO_TXT);

    // big.bin, read slowly (about 8 MiB in 2 s) through a small window,
    // with the active worker killed once well inside the transfer.
    let addr: std::net::SocketAddr = listen.parse().unwrap();
    let progress = Arc::new(AtomicUsize::new(0));
    let reader = {
        let progress = progress.clone();
        std::thread::spawn(move || -> Result<Vec<u8>, String> {
            let mut s =
                connect_small_rcvbuf(addr, 64 * 1024).map_err(|e| format!("connect: {e}"))?;
            s.write_all(b"GET /big.bin HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n")
                .map_err(|e| e.to_string())?;
            paced_read_to_end(s, 4.0 * 1024.0 * 1024.0, progress)
        })
    };
    hf_tests::eventually(Duration::from_secs(20), "1 MiB of big.bin", || {
        (progress.load(Ordering::Relaxed) >= 1 << 20).then_some(())
    });
    let active = s
        .workers
        .iter()
        .find(|w| w.role == Role::Active)
        .unwrap()
        .pid;
    kill9(active);
    let at = progress.load(Ordering::Relaxed);
    assert!(
        at < BIG_BIN_LEN / 2,
        "the kill came too late to interrupt the download ({at} bytes read)"
    );
    wait_status(
        &control,
        "a new active worker",
        Duration::from_secs(20),
        |s| {
            s.workers
                .iter()
                .any(|w| w.role == Role::Active && w.pid != active)
        },
    );
    let got = reader
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("big.bin download: {e}"));
    let h = got
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("response head")
        + 4;
    let head = String::from_utf8_lossy(&got[..h]);
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains(&format!("content-length: {BIG_BIN_LEN}\r\n")),
        "{head}"
    );
    assert_eq!(got.len() - h, BIG_BIN_LEN, "big.bin length");
    assert!(
        got[h..] == sample_bytes(BIG_BIN_LEN, BIG_BIN_SEED)[..],
        "big.bin differs from the generator's bytes"
    );
    let s = hf_tests::status_of(&control);
    assert_eq!(s.restarts, 1);
    assert!(s.recovered_connections >= 1, "{s:?}");

    term(demo.0.id());
    let st = wait_exit(&mut demo.0, Duration::from_secs(10))
        .expect("demo still running 10 s after SIGTERM");
    assert!(st.success(), "demo exit status {st}");
    assert!(!control.exists(), "control socket left behind");
    assert!(!site.exists(), "sample site {} left behind", site.display());
}

/// `--max-conns 4`: ten keep-alive clients at once, each holding its
/// connection a little after its answer: the keeper never holds more than
/// four, and the others wait in the backlog until a slot frees — all ten are
/// answered.
#[test]
fn max_conns_queues_the_rest_in_the_backlog() {
    let dir = TempDir::new("cli-maxconns");
    let files = Arc::new(make_site(dir.path(), &[1000, 50_000]));
    let httpd = bin("hf-httpd").display().to_string();
    let root = dir.path().display().to_string();
    let mut k = Keeper::start(&["--max-conns", "4"], &[&httpd, "--root", &root]);
    let addr = k.addr;
    let done = Arc::new(AtomicBool::new(false));
    let monitor = {
        let (control, done) = (k.control.clone(), done.clone());
        std::thread::spawn(move || {
            let mut max = 0;
            while !done.load(Ordering::Relaxed) {
                if let Ok(s) = hf_keeper::status::query(&control) {
                    max = max.max(s.connections);
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            max
        })
    };
    let clients: Vec<_> = (0..10usize)
        .map(|i| {
            let files = files.clone();
            std::thread::spawn(move || -> Result<Duration, String> {
                let t0 = Instant::now();
                let mut c =
                    Client::connect(addr).map_err(|e| format!("client {i}: connect: {e}"))?;
                let (path, want) = &files[i % files.len()];
                let r = c.get(path).map_err(|e| format!("client {i}: {e}"))?;
                if r.status != 200 || r.body != *want {
                    return Err(format!(
                        "client {i}: status {} body {} bytes",
                        r.status,
                        r.body.len()
                    ));
                }
                let waited = t0.elapsed();
                std::thread::sleep(Duration::from_millis(150));
                Ok(waited)
            })
        })
        .collect();
    let mut waits = Vec::new();
    for c in clients {
        waits.push(
            c.join()
                .unwrap()
                .unwrap_or_else(|e| panic!("{e}\nkeeper log:\n{}", k.log())),
        );
    }
    k.wait_for("every connection released", |s| s.connections == 0);
    done.store(true, Ordering::Relaxed);
    let max = monitor.join().unwrap();
    assert!(
        max <= 4,
        "the keeper held {max} connections at once with --max-conns 4"
    );
    assert_eq!(
        max, 4,
        "the limit was never reached: the test did not exercise it"
    );
    waits.sort();
    // Six clients had to wait for a slot: at least one held connection's 150 ms.
    assert!(
        waits[9] >= Duration::from_millis(140),
        "no client waited for a slot: {waits:?}"
    );
    assert_eq!(k.status().unwrap().accepted, 10);
}

/// Two `--listen` addresses: both serve, and connections on both survive a
/// kill.
#[test]
fn two_listeners_both_serve_across_a_kill() {
    let svc = bin("hf-testsvc").display().to_string();
    let mut k = Keeper::start(&["--listen", "127.0.0.2:0"], &[&svc]);
    let s = k.status().unwrap();
    assert_eq!(s.listeners.len(), 2, "{s:?}");
    let addrs: Vec<std::net::SocketAddr> = s.listeners.iter().map(|l| l.parse().unwrap()).collect();
    assert!(
        addrs.iter().any(|a| a.ip().to_string() == "127.0.0.2"),
        "{addrs:?}"
    );
    let mut cs: Vec<LineClient> = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| LineClient::connect(*a, format!("listener {i}")))
        .collect();
    for (i, c) in cs.iter_mut().enumerate() {
        c.request(i as u64, 100, 0);
        c.send(&format!("REQ {} 2000 500\n", 10 + i));
        c.expect(
            &answer(10 + i as u64, 2000, 0)[..half(10 + i as u64, 2000)],
            "first half",
        );
    }
    k.kill_and_wait();
    for (i, c) in cs.iter_mut().enumerate() {
        c.expect(
            &answer(10 + i as u64, 2000, 0)[half(10 + i as u64, 2000)..],
            "rest after the kill",
        );
    }
}

/// A worker command that starts and fails at once: the keeper stays up,
/// restarts it with back-off (not in a tight loop), reports the exits, and
/// holds a client's connection (no reset) while nothing can serve it.
#[test]
fn failing_worker_is_retried_with_backoff() {
    let dir = TempDir::new("cli-false");
    let control = dir.path().join("control.sock");
    let mut keeper = Proc(
        Command::new(bin("holdfast"))
            .args(["run", "--listen", "127.0.0.1:0", "--control"])
            .arg(&control)
            .args(["--", "/bin/sh", "-c", "exit 3"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let s = wait_status(
        &control,
        "two failed starts",
        Duration::from_secs(10),
        |s| s.last_exits.len() >= 2,
    );
    assert_eq!(s.phase, hf_tests::Phase::Starting, "{s:?}");
    assert!(
        s.last_exits
            .iter()
            .all(|e| e.contains("exited with code 3")),
        "{:?}",
        s.last_exits
    );
    let addr: std::net::SocketAddr = s.listeners[0].parse().unwrap();
    let mut c = LineClient::connect(addr, "waiting");
    c.send("REQ 1 10 0\n");
    // Back-off doubling from 20 ms: about six attempts in the first 0.7 s
    // (the next comes after more than a second), not hundreds — the list
    // keeps the last 8. A time window, so a sleep.
    std::thread::sleep(Duration::from_millis(700));
    let s = hf_tests::status_of(&control);
    assert!(
        s.last_exits.len() < 8,
        "restarted in a tight loop: {:?}",
        s.last_exits
    );
    assert_eq!(s.phase, hf_tests::Phase::Starting);
    assert!(
        wait_exit(&mut keeper.0, Duration::ZERO).is_none(),
        "the keeper gave up"
    );
    assert_eq!((s.connections, s.waiting), (1, 1), "{s:?}");
    c.assert_quiet(Duration::from_millis(100), "no worker to answer");
}

/// A start that fails (the worker command cannot be exec'd) leaves nothing
/// behind: the control socket the keeper had already bound is removed, as it
/// is on a normal shutdown.
#[test]
fn failed_start_leaves_no_control_socket() {
    let dir = TempDir::new("cli-nobin-sock");
    let control = dir.path().join("control.sock");
    let (code, _, err) = run_cmd(
        Command::new(bin("holdfast"))
            .args(["run", "--listen", "127.0.0.1:0", "--control"])
            .arg(&control)
            .args(["--", "/nonexistent/binary"]),
    );
    assert_ne!(code, 0, "{err}");
    assert!(
        !control.exists(),
        "stale control socket {} left behind after a failed start",
        control.display()
    );
}

/// Whether process `pid` is gone (or a zombie nobody reaped yet).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
    }
}

/// SIGTERM stops the keeper cleanly (exit 0), its workers with it, and
/// removes the control socket.
#[test]
fn sigterm_stops_keeper_and_workers() {
    let svc = bin("hf-testsvc").display().to_string();
    let mut k = Keeper::start(&[], &[&svc]);
    let s = k.wait_for("a standby", |s| {
        s.workers.len() == 2 && s.workers.iter().any(|w| w.role == Role::Standby)
    });
    let pids: Vec<u32> = s.workers.iter().map(|w| w.pid).collect();
    let mut c = LineClient::connect(k.addr, "client");
    c.request(1, 10, 0);
    let control = k.control.clone();
    let st = k.stop();
    assert!(st.success(), "keeper exit status {st}");
    for p in pids {
        assert!(gone(p), "worker {p} still running after the keeper stopped");
    }
    assert!(!control.exists(), "control socket left behind");
}

/// The keeper SIGKILLed: its workers notice (the control socket closes) and
/// exit instead of lingering as orphans.
#[test]
fn workers_exit_when_the_keeper_is_killed() {
    for svc in ["hf-testsvc", "hf-httpd"] {
        let exe = bin(svc).display().to_string();
        let dir = TempDir::new("cli-orphans");
        let root = dir.path().display().to_string();
        let cmd: Vec<&str> = if svc == "hf-httpd" {
            vec![&exe, "--root", &root]
        } else {
            vec![&exe]
        };
        let mut k = Keeper::start(&[], &cmd);
        let s = k.wait_for("a standby", |s| {
            s.workers.len() == 2 && s.workers.iter().any(|w| w.role == Role::Standby)
        });
        let pids: Vec<u32> = s.workers.iter().map(|w| w.pid).collect();
        kill9(k.pid());
        for p in pids {
            hf_tests::eventually(
                Duration::from_secs(10),
                &format!("{svc} worker {p} to exit after the keeper died"),
                || gone(p).then_some(()),
            );
        }
    }
}

/// `holdfast demo` errors: holdfast-demo missing next to the binary, or
/// the address taken — a clear message, a non-zero exit, no hang, and no
/// proof run first.
#[test]
fn demo_startup_errors_are_clear() {
    let dir = TempDir::new("cli-demo-err");
    let lonely = dir.path().join("holdfast");
    std::fs::copy(bin("holdfast"), &lonely).unwrap();
    let ctl = dir.path().join("control.sock");
    // Another test thread forking while the copy was open for writing can
    // leave it briefly "busy" (ETXTBSY) in that child: retry the exec.
    let out = (0..100)
        .find_map(|_| {
            match Command::new(&lonely)
                .args(["demo", "--listen", "127.0.0.1:0", "--control"])
                .arg(&ctl)
                .stdin(Stdio::null())
                .output()
            {
                Err(e) if e.raw_os_error() == Some(26) => {
                    std::thread::sleep(Duration::from_millis(20));
                    None
                }
                other => Some(other.expect("run the copied holdfast")),
            }
        })
        .expect("the copied binary stays busy");
    let (code, err) = (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert_ne!(code, 0);
    assert!(err.contains("holdfast-demo not found"), "{err}");

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let t0 = Instant::now();
    let (st, err) = exit_and_stderr(
        Command::new(bin("holdfast"))
            .args(["demo", "--listen", &addr, "--control"])
            .arg(&ctl),
        Duration::from_secs(10),
        "demo on an address in use",
    );
    assert!(!st.success());
    assert!(err.contains(&addr), "{err}");
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "the taken address was found only after {:?}",
        t0.elapsed()
    );
}

/// `holdfast demo --check`: the proof alone. Under the keeper the client
/// sees every answer whole through the SIGKILLs and the upgrade; the plain
/// restart beside it loses requests (so the kills were real); exit 0.
#[test]
fn demo_check_proves_zero_loss_against_a_plain_restart() {
    let t0 = Instant::now();
    let out = Command::new(bin("holdfast"))
        .args(["demo", "--check"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "demo --check: {}\n{stdout}\n{stderr}",
        out.status
    );
    assert!(
        t0.elapsed() < Duration::from_secs(30),
        "demo --check took {:?}",
        t0.elapsed()
    );
    let line = |prefix: &str| -> (u64, u64, u64) {
        let l = stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} line in:\n{stdout}"));
        // "4 SIGKILLs, 1 upgrade -> 5,841 requests, 0 failed (...), ..."
        let num = |after: &str| -> u64 {
            let w: Vec<&str> = l.split_whitespace().collect();
            let i = w
                .iter()
                .position(|x| x.trim_end_matches(',') == after)
                .unwrap_or_else(|| panic!("no {after:?} in {l:?}"));
            w[i - 1].replace(',', "").parse().unwrap()
        };
        (num("SIGKILLs"), num("requests"), num("failed"))
    };
    let (kills, requests, failed) = line("under holdfast:");
    assert!(kills >= 3, "{stdout}");
    assert!(requests > 100, "{stdout}");
    assert_eq!(failed, 0, "{stdout}");
    assert!(stdout.contains("1 upgrade ->"), "{stdout}");
    let (kills, requests, failed) = line("plain restart:");
    assert!(kills >= 3, "{stdout}");
    assert!(requests > 0, "{stdout}");
    assert!(
        failed > 0,
        "the plain restart lost nothing: were the kills real?\n{stdout}"
    );
    assert!(
        stdout.contains("no request failed, every byte verified"),
        "{stdout}"
    );
    // Nothing left behind: no serving banner, no scratch directory.
    assert!(!stdout.contains("Stop with Ctrl-C"), "{stdout}");
}

/// Issue: `holdfast status | head -1` panicked ("failed printing to
/// stdout: Broken pipe", exit 101). A closed stdout ends any command
/// quietly.
#[test]
fn status_into_a_closed_pipe_ends_quietly() {
    use std::io::{BufRead, BufReader};
    let k = hf_tests::Keeper::start(&[], &[bin("hf-testsvc").to_str().unwrap()]);
    for args in [&["status"][..], &["status", "--json"][..]] {
        let mut child = Command::new(bin("holdfast"))
            .args(args)
            .arg("--control")
            .arg(&k.control)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut first = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut first)
            .unwrap();
        // The reading end is gone before the rest is written.
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!first.is_empty());
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
    }
}

/// Issue: `--hang-timeout 2s` was rejected ("invalid digit found in
/// string"), so were `--listen localhost:PORT` and `:PORT`, and every run
/// warned about lowering a --max-conns nobody had asked for.
#[test]
fn options_take_units_and_host_names() {
    let k = hf_tests::Keeper::start(
        &[
            "--listen",
            "localhost:0",
            "--hang-timeout",
            "2s",
            "--hold-timeout",
            "1.5m",
            "--hold-kib",
            "64MiB",
            "--stop-timeout",
            "5s",
            "--max-uptime",
            "1h",
            "--max-rss",
            "1GiB",
        ],
        &[bin("hf-testsvc").to_str().unwrap()],
    );
    let st = k.status().unwrap();
    assert!(
        st.listeners.len() >= 2,
        "127.0.0.1:0 and localhost's addresses: {:?}",
        st.listeners
    );
    assert!(
        !k.log().contains("lowering --max-conns"),
        "no warning about an option nobody gave:\n{}",
        k.log()
    );
    assert_usage_error(
        &["run", "--hang-timeout", "2 fortnights", "--", "x"],
        &["fortnights", "--hang-timeout"],
    );
    assert_usage_error(&["run", "--hold-kib", "2GB!", "--", "x"], &["--hold-kib"]);
    let (code, out, err) = holdfast(&["run", "--listen", ":0", "--help"]);
    assert_eq!(code, 0, "{out}{err}");
}

/// Issue: `holdfast run -- sleep 1000` (a command not linked with the
/// library) stayed "Starting" for ever with no word. The first start now
/// has `--ready-timeout`: past it, `run` ends non-zero and says the likely
/// cause.
#[test]
fn worker_that_never_becomes_ready_ends_run_clearly() {
    let dir = TempDir::new("never-ready");
    let control = dir.path().join("c.sock");
    let t0 = std::time::Instant::now();
    let (code, out, err) = run_cmd(
        Command::new(bin("holdfast"))
            .args([
                "run",
                "--listen",
                "127.0.0.1:0",
                "--ready-timeout",
                "1500ms",
            ])
            .arg("--control")
            .arg(&control)
            .args(["--", "sleep", "1000"]),
    );
    let took = t0.elapsed();
    assert_ne!(code, 0, "{out}{err}");
    assert!(
        err.contains("no worker became ready") && err.contains("linked with the holdfast library"),
        "{err}"
    );
    assert!(
        took >= Duration::from_millis(1400) && took < Duration::from_secs(15),
        "{took:?}"
    );
}

/// Issue: there was no config file. `holdfast run --config FILE` takes
/// every option of `run` from TOML (durations with units, the command);
/// the command line wins; an unknown key is an error that names it.
#[test]
fn config_file_runs_and_the_command_line_wins() {
    let dir = TempDir::new("config");
    let port = free_port();
    let metrics = free_port();
    let file = dir.path().join("holdfast.toml");
    std::fs::write(
        &file,
        format!(
            "listen = [\"127.0.0.1:{port}\"]\n\
             control = \"c.sock\"\n\
             standby = 1\n\
             hang_timeout = \"2s\"\n\
             hold_kib = \"64MiB\"\n\
             metrics = \"127.0.0.1:{metrics}\"\n\
             command = [\"{}\"]\n",
            bin("hf-testsvc").display()
        ),
    )
    .unwrap();
    let control = dir.path().join("c.sock");
    let keeper = Proc(
        Command::new(bin("holdfast"))
            .args(["run", "--standby", "2", "--config"])
            .arg(&file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // The control socket from the file (relative to it), two standbys from
    // the command line.
    let st = wait_status(&control, "two standbys", Duration::from_secs(20), |s| {
        s.workers.iter().filter(|w| w.role == Role::Standby).count() == 2
    });
    assert_eq!(st.listeners, [format!("127.0.0.1:{port}")]);
    let mut c = LineClient::connect(format!("127.0.0.1:{port}").parse().unwrap(), "configured");
    c.request(1, 100, 0);
    let mut m = std::net::TcpStream::connect(("127.0.0.1", metrics)).unwrap();
    m.write_all(b"GET /metrics HTTP/1.1\r\nHost: m\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    std::io::Read::read_to_string(&mut m, &mut text).unwrap();
    assert!(text.contains("holdfast_generation 1"), "{text}");
    drop(keeper);

    std::fs::write(
        &file,
        "listen = [\"127.0.0.1:0\"]\nhang_timout = \"1s\"\ncommand = [\"x\"]\n",
    )
    .unwrap();
    let (code, _, err) = run_cmd(
        Command::new(bin("holdfast"))
            .args(["run", "--config"])
            .arg(&file),
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("hang_timout"), "names the unknown key: {err}");
}

/// `--log-format json`: one JSON object a line, for a log collector.
#[test]
fn json_logs_are_one_object_a_line() {
    let k = Keeper::start(
        &["--log-format", "json"],
        &[bin("hf-testsvc").to_str().unwrap()],
    );
    let log = k.log();
    let keeper_lines: Vec<&str> = log.lines().filter(|l| l.contains("\"hf_keeper")).collect();
    assert!(!keeper_lines.is_empty(), "{log}");
    for l in keeper_lines {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
        assert!(v["fields"]["message"].is_string(), "{l}");
        assert!(v["level"].is_string(), "{l}");
    }
}

/// `holdfast completions SHELL` prints a script the shell accepts, naming
/// the commands and their options; `holdfast man` a manual page, and with
/// `--dir` one per command, that `man` renders.
#[test]
fn completions_and_manual_pages() {
    let (code, script, err) = holdfast(&["completions", "bash"]);
    assert_eq!(code, 0, "{err}");
    for w in [
        "_holdfast()",
        "complete -F _holdfast",
        "upgrade",
        "--listen",
        "--stop-timeout",
    ] {
        assert!(script.contains(w), "bash completions lack {w:?}:\n{script}");
    }
    let dir = TempDir::new("cli-completions");
    let file = dir.path().join("holdfast.bash");
    std::fs::write(&file, &script).unwrap();
    let (code, _, err) = run_cmd(Command::new("bash").arg("-n").arg(&file));
    assert_eq!(code, 0, "bash -n on the completions: {err}");
    // Completing `holdfast st` offers `status`, not the other commands.
    let (code, out, err) = run_cmd(Command::new("bash").arg("-c").arg(format!(
        "source {}; COMP_WORDS=(holdfast st); COMP_CWORD=1; _holdfast holdfast st holdfast; \
         printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        file.display()
    )));
    assert_eq!(code, 0, "{err}");
    assert!(out.lines().any(|l| l == "status"), "{out}");
    assert!(!out.lines().any(|l| l == "run"), "{out}");
    for (shell, mark) in [
        ("zsh", "#compdef holdfast"),
        ("fish", "complete -c holdfast"),
        ("elvish", "holdfast"),
        ("powershell", "holdfast"),
    ] {
        let (code, out, err) = holdfast(&["completions", shell]);
        assert_eq!(code, 0, "{shell}: {err}");
        assert!(out.contains(mark), "{shell} completions:\n{out}");
        assert!(out.contains("listen"), "{shell} completions:\n{out}");
    }
    assert_usage_error(&["completions", "tcsh"], &["tcsh"]);

    let (code, page, err) = holdfast(&["man"]);
    assert_eq!(code, 0, "{err}");
    assert!(page.contains(".TH holdfast 1"), "{page}");
    for w in [
        ".SH NAME",
        ".SH SYNOPSIS",
        ".SH SUBCOMMANDS",
        "holdfast\\-run",
        "holdfast\\-upgrade",
    ] {
        assert!(page.contains(w), "the manual page lacks {w:?}:\n{page}");
    }
    let pages = dir.path().join("man");
    std::fs::create_dir(&pages).unwrap();
    let (code, _, err) = holdfast(&["man", "--dir", pages.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let mut names: Vec<String> = std::fs::read_dir(&pages)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for n in [
        "holdfast.1",
        "holdfast-run.1",
        "holdfast-upgrade.1",
        "holdfast-status.1",
    ] {
        assert!(names.iter().any(|x| x == n), "no {n} in {names:?}");
    }
    assert!(!names.iter().any(|x| x.contains("state")), "{names:?}");
    // man(1) renders it, with the options of `run`.
    if Command::new("man").arg("--version").output().is_ok() {
        let (code, text, err) = run_cmd(
            Command::new("man")
                .arg("-l")
                .arg(pages.join("holdfast-run.1"))
                .env("MANWIDTH", "100")
                .env("MANPAGER", "cat")
                .env("PAGER", "cat"),
        );
        assert_eq!(code, 0, "man: {err}");
        for w in ["holdfast-run", "--stop-timeout", "--listen", "LISTEN_FDS"] {
            assert!(text.contains(w), "man holdfast-run lacks {w:?}:\n{text}");
        }
    }
}
