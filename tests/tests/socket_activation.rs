//! Listeners inherited from systemd socket activation (`LISTEN_FDS`), the
//! keeper's sd_notify(3) messages, and the systemd units of
//! docs/operating.md run under a stand-in for systemd.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hf_tests::http::{make_site, Client};
use hf_tests::{bin, connect_small_rcvbuf, eventually, paced_read_to_end, TempDir};

/// Python plays systemd: it binds a socket, puts it at fd 3 and execs the
/// keeper with `LISTEN_PID` set to its own (unchanged) pid.
#[test]
fn keeper_serves_on_an_inherited_listener() {
    let dir = TempDir::new("activation");
    let files = make_site(dir.path(), &[1234]);
    let (path, want) = &files[0];
    let control = dir.path().join("control.sock");
    let script = r#"
import os, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 0))
s.listen(128)
if s.fileno() != 3:
    os.dup2(s.fileno(), 3)
os.set_inheritable(3, True)
env = dict(os.environ, LISTEN_FDS="1", LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES="web")
args = sys.argv[1:]
os.execve(args[0], args, env)
"#;
    let mut child = hf_tests::Proc(
        std::process::Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(bin("holdfast"))
            .args(["run", "--control"])
            .arg(&control)
            .arg("--")
            .arg(bin("hf-httpd"))
            .arg("--root")
            .arg(dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("python3 is installed"),
    );
    let snap = eventually(
        Duration::from_secs(20),
        "keeper serving on the inherited socket",
        || {
            hf_keeper::status::query(&control)
                .ok()
                .filter(|s| s.phase == hf_tests::Phase::Serving)
        },
    );
    assert_eq!(snap.listeners.len(), 1);
    assert_eq!(snap.listeners[0], "web");
    // The keeper names the listener after LISTEN_FDNAMES; find its port from /proc.
    let port = listening_port(snap.keeper_pid).expect("the keeper listens");
    let mut c = Client::connect(format!("127.0.0.1:{port}").parse().unwrap()).unwrap();
    let r = c.get(path).unwrap();
    assert_eq!(r.status, 200);
    assert!(r.body == *want);
    let _ = child.0.kill();
    let _ = child.0.wait();
}

/// The port of the first TCP socket in LISTEN state owned by `pid`.
fn listening_port(pid: u32) -> Option<u16> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()?
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            l.to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')
                .map(str::to_owned)
        })
        .collect();
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (local, state, inode) = (f.get(1)?, f.get(3)?, f.get(9)?);
        if *state != "0A" || !inodes.iter().any(|i| i == inode) {
            return None;
        }
        u16::from_str_radix(local.rsplit(':').next()?, 16).ok()
    })
}

/// sd_notify(3): READY=1 once a worker serves, WATCHDOG=1 pings at half the
/// watchdog period from the keeper's own loop, STOPPING=1 on the way out;
/// workers do not inherit the notification socket.
#[test]
fn keeper_speaks_sd_notify() {
    let dir = TempDir::new("notify");
    let sock = dir.path().join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&sock).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let control = dir.path().join("control.sock");
    let mut keeper = hf_tests::Proc(
        std::process::Command::new(bin("holdfast"))
            .args(["run", "--listen", "127.0.0.1:0", "--control"])
            .arg(&control)
            .arg("--")
            .arg(bin("hf-httpd"))
            .arg("--root")
            .arg(dir.path())
            .env("NOTIFY_SOCKET", &sock)
            .env("WATCHDOG_USEC", "100000")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut buf = [0u8; 256];
    let mut seen = Vec::new();
    while seen
        .iter()
        .filter(|m: &&String| m.contains("WATCHDOG=1"))
        .count()
        < 3
    {
        let n = notify
            .recv(&mut buf)
            .expect("notifications from the keeper");
        seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    let ready = seen
        .iter()
        .position(|m| m.contains("READY=1"))
        .expect("READY=1");
    let snap = hf_keeper::status::query(&control).unwrap();
    assert_eq!(
        snap.phase,
        hf_tests::Phase::Serving,
        "READY=1 at index {ready} of {seen:?}"
    );
    for w in &snap.workers {
        let env = std::fs::read(format!("/proc/{}/environ", w.pid)).unwrap();
        let env = String::from_utf8_lossy(&env);
        assert!(
            !env.contains("NOTIFY_SOCKET="),
            "worker {} inherited NOTIFY_SOCKET",
            w.pid
        );
    }
    hf_tests::term(keeper.0.id());
    loop {
        let n = notify.recv(&mut buf).expect("STOPPING=1");
        if String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1") {
            break;
        }
    }
    let _ = keeper.0.wait();
}

// ---------------------------------------------------------------------
// The systemd units of docs/operating.md, under a stand-in for systemd.

/// A unit file: (section, key, value) in order.
struct Unit {
    name: String,
    text: String,
    entries: Vec<(String, String, String)>,
}

impl Unit {
    fn get(&self, section: &str, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(s, k, _)| s == section && k == key)
            .map(|(_, _, v)| v.as_str())
    }

    fn need(&self, section: &str, key: &str) -> &str {
        self.get(section, key)
            .unwrap_or_else(|| panic!("{} has no {key}= in [{section}]:\n{}", self.name, self.text))
    }
}

/// The units in docs/operating.md: each ```ini block that starts with
/// `# /etc/systemd/system/NAME`.
fn doc_units() -> Vec<Unit> {
    let doc = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/operating.md");
    let doc = std::fs::read_to_string(&doc).expect("docs/operating.md");
    let mut units = Vec::new();
    let mut rest = doc.as_str();
    while let Some(i) = rest.find("```ini\n") {
        let block = &rest[i + 7..];
        let end = block.find("```").expect("closed code block");
        let text = &block[..end];
        rest = &block[end + 3..];
        let Some(name) = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# /etc/systemd/system/"))
        else {
            continue;
        };
        let mut section = String::new();
        let mut entries = Vec::new();
        for line in text.lines().skip(1) {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = s.to_owned();
            } else {
                let (k, v) = line.split_once('=').expect("key=value");
                entries.push((section.clone(), k.to_owned(), v.to_owned()));
            }
        }
        units.push(Unit {
            name: name.to_owned(),
            text: text.to_owned(),
            entries,
        });
    }
    units
}

fn doc_unit(name: &str) -> Unit {
    doc_units()
        .into_iter()
        .find(|u| u.name == name)
        .unwrap_or_else(|| panic!("no unit {name} in docs/operating.md"))
}

/// systemd's time spans as these units write them: `90`, `90s`, `1min`.
fn seconds(v: &str) -> u64 {
    let (n, unit) = v.split_at(v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len()));
    let n: u64 = n.parse().unwrap_or_else(|_| panic!("time span {v:?}"));
    match unit {
        "" | "s" | "sec" => n,
        "min" | "m" => n * 60,
        other => panic!("time span unit {other:?}"),
    }
}

/// What the keeper's defaults need from a unit, read from the units
/// themselves: the options the text above them explains, and that systemd
/// accepts every line (`systemd-analyze verify` warns of unknown keys).
#[test]
fn doc_units_give_the_keeper_what_it_needs() {
    let units = doc_units();
    let names: Vec<&str> = units.iter().map(|u| u.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "my-service.service",
            "my-service.socket",
            "my-service-activated.service"
        ]
    );
    for u in units.iter().filter(|u| u.name.ends_with(".service")) {
        assert_eq!(u.need("Service", "Type"), "notify", "{}", u.name);
        assert_eq!(u.need("Service", "KillMode"), "mixed", "{}", u.name);
        // Above --stop-timeout's default (80 s) with room for the workers.
        let stop = seconds(u.need("Service", "TimeoutStopSec"));
        assert!(stop >= 80 + 5, "{}: TimeoutStopSec={stop}", u.name);
        assert!(seconds(u.need("Service", "WatchdogSec")) > 0);
        assert_eq!(u.need("Service", "RuntimeDirectoryMode"), "0700");
        let start = u.need("Service", "ExecStart");
        let reload = u.need("Service", "ExecReload");
        assert!(start.contains("holdfast run "), "{start}");
        assert!(!start.contains("--stop-timeout"), "{start}");
        assert!(reload.contains("holdfast upgrade"), "{reload}");
        let control = |cmd: &str| {
            let w: Vec<&str> = cmd.split_whitespace().collect();
            let i = w.iter().position(|x| *x == "--control").expect("--control");
            w[i + 1].to_owned()
        };
        assert_eq!(control(start), control(reload), "{}", u.name);
        assert!(control(start).starts_with("%t/"), "{start}");
        assert!(u.get("Service", "NotifyAccess").is_none_or(|v| v == "main"));
    }
    let activated = doc_unit("my-service-activated.service");
    assert!(!activated.need("Service", "ExecStart").contains("--listen"));
    assert!(activated
        .need("Unit", "Requires")
        .contains("my-service.socket"));
    let socket = doc_unit("my-service.socket");
    socket.need("Socket", "ListenStream");
    socket.need("Socket", "FileDescriptorName");

    // systemd's own reading of them, with the binaries where they are here.
    let dir = TempDir::new("units-verify");
    for u in &units {
        let text = u
            .text
            .replace("/usr/local/bin/holdfast", bin("holdfast").to_str().unwrap())
            .replace(
                "/usr/local/bin/my-service",
                bin("hf-httpd").to_str().unwrap(),
            );
        std::fs::write(dir.path().join(&u.name), text).unwrap();
    }
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .args(units.iter().map(|u| dir.path().join(&u.name)))
        .output()
        .expect("systemd-analyze (Debian package systemd; .ci/run installs it)");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify: {err}");
    // It may say it is not running under systemd; nothing about the units.
    for name in &names {
        assert!(!err.contains(name), "systemd-analyze verify: {err}");
    }
}

/// A unit's command line as systemd would run it here: `%t` is `runtime`,
/// the binaries are the built ones, and the service serves `root`.
fn exec_line(line: &str, runtime: &std::path::Path, root: &std::path::Path) -> Vec<String> {
    let mut argv = Vec::new();
    for w in line.split_whitespace() {
        match w {
            "/usr/local/bin/holdfast" => argv.push(bin("holdfast").display().to_string()),
            "/usr/local/bin/my-service" => {
                argv.push(bin("hf-httpd").display().to_string());
                argv.push("--root".into());
                argv.push(root.display().to_string());
            }
            "0.0.0.0:8080" => argv.push("127.0.0.1:0".into()),
            w => argv.push(w.replace("%t", runtime.to_str().unwrap())),
        }
    }
    argv
}

/// Notifications from the keeper, in order, with when they came.
type Notes = Arc<Mutex<Vec<(Instant, String)>>>;

fn notification_socket(path: &std::path::Path) -> Notes {
    let sock = std::os::unix::net::UnixDatagram::bind(path).unwrap();
    let notes: Notes = Arc::default();
    let n = notes.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(len) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..len]).into_owned();
            n.lock().unwrap().push((Instant::now(), msg));
        }
    });
    notes
}

fn noted(notes: &Notes, what: &str) -> Option<Instant> {
    notes
        .lock()
        .unwrap()
        .iter()
        .find(|(_, m)| m.lines().any(|l| l == what))
        .map(|(t, _)| *t)
}

/// A download of `path` read at about 4 MiB/s through a small window, so
/// it is in flight for a while; returns the body.
fn slow_download(addr: SocketAddr, path: &str) -> std::thread::JoinHandle<Result<Vec<u8>, String>> {
    let req = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    std::thread::spawn(move || {
        let mut s = connect_small_rcvbuf(addr, 64 * 1024).map_err(|e| e.to_string())?;
        std::io::Write::write_all(&mut s, req.as_bytes()).map_err(|e| e.to_string())?;
        let got = paced_read_to_end(s, 4.0 * 1024.0 * 1024.0, Arc::default())?;
        let h = got
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or("no response head")?
            + 4;
        if !got.starts_with(b"HTTP/1.1 200 ") {
            return Err(String::from_utf8_lossy(&got[..h]).into_owned());
        }
        Ok(got[h..].to_vec())
    })
}

/// One of the doc's services, run as systemd runs it: `socket` for the
/// socket-activated one (its socket bound by `systemd-socket-activate`,
/// which starts the service on the first connection), `NOTIFY_SOCKET` and
/// `WATCHDOG_USEC` set (a 1 s watchdog instead of the unit's 10 s, to stay
/// short). Then what `systemctl reload` does (ExecReload= with MAINPID)
/// while a download runs, and what `systemctl stop` does with
/// KillMode=mixed (SIGTERM to the main process alone) while another runs
/// and a keep-alive connection idles.
fn run_unit_as_systemd(service: &str, socket: Option<&str>) {
    let unit = doc_unit(service);
    let dir = TempDir::new("systemd-unit");
    let files = make_site(dir.path(), &[1000, 8 << 20]);
    let runtime = dir.path().join("run");
    // RuntimeDirectory= with RuntimeDirectoryMode=0700.
    std::fs::create_dir_all(runtime.join("my-service")).unwrap();
    std::fs::set_permissions(
        runtime.join("my-service"),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    let notify = dir.path().join("notify.sock");
    let notes = notification_socket(&notify);
    let start = exec_line(unit.need("Service", "ExecStart"), &runtime, dir.path());
    let control = {
        let i = start.iter().position(|w| w == "--control").unwrap();
        std::path::PathBuf::from(&start[i + 1])
    };
    let watchdog = Duration::from_secs(1);
    let t0 = Instant::now();
    let (mut main, addr) = match socket {
        Some(socket) => {
            let socket = doc_unit(socket);
            assert!(socket.need("Socket", "ListenStream").ends_with(":8080"));
            let addr: SocketAddr = format!("127.0.0.1:{}", hf_tests::free_port())
                .parse()
                .unwrap();
            let main = hf_tests::Proc(
                std::process::Command::new("systemd-socket-activate")
                    .arg("--listen")
                    .arg(addr.to_string())
                    .arg(format!(
                        "--fdname={}",
                        socket.need("Socket", "FileDescriptorName")
                    ))
                    .arg(format!("--setenv=NOTIFY_SOCKET={}", notify.display()))
                    .arg(format!("--setenv=WATCHDOG_USEC={}", watchdog.as_micros()))
                    .arg("--")
                    .args(&start)
                    .stdout(std::process::Stdio::null())
                    .stderr(std::fs::File::create(dir.path().join("keeper.log")).unwrap())
                    .spawn()
                    .expect(
                        "systemd-socket-activate (Debian package systemd; .ci/run installs it)",
                    ),
            );
            (main, addr)
        }
        None => {
            let main = hf_tests::Proc(
                std::process::Command::new(&start[0])
                    .args(&start[1..])
                    .env("NOTIFY_SOCKET", &notify)
                    .env("WATCHDOG_USEC", watchdog.as_micros().to_string())
                    .stdout(std::process::Stdio::null())
                    .stderr(std::fs::File::create(dir.path().join("keeper.log")).unwrap())
                    .spawn()
                    .unwrap(),
            );
            eventually(Duration::from_secs(20), "READY=1", || {
                noted(&notes, "READY=1")
            });
            let port = listening_port(main.0.id()).expect("the keeper listens");
            (main, format!("127.0.0.1:{port}").parse().unwrap())
        }
    };
    let log = || std::fs::read_to_string(dir.path().join("keeper.log")).unwrap_or_default();

    // The first connection (under socket activation: the one that starts
    // the service) is answered once the keeper is ready.
    let (small, small_body) = &files[0];
    let (big, big_body) = &files[1];
    // (systemd-socket-activate binds its socket a moment after it starts.)
    let mut c = eventually(Duration::from_secs(10), "the socket bound", || {
        Client::connect(addr).ok()
    });
    let r = c.get(small).unwrap();
    assert_eq!(r.status, 200);
    assert!(r.body == *small_body);
    let ready = eventually(Duration::from_secs(20), "READY=1", || {
        noted(&notes, "READY=1")
    });
    let snap = hf_tests::status_of(&control);
    assert_eq!(snap.phase, hf_tests::Phase::Serving, "{}", log());
    assert_eq!(
        snap.keeper_pid,
        main.0.id(),
        "the keeper is the main process"
    );
    if socket.is_some() {
        assert_eq!(snap.listeners, ["web"]);
    }

    // systemctl reload: ExecReload= with $MAINPID, while a download runs
    // and a keep-alive connection waits between requests.
    let download = slow_download(addr, big);
    std::thread::sleep(Duration::from_millis(300));
    let reload = exec_line(unit.need("Service", "ExecReload"), &runtime, dir.path());
    let out = std::process::Command::new(&reload[0])
        .args(&reload[1..])
        .env("MAINPID", main.0.id().to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ExecReload: {}\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        log()
    );
    let snap = hf_tests::status_of(&control);
    assert_eq!((snap.generation, snap.upgrades), (2, 1), "{snap:?}");
    let r = c
        .get(small)
        .expect("the keep-alive connection after the reload");
    assert_eq!(r.status, 200);
    let got = download
        .join()
        .unwrap()
        .expect("the download across the reload");
    assert!(got == *big_body, "the download across the reload differs");

    // systemctl stop: SIGTERM to the main process alone (KillMode=mixed),
    // or to every process of the service (control-group, the default).
    let download = slow_download(addr, big);
    std::thread::sleep(Duration::from_millis(300));
    let workers: Vec<u32> = hf_tests::status_of(&control)
        .workers
        .iter()
        .map(|w| w.pid)
        .collect();
    hf_tests::term(main.0.id());
    match unit.get("Service", "KillMode").unwrap_or("control-group") {
        "mixed" | "process" => {}
        _ => workers.iter().for_each(|w| hf_tests::term(*w)),
    }
    let stop = seconds(unit.need("Service", "TimeoutStopSec"));
    let st = hf_tests::wait_exit(&mut main.0, Duration::from_secs(30))
        .unwrap_or_else(|| panic!("still running 30 s after SIGTERM (TimeoutStopSec={stop})"));
    assert!(
        st.success(),
        "the keeper's exit after SIGTERM: {st}\n{}",
        log()
    );
    let got = download
        .join()
        .unwrap()
        .expect("the download across the stop");
    assert!(got == *big_body, "the download across the stop differs");
    // The idle keep-alive connection: closed with a FIN, not reset.
    let mut byte = [0u8; 1];
    match std::io::Read::read(c.stream(), &mut byte) {
        Ok(0) => {}
        other => panic!("the idle connection at the stop: {other:?}"),
    }
    // Nothing left for KillMode=mixed's final SIGKILL to find.
    for pid in workers {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .is_ok_and(|s| s.contains(") Z ")),
            "worker {pid} outlived the keeper"
        );
    }

    // What systemd heard: READY=1 before STOPPING=1, and the watchdog fed
    // at least every WatchdogSec all along, through the reload too.
    let stopping = noted(&notes, "STOPPING=1").expect("STOPPING=1");
    assert!(ready < stopping);
    let pings: Vec<Instant> = notes
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, m)| m.lines().any(|l| l == "WATCHDOG=1"))
        .map(|(t, _)| *t)
        .collect();
    let mut last = ready;
    for t in pings.iter().filter(|t| **t > ready && **t < stopping) {
        assert!(
            *t - last <= watchdog,
            "no WATCHDOG=1 for {:?} ({:?} after the start)",
            *t - last,
            last - t0
        );
        last = *t;
    }
    assert!(
        stopping - last <= watchdog,
        "the watchdog lapsed before the stop"
    );
    assert!(pings.len() >= 2, "{pings:?}");
}

#[test]
fn doc_unit_with_listen_reloads_and_stops_as_systemd_expects() {
    run_unit_as_systemd("my-service.service", None);
}

#[test]
fn doc_socket_activated_unit_reloads_and_stops_as_systemd_expects() {
    run_unit_as_systemd("my-service-activated.service", Some("my-service.socket"));
}
