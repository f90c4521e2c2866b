//! Listeners inherited from systemd socket activation (`LISTEN_FDS`).

use std::time::Duration;

use hf_tests::http::{make_site, Client};
use hf_tests::{bin, eventually, TempDir};

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
