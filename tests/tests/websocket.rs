//! hf-chat's WebSocket rooms under the keeper: workers SIGKILLed and
//! upgraded while members of a room talk, checked by a client on the
//! `websockets` library (tests/py/ws_room.py) for exactly-once, in-order
//! delivery with no connection closed; and hostile frames closing only
//! their own connection with the RFC 6455 code.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hf_tests::{bin, finish_client as finish, py_script, python, tail, Keeper, TempDir};

fn chat(data: &TempDir) -> Keeper {
    chat_with(data, &[])
}

fn chat_with(data: &TempDir, args: &[&str]) -> Keeper {
    let exe = bin("hf-chat").display().to_string();
    let dir = data.path().display().to_string();
    let mut cmd = vec![exe.as_str(), "--data-dir", &dir];
    cmd.extend_from_slice(args);
    Keeper::start(&[], &cmd)
}

/// Starts the verifying room client against `k`.
fn room_client(k: &Keeper, args: &[&str]) -> Child {
    Command::new(python())
        .arg(py_script("ws_room.py"))
        .arg(k.addr.to_string())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 with the websockets library (see .ci/run)")
}

/// Waits for the client (at most 120 s) while `disturb` runs every
/// `every`; returns how many times it ran.
fn while_running(child: &mut Child, every: Duration, mut disturb: impl FnMut(u32)) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut n = 0;
    loop {
        std::thread::sleep(every);
        if let Ok(Some(_)) = child.try_wait() {
            return n;
        }
        assert!(Instant::now() < deadline, "the room client did not finish");
        disturb(n);
        n += 1;
    }
}

fn recovered(k: &Keeper) -> usize {
    k.log().matches("recovered onto standby").count()
}

#[test]
fn a_room_survives_a_kill_storm() {
    let data = TempDir::new("chat");
    let mut k = chat(&data);
    let mut client = room_client(&k, &["--members", "5", "--per", "80", "--gap", "0.02"]);
    let kills = while_running(&mut client, Duration::from_millis(150), |_| {
        k.kill_active();
    });
    finish(client, &k);
    assert!(kills >= 5, "only {kills} kills landed");
    assert!(recovered(&k) > 0, "no connection was ever recovered");
}

/// hf-chat SIGKILLs itself at `fault` while 4 members talk; the room
/// client checks exactly-once, in-order delivery.
fn survives_fault(fault: &str) {
    let data = TempDir::new("chat");
    let k = chat_with(&data, &["--fault", fault]);
    let client = room_client(&k, &["--members", "4", "--per", "40", "--gap", "0.01"]);
    finish(client, &k);
    assert!(
        recovered(&k) >= 3,
        "the fault never fired:\n{}",
        tail(&k.log(), 20)
    );
}

#[test]
fn a_worker_dying_between_logging_and_committing_logs_once() {
    // Every 7th append of each worker ends it before the commit: the next
    // worker reads the same message again, and the log must not take it
    // twice (fails with the log's writer check off: 160 texts, 137
    // distinct).
    survives_fault("after-append:7");
}

#[test]
fn a_worker_dying_between_delivering_and_committing_delivers_once() {
    // Every 5th delivery round of each worker ends it after the frames went
    // out, before the commit: the next worker regenerates exactly those
    // frames, in the order the dead one chose, while members keep sending
    // (fails without the recorded choice: the connection is closed).
    survives_fault("after-send:5");
}

#[test]
fn fragments_and_pings_survive_kills() {
    let data = TempDir::new("chat");
    let mut k = chat(&data);
    let mut client = room_client(
        &k,
        &[
            "--members",
            "4",
            "--per",
            "100",
            "--gap",
            "0.01",
            "--fragment",
            "--ping",
        ],
    );
    let kills = while_running(&mut client, Duration::from_millis(110), |_| {
        k.kill_active();
    });
    finish(client, &k);
    assert!(kills >= 5, "only {kills} kills landed");
}

#[test]
fn a_large_upgrade_head_is_kept_and_resumed() {
    // A 600-byte cookie: the head goes to a held memfd, not the state blob.
    let data = TempDir::new("chat");
    let mut k = chat(&data);
    let mut client = room_client(
        &k,
        &[
            "--members",
            "3",
            "--per",
            "60",
            "--gap",
            "0.02",
            "--cookie",
            "600",
        ],
    );
    let kills = while_running(&mut client, Duration::from_millis(150), |_| {
        k.kill_active();
    });
    finish(client, &k);
    assert!(kills >= 3, "only {kills} kills landed");
}

#[test]
fn a_room_survives_upgrades_and_kills() {
    let data = TempDir::new("chat");
    let mut k = chat(&data);
    let exe = bin("hf-chat").display().to_string();
    let dir = data.path().display().to_string();
    let mut client = room_client(&k, &["--members", "4", "--per", "120", "--gap", "0.03"]);
    let mut upgrades = 0;
    while_running(&mut client, Duration::from_millis(200), |n| {
        if n % 3 == 1 {
            let (code, out, err) = k.upgrade(&[], &[&exe, "--data-dir", &dir]);
            assert_eq!(code, 0, "upgrade failed: {out} {err}");
            upgrades += 1;
        } else {
            k.kill_active();
        }
    });
    finish(client, &k);
    assert!(upgrades >= 2, "only {upgrades} upgrades ran");
    let moved: u64 = k
        .log()
        .lines()
        .filter(|l| l.contains("upgrade:"))
        .filter_map(|l| l.split("moved=").nth(1))
        .filter_map(|v| {
            v.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum();
    assert!(
        moved > 0,
        "no WebSocket was moved at a message boundary:\n{}",
        tail(&k.log(), 30)
    );
}

#[test]
fn an_upgrade_to_a_new_member_format_carries_the_room_on() {
    // v1 saves members in 24 bytes (state version 1); the upgrade brings a
    // build that saves 32 (version 2) and reads both; kills follow.
    let data = TempDir::new("chat");
    let mut k = chat(&data);
    let exe = bin("hf-chat").display().to_string();
    let dir = data.path().display().to_string();
    let mut client = room_client(&k, &["--members", "4", "--per", "100", "--gap", "0.03"]);
    let mut upgraded = false;
    while_running(&mut client, Duration::from_millis(250), |n| {
        if n == 1 {
            let (code, out, err) = k.upgrade(&[], &[&exe, "--data-dir", &dir, "--member-v2"]);
            assert_eq!(code, 0, "upgrade failed: {out} {err}");
            upgraded = true;
        } else if n > 1 {
            k.kill_active();
        }
    });
    finish(client, &k);
    assert!(upgraded, "the client finished before the upgrade");
}

#[test]
fn many_rooms_across_an_upgrade_deliver_without_inotify() {
    // 150 rooms across the two versions of an upgrade: readers are woken
    // through each log's futex word. No inotify instance (the per-user
    // limit is 128, and one delays a worker's death by ~14 ms).
    let data = TempDir::new("chat");
    let mut k = chat(&data);
    let mut members: Vec<TcpStream> = (0..150).map(|i| raw_ws(&k, &format!("r{i}"))).collect();
    let exe = bin("hf-chat").display().to_string();
    let dir = data.path().display().to_string();
    let (code, out, err) = k.upgrade(&[], &[&exe, "--data-dir", &dir]);
    assert_eq!(code, 0, "upgrade failed: {out} {err}");
    for (i, s) in members.iter_mut().enumerate() {
        s.write_all(&frame(1, true, format!("hi {i}").as_bytes()))
            .unwrap();
    }
    for (i, s) in members.iter_mut().enumerate() {
        let want = format!(r#"{{"seq":1,"from":"raw","text":"hi {i}"}}"#);
        let mut m = vec![0u8; 2 + want.len()];
        s.read_exact(&mut m).unwrap();
        assert_eq!(String::from_utf8_lossy(&m[2..]), want);
    }
    let pid = k.active_pid();
    let inotify = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|l| l.to_string_lossy().contains("inotify"))
        .count();
    assert_eq!(inotify, 0, "inotify instances in the worker");
}

/// Opens a WebSocket by hand; returns the stream after the 101.
fn raw_ws(k: &Keeper, room: &str) -> TcpStream {
    let mut s = TcpStream::connect(k.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET /ws/{room}?name=raw HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n"
    )
    .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut b).unwrap(), 1, "connection closed in the 101");
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{head}");
    s
}

/// A masked client frame.
fn frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
    let mask = [1u8, 2, 3, 4];
    let mut f = vec![if fin { 0x80 } else { 0 } | opcode];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n < 65536 => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// Reads frames until a close frame; returns its code. Panics if the
/// connection ends without one.
fn close_code(s: &mut TcpStream) -> u16 {
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        // Server frames are unmasked; skip data frames.
        let mut at = 0;
        while all.len() >= at + 2 {
            let len = usize::from(all[at + 1] & 0x7f);
            let (hl, len) = match len {
                126 if all.len() >= at + 4 => (
                    4,
                    usize::from(u16::from_be_bytes([all[at + 2], all[at + 3]])),
                ),
                126 | 127 => break,
                n => (2, n),
            };
            if all.len() < at + hl + len {
                break;
            }
            if all[at] & 0x0f == 8 {
                return u16::from_be_bytes([all[at + hl], all[at + hl + 1]]);
            }
            at += hl + len;
        }
        let n = s.read(&mut buf).expect("read");
        assert!(n > 0, "closed without a close frame");
        all.extend_from_slice(&buf[..n]);
    }
}

#[test]
fn hostile_frames_close_their_connection_only() {
    let data = TempDir::new("chat");
    let k = chat(&data);
    let bystander = room_client(&k, &["--members", "2", "--per", "30", "--room", "calm"]);

    // An unmasked frame from a client: 1002.
    let mut s = raw_ws(&k, "bad");
    s.write_all(&[0x81, 0x02, b'h', b'i']).unwrap();
    assert_eq!(close_code(&mut s), 1002);
    // Reserved bits: 1002.
    let mut s = raw_ws(&k, "bad");
    let mut f = frame(1, true, b"x");
    f[0] |= 0x40;
    s.write_all(&f).unwrap();
    assert_eq!(close_code(&mut s), 1002);
    // A message over hf-chat's 64 KiB: 1009, as soon as its header is read.
    let mut s = raw_ws(&k, "bad");
    let f = frame(1, true, &vec![b'a'; 70_000]);
    s.write_all(&f[..16]).unwrap();
    assert_eq!(close_code(&mut s), 1009);
    // Text that is not UTF-8: 1007.
    let mut s = raw_ws(&k, "bad");
    s.write_all(&frame(1, true, &[0xff, 0xfe])).unwrap();
    assert_eq!(close_code(&mut s), 1007);
    // A close frame is answered with one.
    let mut s = raw_ws(&k, "bad");
    s.write_all(&frame(8, true, &1000u16.to_be_bytes()))
        .unwrap();
    assert_eq!(close_code(&mut s), 1000);

    finish(bystander, &k);
    assert!(
        !k.log().contains("killed") && !k.log().contains("exited"),
        "a worker died:\n{}",
        tail(&k.log(), 20)
    );
}

#[test]
fn a_kill_between_a_ping_and_its_pong_is_invisible() {
    // Pings one at a time, each answered, with kills in between; then a
    // message still goes round.
    let data = TempDir::new("chat");
    let mut k = chat(&data);
    let mut s = raw_ws(&k, "pings");
    for i in 0..20u8 {
        s.write_all(&frame(9, true, &[i; 8])).unwrap();
        if i % 2 == 0 {
            k.kill_and_wait();
        }
        let mut pong = [0u8; 10];
        s.read_exact(&mut pong).unwrap();
        assert_eq!(pong[..2], [0x8a, 8], "frame {i}: {pong:?}");
        assert_eq!(pong[2..], [i; 8]);
    }
    s.write_all(&frame(1, true, b"after")).unwrap();
    let mut m = [0u8; 64];
    let n = s.read(&mut m).unwrap();
    let text = String::from_utf8_lossy(&m[2..n]);
    assert_eq!(
        text,
        r#"{"seq":1,"from":"raw","text":"after"}"#,
        "got {:?}",
        &m[..n]
    );
}
