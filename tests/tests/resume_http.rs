//! hf-httpd (the tokio flavour) resuming downloads from its state blob with
//! more requests pipelined behind them, and closing when asked to.

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hf_tests::http::{make_site, parse_all};
use hf_tests::{bin, connect_small_rcvbuf, eventually, paced_read_to_end, Keeper, TempDir};

fn start(root: &std::path::Path) -> Keeper {
    let httpd = bin("hf-httpd").display().to_string();
    let root = root.display().to_string();
    Keeper::start(&[], &[&httpd, "--root", &root])
}

/// Three GETs and a HEAD pipelined in one write — two large files (sent in
/// pieces, each committed with its offset), a small one, and the last asking
/// `Connection: close` — read slowly while the worker is killed in each large
/// download: every response exact and in order, then a clean EOF.
#[test]
fn pipelined_downloads_resume_across_kills() {
    let dir = TempDir::new("resume");
    let files = make_site(dir.path(), &[3_000_000, 1234, 2_500_000]);
    let [(big1, w1), (small, w2), (big2, w3)] = &files[..] else {
        unreachable!()
    };
    let mut k = start(dir.path());
    let mut s = connect_small_rcvbuf(k.addr, 64 * 1024).unwrap();
    s.write_all(
        format!(
            "GET {big1} HTTP/1.1\r\nHost: t\r\n\r\n\
             HEAD {big2} HTTP/1.1\r\nHost: t\r\n\r\n\
             GET {small} HTTP/1.1\r\nHost: t\r\n\r\n\
             GET {big2} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .unwrap();
    let progress = Arc::new(AtomicUsize::new(0));
    let reader = {
        let progress = progress.clone();
        std::thread::spawn(move || paced_read_to_end(s, 6.0 * 1024.0 * 1024.0, progress))
    };
    let total = w1.len() + w2.len() + w3.len();
    // Inside the first download, then inside the last one.
    for at in [1_000_000, w1.len() + w2.len() + 1_000_000] {
        eventually(Duration::from_secs(20), "download progress", || {
            (progress.load(Ordering::Relaxed) >= at).then_some(())
        });
        k.kill_and_wait();
        let now = progress.load(Ordering::Relaxed);
        assert!(
            now < total - 500_000,
            "killed too late to interrupt a download ({now} of {total} bytes read)"
        );
    }
    let raw = reader
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("{e}\nkeeper log:\n{}", k.log()));
    let rs = parse_all(&raw, &[false, true, false, false])
        .unwrap_or_else(|e| panic!("{e} ({} bytes)", raw.len()));
    assert_eq!(
        rs.iter().map(|r| r.status).collect::<Vec<_>>(),
        [200, 200, 200, 200]
    );
    assert!(rs[0].body == *w1, "first download differs");
    assert_eq!(
        rs[1].header("content-length"),
        Some(w3.len().to_string().as_str())
    );
    assert!(rs[2].body == *w2, "small file differs");
    assert!(rs[3].body == *w3, "last download differs");
    assert_eq!(
        rs[3]
            .header("connection")
            .map(str::to_ascii_lowercase)
            .as_deref(),
        Some("close")
    );
    let s = k.wait_for("the connection released", |s| s.connections == 0);
    assert_eq!(s.restarts, 2);
}

/// An HTTP/1.0 request for a large file, interrupted by a kill: the whole
/// body, then the server closes (1.0 without keep-alive).
#[test]
fn http10_download_across_a_kill_then_close() {
    let dir = TempDir::new("resume10");
    let files = make_site(dir.path(), &[2_000_000]);
    let (path, want) = &files[0];
    let mut k = start(dir.path());
    let mut s = connect_small_rcvbuf(k.addr, 64 * 1024).unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .unwrap();
    let progress = Arc::new(AtomicUsize::new(0));
    let reader = {
        let progress = progress.clone();
        std::thread::spawn(move || paced_read_to_end(s, 4.0 * 1024.0 * 1024.0, progress))
    };
    eventually(Duration::from_secs(20), "download progress", || {
        (progress.load(Ordering::Relaxed) >= 300_000).then_some(())
    });
    k.kill_and_wait();
    let raw = reader
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("{e}\nkeeper log:\n{}", k.log()));
    let rs = parse_all(&raw, &[false]).unwrap();
    assert_eq!(rs[0].status, 200);
    assert!(rs[0].body == *want);
    k.wait_for("the connection released", |s| s.connections == 0);
}

/// hf-httpd's file answers are not checksummed (`skip_output_check`): the
/// file's identity is recorded instead. A file changed between a crash and
/// the replay of an answer to it must end that connection cleanly after the
/// bytes of the first version, never splice the two versions.
#[test]
fn file_changed_before_a_replay_closes_instead_of_splicing() {
    let dir = TempDir::new("changed");
    // One write each (under the 256 KiB piece size): no commit inside it.
    let files = make_site(dir.path(), &[200_000]);
    let (name, old) = &files[0];
    let mut k = start(dir.path());
    let mut s = connect_small_rcvbuf(k.addr, 4096).unwrap();
    // Pipelined until the worker blocks in the middle of one of them.
    let req = format!("GET {name} HTTP/1.1\r\nHost: t\r\n\r\n");
    s.write_all(req.repeat(40).as_bytes()).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // The file changes: same size, new bytes, new mtime.
    let path = dir.path().join(name.trim_start_matches('/'));
    let new: Vec<u8> = old.iter().map(|b| b ^ 0x55).collect();
    std::fs::write(&path, &new).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_modified(std::time::SystemTime::now() + Duration::from_secs(5))
        .unwrap();
    k.kill_and_wait();
    let got = paced_read_to_end(s, 50e6, Arc::new(AtomicUsize::new(0)))
        .expect("a clean close, not a reset");
    // Whole answers of the old file, then a prefix of one, then the end.
    let mut rest = &got[..];
    let mut whole = 0;
    while let Some(end) = rest.windows(4).position(|w| w == b"\r\n\r\n") {
        let body = &rest[end + 4..];
        let n = body.len().min(old.len());
        assert!(
            body[..n] == old[..n],
            "bytes of the new file after {whole} whole answers"
        );
        if n < old.len() {
            break;
        }
        whole += 1;
        rest = &body[n..];
    }
    assert!(whole < 40, "the answers must be cut short");
    assert_eq!(k.status().unwrap().restarts, 1);
}
