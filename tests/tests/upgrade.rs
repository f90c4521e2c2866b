//! `holdfast upgrade` with real services and byte-checking clients: every
//! connection moves to the new version without a failed request, a reset or
//! a wrong byte, and a bad new version rolls back with nothing lost.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use hf_tests::http::{make_site, parse_all, Client};
use hf_tests::testsvc::{self, answer, half, LineClient};
use hf_tests::{bin, connect_small_rcvbuf, kill9, paced_read_to_end, Keeper, Role, TempDir};
use hf_tests::{run_cmd, Snapshot};

fn s(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn httpd(exe: &std::path::Path, root: &std::path::Path, name: &str) -> Vec<String> {
    vec![
        exe.display().to_string(),
        "--root".into(),
        root.display().to_string(),
        "--server-name".into(),
        name.into(),
    ]
}

/// The summary `holdfast upgrade --json` ends with.
fn done_event(out: &str) -> serde_json::Value {
    let last = out.lines().last().unwrap_or_default();
    let v: serde_json::Value =
        serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: {out:?}"));
    assert_eq!(v["event"], "done", "upgrade did not end with done: {out}");
    v
}

/// Runs `holdfast upgrade ARGS` on `k` in a thread: (exit code, stdout, stderr).
/// ARGS may end with `-- CMD…`.
fn upgrade_in_background(k: &Keeper, args: &[&str]) -> JoinHandle<(i32, String, String)> {
    let control = k.control.clone();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    std::thread::spawn(move || {
        run_cmd(
            std::process::Command::new(bin("holdfast"))
                .arg("upgrade")
                .arg("--control")
                .arg(&control)
                .args(&args),
        )
    })
}

fn active_generation(s: &Snapshot) -> Option<u32> {
    s.workers
        .iter()
        .find(|w| w.role == Role::Active)
        .map(|w| w.generation)
}

/// Line-protocol clients on keep-alive connections, each checking every
/// answer byte for byte until stopped. Returns the answers checked.
struct Load {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    clients: Vec<JoinHandle<Result<u64, String>>>,
}

impl Load {
    fn start(addr: std::net::SocketAddr, n: u64) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let clients = (0..n)
            .map(|c| {
                let (stop, done) = (stop.clone(), done.clone());
                std::thread::spawn(move || {
                    let mut cl = LineClient::connect(addr, format!("client {c}"));
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let id = c * 1_000_000 + i;
                        let len = [10, 1000, 20_000][(i % 3) as usize];
                        cl.send(&format!("REQ {id} {len} 0\n"));
                        let got = cl.read_n(answer(id, len, 0).len())?;
                        if got != answer(id, len, 0) {
                            return Err(format!("client {c}: wrong answer to request {id}"));
                        }
                        i += 1;
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(i)
                })
            })
            .collect();
        Load {
            stop,
            done,
            clients,
        }
    }

    /// Waits until `n` more answers were checked.
    fn progress(&self, n: u64) {
        let start = self.done.load(Ordering::Relaxed);
        hf_tests::eventually(Duration::from_secs(20), "clients progressing", || {
            (self.done.load(Ordering::Relaxed) >= start + n).then_some(())
        });
    }

    fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = 0;
        for c in self.clients {
            total += c
                .join()
                .expect("client thread")
                .unwrap_or_else(|e| panic!("{e}"));
        }
        total
    }
}

/// 50 upgrades, alternating between two builds that answer with different
/// `Server` headers, under 64 keep-alive clients: no failed request, every
/// body byte-exact, every response from one of the two builds, every
/// connection moved at a commit point, and only the last generation left.
#[test]
fn fifty_upgrades_between_two_builds_under_64_keepalive_clients() {
    let dir = TempDir::new("upgrade50");
    let root = dir.path().join("site");
    std::fs::create_dir(&root).unwrap();
    let files = Arc::new(make_site(
        &root,
        &[0, 100, 4096, 20_000, 65_536, 300_000, 700_000],
    ));
    // The second build: the same program at another path.
    let b_exe = dir.path().join("hf-httpd-b");
    std::fs::copy(bin("hf-httpd"), &b_exe).unwrap();
    let a = httpd(&bin("hf-httpd"), &root, "hf-httpd/A");
    let b = httpd(&b_exe, &root, "hf-httpd/B");
    let mut k = Keeper::start(&[], &s(&a));
    let addr = k.addr;
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
    let clients: Vec<_> = (0..64u64)
        .map(|c| {
            let (files, stop, seen) = (files.clone(), stop.clone(), seen.clone());
            std::thread::spawn(move || -> Result<u64, String> {
                let mut cl = Client::connect(addr).map_err(|e| format!("client {c}: {e}"))?;
                let mut n = 0u64;
                let mut i = c as usize;
                while !stop.load(Ordering::Relaxed) {
                    let (path, want) = &files[i % files.len()];
                    i = i.wrapping_mul(7).wrapping_add(3);
                    let r = cl
                        .get(path)
                        .map_err(|e| format!("client {c} request {n} {path}: {e}"))?;
                    if r.status != 200 || r.body != *want {
                        return Err(format!(
                            "client {c} request {n} {path}: status {}, {} bytes, want {}",
                            r.status,
                            r.body.len(),
                            want.len()
                        ));
                    }
                    match r.header("server") {
                        Some("hf-httpd/A") => seen[0].fetch_add(1, Ordering::Relaxed),
                        Some("hf-httpd/B") => seen[1].fetch_add(1, Ordering::Relaxed),
                        other => return Err(format!("client {c}: Server {other:?}")),
                    };
                    n += 1;
                }
                Ok(n)
            })
        })
        .collect();
    let (mut moved, mut total) = (0u64, 0u64);
    for i in 0..50 {
        let cmd = if i % 2 == 0 { &b } else { &a };
        let (code, out, err) = k.upgrade(&["--settle", "50", "--json"], &s(cmd));
        assert_eq!(code, 0, "upgrade {i} failed: {out}{err}\n{}", k.log());
        let d = done_event(&out);
        assert_eq!(d["generation"], i + 2);
        assert_eq!(d["recovered"], 0, "upgrade {i}: {out}");
        moved += d["moved"].as_u64().unwrap();
        let sw: serde_json::Value = out
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["event"] == "switched")
            .expect("switched event");
        total += sw["total"].as_u64().unwrap();
    }
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    let mut requests = 0;
    for c in clients {
        requests += c.join().unwrap().unwrap_or_else(|e| panic!("{e}"));
    }
    let (na, nb) = (
        seen[0].load(Ordering::Relaxed),
        seen[1].load(Ordering::Relaxed),
    );
    assert!(na > 0 && nb > 0, "answers from A {na}, from B {nb}");
    assert_eq!(moved, total, "every connection moved at a commit point");
    assert!(
        total >= 50 * 60,
        "only {total} connections moved in 50 upgrades"
    );
    let st = k.wait_for("only generation 51 left", |s| {
        s.generations == [51] && s.workers.iter().all(|w| w.generation == 51)
    });
    assert_eq!((st.upgrades, st.failed_upgrades, st.restarts), (50, 0, 0));
    eprintln!("{requests} requests ({na} from A, {nb} from B), {moved} connection moves");
}

/// A slow multi-megabyte download keeps going through three upgrades: each
/// upgrade completes (the old generation gone) while the download is still
/// running, and the file arrives intact.
#[test]
fn slow_download_moves_to_the_new_version_mid_file() {
    let dir = TempDir::new("upgrade-dl");
    let files = make_site(dir.path(), &[16 << 20]);
    let (path, want) = files[0].clone();
    let a = httpd(&bin("hf-httpd"), dir.path(), "A");
    let b = httpd(&bin("hf-httpd"), dir.path(), "B");
    let mut k = Keeper::start(&[], &s(&a));
    let mut sock = connect_small_rcvbuf(k.addr, 64 * 1024).unwrap();
    sock.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .unwrap();
    let progress = Arc::new(AtomicUsize::new(0));
    let reader = {
        let progress = progress.clone();
        std::thread::spawn(move || paced_read_to_end(sock, 4.0 * 1024.0 * 1024.0, progress))
    };
    for i in 0..3 {
        let before = progress.load(Ordering::Relaxed);
        hf_tests::eventually(Duration::from_secs(10), "download progressing", || {
            (progress.load(Ordering::Relaxed) > before + (1 << 20)).then_some(())
        });
        let cmd = if i % 2 == 0 { &b } else { &a };
        let (code, out, err) = k.upgrade(
            &["--settle", "20", "--drain-timeout", "30000", "--json"],
            &s(cmd),
        );
        assert_eq!(code, 0, "upgrade {i}: {out}{err}\n{}", k.log());
        let d = done_event(&out);
        assert_eq!(d["moved"], 1, "the download moved: {out}");
        let got = progress.load(Ordering::Relaxed);
        assert!(
            got < want.len(),
            "upgrade {i} waited for the download to end"
        );
    }
    let raw = reader
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("download: {e}"));
    let r = parse_all(&raw, &[false]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r[0].status, 200);
    assert_eq!(
        r[0].header("server"),
        Some("A"),
        "the head came from the first version"
    );
    assert!(r[0].body == want, "body differs");
    let st = k.wait_for("generation 4 alone", |s| s.generations == [4]);
    assert_eq!(st.restarts, 0);
}

fn testsvc_cmd(extra: &[&str]) -> Vec<String> {
    let mut v = vec![bin("hf-testsvc").display().to_string()];
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// A new version that exits at start, or is never ready: the upgrade fails
/// with the reason, nothing moves, and clients never notice.
#[test]
fn broken_new_versions_are_stopped_before_anything_moves() {
    let mut k = testsvc::keeper(&[], &["--tokio"]);
    let load = Load::start(k.addr, 8);
    load.progress(100);
    let (code, out, _) = k.upgrade(&[], &["sh", "-c", "exit 3"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("exited with code 3 before it was ready") && out.contains("nothing moved"),
        "{out}"
    );
    load.progress(100);
    let (code, out, _) = k.upgrade(
        &["--ready-timeout", "300"],
        &s(&testsvc_cmd(&["--init-ms", "60000"])),
    );
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("not ready after"), "{out}");
    let (code, out, _) = k.upgrade(&[], &["/nonexistent/service"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("cannot start the new version"), "{out}");
    load.progress(100);
    load.finish();
    let st = k.wait_for("one generation", |s| s.generations == [1]);
    assert_eq!((st.generation, st.upgrades, st.failed_upgrades), (1, 0, 3));
    assert_eq!(st.restarts, 0);
}

/// A new version that crashes on its first request, after it took over:
/// the old version's standby takes everything back, the request that
/// crashed it is answered by the old version, and the command says so.
#[test]
fn new_version_crashing_on_its_first_request_rolls_back() {
    let mut k = testsvc::keeper(&[], &["--tokio"]);
    let load = Load::start(k.addr, 8);
    load.progress(100);
    let (code, out, _) = k.upgrade(
        &["--settle", "5000"],
        &s(&testsvc_cmd(&["--tokio", "--abort-on-request"])),
    );
    assert_eq!(code, 1, "{out}\n{}", k.log());
    assert!(
        out.contains("killed by SIGABRT") && out.contains("rolled back to generation 1"),
        "{out}"
    );
    load.progress(500);
    let st = k.status().unwrap();
    assert_eq!(active_generation(&st), Some(1));
    load.finish();
    let st = k.wait_for("generation 1 alone", |s| s.generations == [1]);
    assert_eq!((st.generation, st.upgrades, st.failed_upgrades), (1, 0, 1));
}

/// State blobs: an upgrade to a build that cannot read the versions in use
/// is refused before anything moves; one that reads the old version moves
/// every connection with its state (a per-connection request count).
#[test]
fn state_blob_versions_decide_whether_an_upgrade_may_go() {
    let k = testsvc::keeper(&[], &["--state-version", "1"]);
    let mut c = LineClient::connect(k.addr, "counted");
    for i in 0..3 {
        c.request(i, 100, 0);
    }
    let (code, out, _) = k.upgrade(&[], &s(&testsvc_cmd(&["--state-version", "2"])));
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("refused before anything moved") && out.contains("state version 1"),
        "{out}"
    );
    c.send("COUNT 9\n");
    c.expect(b"COUNT 9 3\n", "count on the old version");
    let (code, out, _) = k.upgrade(
        &["--settle", "20"],
        &s(&testsvc_cmd(&[
            "--state-version",
            "2",
            "--reads-state",
            "1",
        ])),
    );
    assert_eq!(code, 0, "{out}\n{}", k.log());
    // Generation 1 cannot read what generation 2 writes: no way back.
    assert!(out.contains("no rollback"), "{out}");
    c.send("COUNT 10\n");
    c.expect(b"COUNT 10 4\n", "count carried to the new version");
    c.request(11, 100, 0);
    // Back to a build that reads only version 1: generation 2 writes 2.
    let (code, out, _) = k.upgrade(&[], &s(&testsvc_cmd(&["--state-version", "1"])));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("writes state version 2"), "{out}");
    c.send("COUNT 12\n");
    c.expect(b"COUNT 12 6\n", "count after the refused upgrade");
    // Generation numbers name every version started, refused ones too.
    assert_eq!(k.status().unwrap().generation, 3);
}

/// A request still running on the old version at the drain timeout is
/// recovered as after a crash — on a standby of the old version, so the
/// replay produces the same bytes even though the new version answers
/// differently (`--diverge`), and that standby hands it over at its next
/// commit point; an idle connection next to it moves at once.
#[test]
fn request_running_past_the_drain_timeout_is_recovered_on_the_old_version() {
    let k = testsvc::keeper(&[], &[]);
    let mut busy = LineClient::connect(k.addr, "busy");
    let mut idle = LineClient::connect(k.addr, "idle");
    idle.request(1, 100, 0);
    busy.send("HOLD 7 100000\n");
    let want = answer(7, 100_000, 0);
    let first = busy.read_n(half(7, 100_000)).unwrap();
    assert_eq!(first[..], want[..first.len()]);
    let (code, out, _) = k.upgrade(
        &["--drain-timeout", "300", "--settle", "20", "--json"],
        &s(&testsvc_cmd(&["--diverge"])),
    );
    assert_eq!(code, 0, "{out}\n{}", k.log());
    let d = done_event(&out);
    assert_eq!(
        (d["moved"].as_u64(), d["recovered"].as_u64()),
        (Some(2), Some(1)),
        "{out}"
    );
    busy.expect(
        &want[first.len()..],
        "rest of the held answer, replayed by the old version",
    );
    // Both connections now talk to the new version, which salts its
    // answers with its pid: the header line is enough to check.
    for c in [&mut busy, &mut idle] {
        c.send("REQ 8 10 0\n");
        c.expect(b"RESP 8 10\n", "an answer from the new version");
    }
    assert_eq!(k.status().unwrap().generation, 2);
    assert!(!k.log().contains("replayed output differs"), "{}", k.log());
}

/// Crashes and upgrades interleaved under load: the active worker killed
/// right before an upgrade, a draining old version killed mid-drain, and
/// the new version killed while it settles (a rollback). Nothing is lost.
#[test]
fn crashes_during_upgrades_lose_nothing() {
    let mut k = testsvc::keeper(&[], &["--tokio"]);
    let load = Load::start(k.addr, 16);
    load.progress(200);
    for _ in 0..8 {
        k.kill_active();
        let (code, out, err) = k.upgrade(&["--settle", "20"], &[]);
        assert_eq!(code, 0, "{out}{err}\n{}", k.log());
        load.progress(50);
    }
    // A held request keeps the old version draining; kill it mid-drain.
    let mut held = LineClient::connect(k.addr, "held");
    held.send("HOLD 5 50000\n");
    let want = answer(5, 50_000, 0);
    let first = held.read_n(half(5, 50_000)).unwrap();
    let up = upgrade_in_background(&k, &["--drain-timeout", "30000", "--settle", "20"]);
    let st = k.wait_for("old version draining", |s| {
        s.workers
            .iter()
            .any(|w| w.role == Role::Draining && w.connections > 0)
    });
    let old = st
        .workers
        .iter()
        .find(|w| w.role == Role::Draining && w.connections > 0)
        .unwrap();
    kill9(old.pid);
    let (code, out, err) = up.join().unwrap();
    assert_eq!(code, 0, "{out}{err}\n{}", k.log());
    held.expect(
        &want[first.len()..],
        "held answer after its draining worker was killed",
    );
    load.progress(200);
    // The new version killed while it settles: back to the one before.
    let gen = k.status().unwrap().generation;
    let up = upgrade_in_background(&k, &["--settle", "10000"]);
    let st = k.wait_for("new version active", |s| {
        active_generation(s) == Some(gen + 1)
    });
    let new = st
        .workers
        .iter()
        .find(|w| w.role == Role::Active)
        .unwrap()
        .pid;
    load.progress(100);
    kill9(new);
    let (code, out, _) = up.join().unwrap();
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!("rolled back to generation {gen}")),
        "{out}"
    );
    load.progress(200);
    let n = load.finish();
    assert!(n > 0);
    let st = k.status().unwrap();
    assert_eq!(st.generation, gen);
}

/// Back-to-back upgrades are bounded: with `--max-generations 2`, an
/// upgrade while the oldest generation still drains is refused with the
/// reason; once it is gone the next one goes through.
#[test]
fn live_generations_are_bounded() {
    let mut k = testsvc::keeper(&["--max-generations", "2"], &[]);
    let mut held = LineClient::connect(k.addr, "held");
    held.send("HOLD 3 20000\n");
    let want = answer(3, 20_000, 0);
    let first = held.read_n(half(3, 20_000)).unwrap();
    let up = upgrade_in_background(&k, &["--drain-timeout", "30000", "--settle", "10"]);
    let st = k.wait_for("generation 1 draining", |s| {
        s.workers
            .iter()
            .any(|w| w.generation == 1 && w.role == Role::Draining)
    });
    assert_eq!(st.generations, [1, 2]);
    assert!(st.upgrade.is_some());
    let (code, out, _) = k.upgrade(&[], &[]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("2 generations are live") && out.contains("generation 1 still holds 1"),
        "{out}"
    );
    let old = st
        .workers
        .iter()
        .find(|w| w.generation == 1 && w.role == Role::Draining)
        .unwrap()
        .pid;
    kill9(old);
    let (code, out, _) = up.join().unwrap();
    assert_eq!(code, 0, "{out}");
    held.expect(&want[first.len()..], "held answer");
    let (code, out, _) = k.upgrade(&["--settle", "10"], &[]);
    assert_eq!(code, 0, "{out}");
    k.wait_for("generation 3 alone", |s| s.generations == [3]);
}

/// SIGHUP to the keeper upgrades to the same command (a rebuilt binary).
#[test]
fn sighup_upgrades_to_the_same_command() {
    let mut k = testsvc::keeper(&[], &["--tokio"]);
    let mut c = LineClient::connect(k.addr, "c");
    c.request(1, 100, 0);
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(k.pid() as i32).unwrap(),
        rustix::process::Signal::HUP,
    )
    .unwrap();
    let st = k.wait_for("upgraded", |s| s.upgrades == 1 && s.generations == [2]);
    assert_eq!(st.generation, 2);
    c.request(2, 100, 0);
}

#[test]
fn upgrade_without_a_keeper_says_so() {
    let (code, out, err) = run_cmd(std::process::Command::new(bin("holdfast")).args([
        "upgrade",
        "--control",
        "/nonexistent/holdfast.sock",
    ]));
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("no keeper answers at /nonexistent/holdfast.sock"),
        "{err}"
    );
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// The keeper re-executes itself 20 times under load, with connections
/// arriving meanwhile: same pid, same workers, no failed request, and its
/// descriptor count back where it was.
#[test]
fn keeper_reexecs_itself_under_load_twenty_times() {
    let mut k = testsvc::keeper(&[], &["--tokio"]);
    let before = k.wait_for("the standby ready", |s| {
        s.workers.iter().any(|w| w.role == Role::Standby)
    });
    // The lowest of a few counts: the status query just made may not be
    // closed on the keeper's side yet.
    let fds_before = (0..5)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(10));
            open_fds(k.pid())
        })
        .min()
        .unwrap_or(0);
    let load = Load::start(k.addr, 16);
    load.progress(200);
    let workers: Vec<u32> = before.workers.iter().map(|w| w.pid).collect();
    let addr = k.addr;
    let newcomers = std::thread::spawn(move || {
        for i in 0..200u64 {
            let mut c = LineClient::connect(addr, format!("newcomer {i}"));
            c.request(i, 100, 0);
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    for i in 0..20 {
        let (code, out, err) = k.upgrade(&["--keeper"], &[]);
        assert_eq!(code, 0, "re-exec {i}: {out}{err}\n{}", k.log());
        assert!(out.contains("keeper re-executed"), "{out}");
        load.progress(20);
    }
    newcomers.join().expect("newcomers");
    load.progress(200);
    load.finish();
    let after = k.wait_for("every connection closed", |s| s.connections == 0);
    assert_eq!(after.keeper_pid, before.keeper_pid);
    assert_eq!(after.keeper_execs, 20);
    assert_eq!(after.restarts, 0);
    let pids: Vec<u32> = after.workers.iter().map(|w| w.pid).collect();
    assert_eq!(pids, workers, "workers kept serving through the re-execs");
    // A status connection may still be closing at either count (the
    // keeper drops it just after its reply): a leak is what stays above.
    let pid = k.pid();
    hf_tests::eventually(
        Duration::from_secs(5),
        "keeper fds back to the start",
        || (open_fds(pid) <= fds_before).then_some(()),
    );
}

/// A keeper binary that cannot read the saved state is refused before the
/// exec, and the keeper goes on with everything.
#[test]
fn keeper_refuses_a_binary_that_cannot_resume_it() {
    let dir = TempDir::new("keeper-bin");
    let exe = dir.path().join("holdfast");
    std::fs::copy(bin("holdfast"), &exe).unwrap();
    let control = dir.path().join("control.sock");
    let mut keeper = hf_tests::Proc(
        std::process::Command::new(&exe)
            .args(["run", "--listen", "127.0.0.1:0", "--control"])
            .arg(&control)
            .arg("--")
            .arg(bin("hf-testsvc"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let st = hf_tests::wait_status(&control, "serving", Duration::from_secs(20), |s| {
        s.phase == hf_tests::Phase::Serving
    });
    let mut c = LineClient::connect(st.listeners[0].parse().unwrap(), "c");
    c.request(1, 100, 0);
    // A "new build" at the same path that speaks another state format.
    let fake = dir.path().join("fake");
    std::fs::write(&fake, "#!/bin/sh\necho 99\n").unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::rename(&fake, &exe).unwrap();
    let (code, out, err) = run_cmd(
        std::process::Command::new(bin("holdfast"))
            .args(["upgrade", "--keeper", "--control"])
            .arg(&control),
    );
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains("saved-state format \"99\"") && out.contains("nothing changed"),
        "{out}"
    );
    c.request(2, 100, 0);
    let after = hf_tests::status_of(&control);
    assert_eq!((after.keeper_pid, after.keeper_execs), (st.keeper_pid, 0));
    assert!(keeper.0.try_wait().unwrap().is_none());
}

/// A saved state that reaches the new binary corrupted is refused by it
/// before the exec (its checksum fails), and the keeper goes on with
/// everything: same process, same connections, no re-exec counted.
#[test]
fn keeper_refuses_a_corrupted_saved_state_and_keeps_serving() {
    let dir = TempDir::new("keeper-corrupt");
    let exe = dir.path().join("holdfast");
    std::fs::copy(bin("holdfast"), &exe).unwrap();
    let control = dir.path().join("control.sock");
    let mut keeper = hf_tests::Proc(
        std::process::Command::new(&exe)
            .args(["run", "--listen", "127.0.0.1:0", "--control"])
            .arg(&control)
            .arg("--")
            .arg(bin("hf-testsvc"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let st = hf_tests::wait_status(&control, "serving", Duration::from_secs(20), |s| {
        s.phase == hf_tests::Phase::Serving
    });
    let mut c = LineClient::connect(st.listeners[0].parse().unwrap(), "c");
    c.request(1, 100, 0);
    // A "new build" that is this build, except that one bit of the state
    // flips on its way in.
    let real = bin("holdfast").display().to_string();
    let fake = dir.path().join("fake");
    std::fs::write(
        &fake,
        format!(
            "#!/bin/sh\n\
             if [ \"$1\" = state-check ]; then\n\
             python3 -c 'import sys; b = bytearray(sys.stdin.buffer.read()); b[len(b) // 2] ^= 1; sys.stdout.buffer.write(b)' | {real} state-check\n\
             exit $?\n\
             fi\n\
             exec {real} \"$@\"\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::rename(&fake, &exe).unwrap();
    let (code, out, err) = run_cmd(
        std::process::Command::new(bin("holdfast"))
            .args(["upgrade", "--keeper", "--control"])
            .arg(&control),
    );
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains("refuses the saved state")
            && out.contains("saved state corrupt: CRC-32C")
            && out.contains("nothing changed"),
        "{out}"
    );
    c.request(2, 100, 0);
    let after = hf_tests::status_of(&control);
    assert_eq!((after.keeper_pid, after.keeper_execs), (st.keeper_pid, 0));
    assert!(keeper.0.try_wait().unwrap().is_none());
}

/// A keeper started with a "saved state" that is not one (a stray
/// environment variable naming some other file) refuses it and says why.
#[test]
fn keeper_refuses_a_foreign_saved_state_at_start() {
    let dir = TempDir::new("keeper-foreign");
    let junk = dir.path().join("junk");
    std::fs::write(&junk, b"GIF89a not a keeper state").unwrap();
    let out = std::process::Command::new(bin("holdfast"))
        .args(["run", "--listen", "127.0.0.1:0", "--control"])
        .arg(dir.path().join("control.sock"))
        .arg("--")
        .arg(bin("hf-testsvc"))
        .env("HOLDFAST_KEEPER_STATE_FD", "0")
        .stdin(std::fs::File::open(&junk).unwrap())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("cannot resume after re-exec: not a saved keeper state"),
        "{err}"
    );
}

/// A draining worker whose last connection is closed by the service (not
/// handed over) still retires, and the upgrade ends without waiting for
/// the drain timeout.
#[test]
fn draining_worker_whose_last_connection_closes_retires() {
    let k = testsvc::keeper(&[], &[]);
    let mut c = LineClient::connect(k.addr, "quitter");
    // A slow answer with a QUIT behind it, read together: the QUIT is
    // answered by the old version, which then closes the connection.
    c.send("REQ 1 100 800\nQUIT 2\n");
    let first = c.read_n(half(1, 100)).unwrap();
    let t0 = std::time::Instant::now();
    let (code, out, err) = k.upgrade(&["--drain-timeout", "20000", "--settle", "10"], &[]);
    assert_eq!(code, 0, "{out}{err}\n{}", k.log());
    assert!(
        t0.elapsed() < Duration::from_secs(8),
        "upgrade waited {:?} for a worker that held nothing",
        t0.elapsed()
    );
    let want = answer(1, 100, 0);
    c.expect(&want[first.len()..], "the slow answer");
    c.expect(b"BYE 2\n", "the goodbye");
    c.expect_eof(Duration::from_secs(5)).unwrap();
    let mut k = k;
    k.wait_for("generation 2 alone", |s| s.generations == [2]);
}

/// `holdfast upgrade` and `holdfast upgrade --keeper` started together, ten
/// times over: every service upgrade command gets its true final answer (done,
/// or failed with the reason — never a connection closed mid-upgrade), a
/// keeper re-exec that would cut an upgrade short is refused with the reason,
/// and status counts exactly what the commands reported.
#[test]
fn keeper_reexec_racing_a_service_upgrade_leaves_it_a_true_answer() {
    let mut k = testsvc::keeper(&[], &["--tokio"]);
    let mut c = LineClient::connect(k.addr, "c");
    let (mut done, mut failed, mut reexecs, mut refused) = (0u64, 0u64, 0u64, 0u64);
    for round in 0..10u64 {
        let service = upgrade_in_background(&k, &["--settle", "0", "--json"]);
        let keeper = upgrade_in_background(&k, &["--keeper"]);
        let (code, out, err) = service.join().unwrap();
        let last: Option<serde_json::Value> = out
            .lines()
            .last()
            .and_then(|l| serde_json::from_str(l).ok());
        match (code, last.as_ref().and_then(|v| v["event"].as_str())) {
            (0, Some("done")) => done += 1,
            (1, Some("failed")) => failed += 1,
            _ => panic!(
                "round {round}: the service upgrade got no true answer (exit {code}): \
                 {out}{err}\n{}",
                k.log()
            ),
        }
        let (code, out, err) = keeper.join().unwrap();
        match code {
            0 if out.contains("keeper re-executed") => reexecs += 1,
            1 if out.contains("under way; try again when it ends") => refused += 1,
            _ => panic!("round {round}: keeper re-exec (exit {code}): {out}{err}"),
        }
        c.request(round, 100, 0);
    }
    let st = k.wait_for("no upgrade under way", |s| s.upgrade.is_none());
    assert_eq!(
        (st.upgrades, st.failed_upgrades),
        (done, failed),
        "status counts what the commands reported"
    );
    assert_eq!(st.keeper_execs, reexecs);
    assert_eq!(st.restarts, 0);
    eprintln!("{done} upgrades done, {failed} failed; {reexecs} re-execs, {refused} refused");
}

/// The new version is killed during `--settle` while it is in the middle
/// of a slow download (a rollback): the download is finished by a standby
/// of the new version — the one whose answer the client has half of — and
/// arrives byte for byte, not spliced with (or cut for) the old version's
/// different head.
#[test]
fn rollback_finishes_an_answer_cut_mid_way_on_the_new_version() {
    let dir = TempDir::new("rollback-mid-answer");
    let files = make_site(dir.path(), &[4 << 20]);
    let (path, want) = files[0].clone();
    // Without resume, a cut answer is replayed from its first byte: the
    // head too, which is another length in the other version.
    let mut a = httpd(&bin("hf-httpd"), dir.path(), "A");
    let mut b = httpd(&bin("hf-httpd"), dir.path(), "hf-httpd/version-B");
    a.push("--no-resume".into());
    b.push("--no-resume".into());
    let mut k = Keeper::start(&[], &s(&a));
    let mut args = vec!["--settle", "60000", "--json", "--"];
    args.extend(s(&b));
    let up = upgrade_in_background(&k, &args);
    let st = k.wait_for("the new version serving, with a standby", |s| {
        active_generation(s) == Some(2)
            && s.workers
                .iter()
                .any(|w| w.generation == 2 && w.role == Role::Standby)
    });
    let new = st
        .workers
        .iter()
        .find(|w| w.role == Role::Active)
        .unwrap()
        .pid;
    let mut sock = connect_small_rcvbuf(k.addr, 64 * 1024).unwrap();
    sock.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .unwrap();
    let progress = Arc::new(AtomicUsize::new(0));
    let reader = {
        let progress = progress.clone();
        std::thread::spawn(move || paced_read_to_end(sock, 2.0 * 1024.0 * 1024.0, progress))
    };
    hf_tests::eventually(Duration::from_secs(10), "download under way", || {
        (progress.load(Ordering::Relaxed) > 256 << 10).then_some(())
    });
    kill9(new);
    let (code, out, err) = up.join().unwrap();
    assert_eq!(code, 1, "{out}{err}\n{}", k.log());
    assert!(out.contains("rolled back to generation 1"), "{out}");
    let raw = reader
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("download: {e}\n{}", k.log()));
    let r = parse_all(&raw, &[false]).unwrap_or_else(|e| panic!("{e}\n{}", k.log()));
    assert_eq!(r[0].status, 200);
    assert_eq!(r[0].header("server"), Some("hf-httpd/version-B"));
    assert!(
        r[0].body == want,
        "body differs ({} bytes, want {})\n{}",
        r[0].body.len(),
        want.len(),
        k.log()
    );
    assert!(!k.log().contains("replayed output differs"), "{}", k.log());
    let st = k.wait_for("generation 1 alone", |s| s.generations == [1]);
    assert_eq!((st.upgrades, st.failed_upgrades), (0, 1));
    // New connections are served by the old version again.
    let mut cl = Client::connect(k.addr).unwrap();
    let r = cl.get(&path).unwrap();
    assert_eq!((r.status, r.header("server")), (200, Some("A")));
}

/// An upgrade without rollback (the old version cannot read the new state
/// blobs) still keeps one standby of the old version while the old version
/// holds connections: a request running past the drain timeout is replayed
/// by it, with the bytes the client already has half of, and not by the
/// new version, which answers differently (`--diverge`).
#[test]
fn request_past_the_drain_timeout_of_an_upgrade_without_rollback_stays_on_its_version() {
    let mut k = testsvc::keeper(&[], &["--state-version", "1"]);
    k.wait_for("the standby ready", |s| {
        s.workers.iter().any(|w| w.role == Role::Standby)
    });
    let mut busy = LineClient::connect(k.addr, "busy");
    busy.send("HOLD 7 100000\n");
    let want = answer(7, 100_000, 0);
    let first = busy.read_n(half(7, 100_000)).unwrap();
    assert_eq!(first[..], want[..first.len()]);
    let (code, out, _) = k.upgrade(
        &["--drain-timeout", "300", "--settle", "20", "--json"],
        &s(&testsvc_cmd(&[
            "--state-version",
            "2",
            "--reads-state",
            "1",
            "--diverge",
        ])),
    );
    assert_eq!(code, 0, "{out}\n{}", k.log());
    assert!(out.contains("\"rollback\":false"), "{out}");
    let d = done_event(&out);
    assert_eq!(d["recovered"], 1, "{out}");
    busy.expect(
        &want[first.len()..],
        "rest of the held answer, replayed by the old version",
    );
    busy.send("REQ 8 10 0\n");
    busy.expect(b"RESP 8 10\n", "an answer from the new version");
    assert!(!k.log().contains("replayed output differs"), "{}", k.log());
    k.wait_for("generation 2 alone", |s| {
        s.workers.iter().all(|w| w.generation == 2)
    });
}

/// Back-to-back upgrades: the second one starts while the first version
/// still holds a running request. That version keeps a standby, so the
/// request, still running at its drain timeout, is replayed by its own
/// code, not by the newest version (which answers differently).
#[test]
fn request_past_the_drain_timeout_during_back_to_back_upgrades_stays_on_its_version() {
    let mut k = testsvc::keeper(&[], &[]);
    k.wait_for("the standby ready", |s| {
        s.workers.iter().any(|w| w.role == Role::Standby)
    });
    let mut busy = LineClient::connect(k.addr, "busy");
    busy.send("HOLD 7 100000\n");
    let want = answer(7, 100_000, 0);
    let first = busy.read_n(half(7, 100_000)).unwrap();
    let diverge = testsvc_cmd(&["--diverge"]);
    let mut args = vec!["--drain-timeout", "1500", "--settle", "20", "--json", "--"];
    args.extend(s(&diverge));
    let up = upgrade_in_background(&k, &args);
    k.wait_for("generation 1 draining", |s| {
        active_generation(s) == Some(2)
            && s.workers
                .iter()
                .any(|w| w.generation == 1 && w.role == Role::Draining && w.connections == 1)
    });
    let (code, out, err) = k.upgrade(
        &["--drain-timeout", "20000", "--settle", "20", "--json"],
        &s(&diverge),
    );
    assert_eq!(code, 0, "{out}{err}\n{}", k.log());
    let (code, first_out, err) = up.join().unwrap();
    assert_eq!(code, 0, "{first_out}{err}\n{}", k.log());
    busy.expect(
        &want[first.len()..],
        "rest of the held answer, replayed by the first version",
    );
    assert!(!k.log().contains("replayed output differs"), "{}", k.log());
    k.wait_for("generation 3 alone", |s| {
        s.workers.iter().all(|w| w.generation == 3)
    });
}
