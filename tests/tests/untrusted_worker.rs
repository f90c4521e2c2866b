//! The keeper trusts nothing a worker says or writes. A rogue worker
//! (Python, speaking just enough of the protocol) scribbles over the journal
//! records of its connections, names connections it does not own, holds
//! channels for them and more channels than allowed, sends malformed and
//! wrong-direction messages, and dies; a second one sends pure
//! garbage. The keeper stays up, kills what misbehaves, keeps new
//! connections waiting, and a well-behaved worker then serves them.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use hf_tests::testsvc::answer;
use hf_tests::{bin, wait_status, Phase, TempDir};

const ROGUE: &str = r#"
import os, sys, socket, mmap, struct, array, time

def crc32c(data):
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF

def frame(kind, payload):
    head = struct.pack("<HBBI", 0x4846, 1, kind, len(payload)) + payload
    return head + struct.pack("<I", crc32c(head))

counter, good = sys.argv[1], sys.argv[2:]
n = int(open(counter).read()) + 1 if os.path.exists(counter) else 1
open(counter, "w").write(str(n))
ctl = socket.socket(fileno=int(os.environ["HOLDFAST_CONTROL_FD"]))
journal = int(os.environ["HOLDFAST_JOURNAL_FD"])

if n == 1:
    ctl.send(frame(0x01, struct.pack("<IHHHH", os.getpid(), 3, 1, 1, 1)))  # Hello, protocol 3
    ctl.recv(65536)                                                    # Welcome
    ctl.send(frame(0x02, b""))                                         # Ready
    fds = array.array("i")
    while True:
        msg, anc, _, _ = ctl.recvmsg(65536, socket.CMSG_SPACE(253 * 4))
        if msg[3] == 0x83:                                             # Conns
            break
    count = struct.unpack_from("<H", msg, 8)[0]
    m = mmap.mmap(journal, 4096 + 1024 * 64)
    for i in range(count):
        conn_id, slot, flags = struct.unpack_from("<QIB", msg, 10 + 13 * i)
        off = 4096 + 1024 * slot
        m[off:off + 1024] = os.urandom(1024)                           # scribble
        ctl.send(frame(0x03, struct.pack("<QI", conn_id + 1000, slot + 7)))  # not ours
        r, w = os.pipe()
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r]))]
        # A channel for a connection it does not own, then more channels
        # than one connection may hold.
        ctl.sendmsg([frame(0x07, struct.pack("<QII", conn_id + 1000, slot, 1))], rights)
        for tag in range(12):
            ctl.sendmsg([frame(0x07, struct.pack("<QII", conn_id, slot, tag))], rights)
        ctl.send(frame(0x08, struct.pack("<QII", conn_id + 1000, slot, 1)))  # unhold, not ours
        ctl.send(frame(0x09, struct.pack("<QIII", conn_id + 1000, slot, 1, 2)))  # accept, not ours
        os.write(w, b"x")                                              # readable...
        ctl.send(frame(0x09, struct.pack("<QIII", conn_id, slot, 1, 2)))  # ...accept on a pipe
    ctl.send(frame(0x83, struct.pack("<H", 0)))                        # wrong direction
    bad = bytearray(frame(0x02, b"")); bad[-1] ^= 0xFF
    ctl.send(bytes(bad))                                               # bad checksum
    time.sleep(0.2)
    os._exit(3)
elif n == 2:
    for _ in range(50):
        ctl.send(os.urandom(64))                                       # pure garbage
    time.sleep(5)
    os._exit(4)
else:
    os.execv(good[0], good)
"#;

#[test]
fn rogue_workers_cannot_take_the_keeper_down() {
    let dir = TempDir::new("rogue");
    let control = dir.path().join("control.sock");
    let script = dir.path().join("rogue.py");
    std::fs::write(&script, ROGUE).unwrap();
    let log = dir.path().join("keeper.log");
    let logf = std::fs::File::create(&log).unwrap();
    let port = hf_tests::free_port();
    let mut keeper = hf_tests::Proc(
        Command::new(bin("holdfast"))
            .args([
                "run",
                "--standby",
                "0",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--control",
            ])
            .arg(&control)
            .arg("--")
            .arg("python3")
            .arg(&script)
            .arg(dir.path().join("counter"))
            .arg(bin("hf-testsvc"))
            .stdin(Stdio::null())
            .stdout(logf.try_clone().unwrap())
            .stderr(logf)
            .spawn()
            .expect("start holdfast"),
    );
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_status(&control, "the rogue active", Duration::from_secs(20), |s| {
        s.phase == Phase::Serving
    });

    // A: handed to the rogue, which scribbles over its journal record.
    let mut a = TcpStream::connect(addr).unwrap();
    a.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    // The rogue dies; the keeper kills the garbage-sending second worker
    // and starts a real hf-testsvc after a back-off.
    wait_status(
        &control,
        "the rogue's death",
        Duration::from_secs(20),
        |s| s.restarts >= 1,
    );
    // B arrives while no good worker runs: it waits, then is served.
    let mut b = TcpStream::connect(addr).unwrap();
    b.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    b.write_all(b"REQ 7 5000 0\n").unwrap();
    let want = answer(7, 5000, 0);
    let mut got = vec![0u8; want.len()];
    b.read_exact(&mut got)
        .expect("B is answered by the good worker");
    assert!(got == want, "B's answer differs");

    let s = wait_status(
        &control,
        "a good worker serving",
        Duration::from_secs(20),
        |s| s.phase == Phase::Serving && s.last_exits.len() >= 2,
    );
    // The keeper kills a worker at its first malformed message (the first
    // rogue may also have managed to exit on its own).
    assert!(
        s.last_exits
            .iter()
            .filter(|e| e.contains("SIGKILL") || e.contains("exited with code 3"))
            .count()
            >= 2,
        "{:?}",
        s.last_exits
    );
    assert!(
        s.last_exits
            .iter()
            .any(|e| e.contains("Starting) killed by SIGKILL")),
        "{:?}",
        s.last_exits
    );

    // A's record was destroyed by its own worker: the successor cannot
    // resume it and closes it cleanly instead of guessing.
    let mut buf = [0u8; 16];
    match a.read(&mut buf) {
        Ok(0) => {}
        other => panic!("A should see a clean close, got {other:?}"),
    }
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("malformed control message"), "log:\n{text}");
    assert!(text.contains("does not own"), "log:\n{text}");
    assert!(text.contains("journal record"), "log:\n{text}");
    assert!(
        text.contains("channel for a connection the worker does not own"),
        "log:\n{text}"
    );
    assert!(text.contains("too many held channels"), "log:\n{text}");
    assert!(
        text.contains("unhold for a connection the worker does not own"),
        "log:\n{text}"
    );
    assert!(
        text.contains("accept for a connection the worker does not own"),
        "log:\n{text}"
    );
    assert!(
        text.contains("cannot accept on a held channel"),
        "log:\n{text}"
    );

    hf_tests::term(keeper.0.id());
    let st = hf_tests::wait_exit(&mut keeper.0, Duration::from_secs(10))
        .expect("keeper stops on SIGTERM");
    assert!(st.success(), "keeper exit: {st}");
}
