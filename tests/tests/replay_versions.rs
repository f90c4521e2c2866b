//! A replay by another version of the service. Output a service declared
//! regenerated "by construction" (`skip_output_check`) is the same bytes
//! only within one build: another version may write another head. holdfast
//! must never splice two versions' answers: the client gets either the
//! whole answer of the version that started it, or a clean end of stream
//! after a prefix of it — never a byte of something else.

use std::io::{Read, Write};
use std::time::Duration;

use hf_tests::http::make_site;
use hf_tests::{bin, connect_small_rcvbuf, kill9, run_cmd, Keeper, NetNs, Role, TempDir};

fn httpd(root: &std::path::Path, name: &str) -> Vec<String> {
    vec![
        bin("hf-httpd").display().to_string(),
        "--root".into(),
        root.display().to_string(),
        "--server-name".into(),
        name.into(),
    ]
}

/// Issue: hf-httpd spliced two versions' answers. A candidate whose
/// `Server` line is shorter than the old version's starts a download and is
/// killed while it settles; the old version takes the connection back and
/// replays the answer. Before the fix the client read the candidate's head
/// and then the file shifted by the difference of the two heads.
#[test]
fn rollback_never_splices_two_versions_answers() {
    let dir = TempDir::new("versions");
    let files = make_site(dir.path(), &[4 << 20]);
    let (path, want) = files[0].clone();
    // The version that replays writes the longer head: what it regenerates
    // reaches the end of the dead candidate's recorded output before its
    // own answer ends, so a length check alone cannot catch it.
    let old = httpd(dir.path(), "an-old-version-with-a-much-longer-server-name");
    let new_name = "B";
    let new = httpd(dir.path(), new_name);
    // A send buffer of 16 KiB at most, in a namespace of the test's own: the
    // candidate then blocks writing the first piece of the file, with its
    // head still uncommitted.
    let ns = NetNs::new("versions", &["net.ipv4.tcp_wmem=4096 16384 16384"]);
    ns.enter();
    let mut k = Keeper::start(&[], &old.iter().map(String::as_str).collect::<Vec<_>>());
    let up = {
        let control = k.control.clone();
        std::thread::spawn(move || {
            run_cmd(
                std::process::Command::new(bin("holdfast"))
                    .arg("upgrade")
                    .args(["--settle", "20000", "--control"])
                    .arg(&control)
                    .arg("--")
                    .args(&new),
            )
        })
    };
    let st = k.wait_for("the candidate active", |s| {
        s.workers
            .iter()
            .any(|w| w.role == Role::Active && w.generation == 2)
    });
    let candidate = st
        .workers
        .iter()
        .find(|w| w.role == Role::Active)
        .map(|w| w.pid)
        .unwrap();
    // A small receive window and no reading: the candidate writes its head
    // and blocks in the middle of the first piece of the file.
    let mut sock = connect_small_rcvbuf(k.addr, 16 * 1024).unwrap();
    sock.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .unwrap();
    k.wait_for("the candidate holds the download", |s| {
        s.workers
            .iter()
            .any(|w| w.pid == candidate && w.connections == 1)
    });
    std::thread::sleep(Duration::from_millis(300));
    kill9(candidate);
    let (code, out, err) = up.join().unwrap();
    assert_eq!(code, 1, "the upgrade rolled back: {out}{err}");

    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    let end = loop {
        match sock.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => break Err(e),
        }
    };
    let head_end = got
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 4)
        .expect("a response head arrived");
    let head = String::from_utf8_lossy(&got[..head_end]).to_string();
    assert!(
        head.contains(&format!("Server: {new_name}\r\n")),
        "the head is the candidate's: {head}"
    );
    let body = &got[head_end..];
    assert!(body.len() <= want.len(), "more body than the file has");
    let differs = body.iter().zip(&want).position(|(a, b)| a != b);
    assert_eq!(
        differs,
        None,
        "the body differs from the file at byte {:?} of {} received: two answers were spliced\n{}",
        differs,
        body.len(),
        k.log()
    );
    assert!(
        end.is_ok(),
        "the connection ended with {end:?} after {} body bytes, not a clean end",
        body.len()
    );
}

/// The same command is one build: a download whose client stopped reading
/// through two drain timeouts of an upgrade to the same command is replayed
/// by the new generation and completes. (Seen: it was closed after 4.6 of
/// 8 MiB when the check took every generation for another version.)
#[test]
fn stalled_download_survives_an_upgrade_to_the_same_command() {
    let dir = TempDir::new("same-build");
    let files = make_site(dir.path(), &[8 << 20]);
    let (path, want) = files[0].clone();
    let cmd = httpd(dir.path(), "same");
    let k = Keeper::start(&[], &cmd.iter().map(String::as_str).collect::<Vec<_>>());
    let mut sock = connect_small_rcvbuf(k.addr, 64 * 1024).unwrap();
    sock.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .unwrap();
    let mut got = vec![0u8; 1 << 20];
    sock.read_exact(&mut got).unwrap();
    // The client stops reading; the old version and its catcher are both
    // still busy at their drain timeouts, so the new generation replays.
    let (code, out, err) = k.upgrade(&["--drain-timeout", "500", "--settle", "100"], &[]);
    assert_eq!(code, 0, "{out}{err}");
    let head_end = got
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 4)
        .unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut rest = Vec::new();
    sock.read_to_end(&mut rest)
        .unwrap_or_else(|e| panic!("{e} after {} more bytes\n{}", rest.len(), k.log()));
    got.extend_from_slice(&rest);
    assert_eq!(
        got.len() - head_end,
        want.len(),
        "the whole file arrived\n{}",
        k.log()
    );
    assert!(got[head_end..] == want[..], "the file's bytes");
}
