//! Resource edges: an open-files limit too small for --max-conns.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use hf_tests::testsvc::answer;
use hf_tests::{bin, free_port, wait_status, Phase, TempDir};

/// With RLIMIT_NOFILE at 100 the keeper holds at most 36 connections (64
/// descriptors stay in reserve) and says so; 150 clients arriving at once
/// — more than the limit allows open at once — are all answered, the extra
/// ones after waiting in the listen backlog.
#[test]
fn small_fd_limit_lowers_max_conns_and_nobody_is_refused() {
    let dir = TempDir::new("nofile");
    let control = dir.path().join("control.sock");
    let log = dir.path().join("keeper.log");
    let port = free_port();
    let script = "import os, resource, sys\nresource.setrlimit(resource.RLIMIT_NOFILE, (100, 100))\nos.execv(sys.argv[1], sys.argv[1:])\n";
    let logf = std::fs::File::create(&log).unwrap();
    let mut keeper = hf_tests::Proc(
        Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(bin("holdfast"))
            .args(["run", "--listen", &format!("127.0.0.1:{port}"), "--control"])
            .arg(&control)
            .arg("--")
            .arg(bin("hf-testsvc"))
            .arg("--tokio")
            .stdin(Stdio::null())
            .stdout(logf.try_clone().unwrap())
            .stderr(logf)
            .spawn()
            .unwrap(),
    );
    wait_status(&control, "serving", Duration::from_secs(20), |s| {
        s.phase == Phase::Serving
    });
    let clients: Vec<_> = (0..150u64)
        .map(|id| {
            std::thread::spawn(move || -> std::io::Result<Vec<u8>> {
                let mut c = TcpStream::connect(("127.0.0.1", port))?;
                c.set_read_timeout(Some(Duration::from_secs(20)))?;
                // Hold the connection a little so that many are open at once.
                std::thread::sleep(Duration::from_millis(200));
                c.write_all(format!("REQ {id} 500 0\n").as_bytes())?;
                let mut got = vec![0u8; answer(id, 500, 0).len()];
                c.read_exact(&mut got)?;
                Ok(got)
            })
        })
        .collect();
    for (id, c) in clients.into_iter().enumerate() {
        let got = c.join().unwrap().expect("answered, not refused or reset");
        assert!(got == answer(id as u64, 500, 0));
    }
    let s = hf_keeper::status::query(&control).unwrap();
    assert_eq!(s.accepted, 150);
    let _ = keeper.0.kill();
    let _ = keeper.0.wait();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("lowering --max-conns to 36"), "log:\n{text}");
}
