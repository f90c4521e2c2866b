//! The control socket is its owner's alone: the keeper refuses a directory
//! another user created or can write, and control connections from another
//! uid; the client refuses such a directory and a keeper of another user.
//! (These tests run as root and play the other user as uid 65534.)

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use hf_tests::{bin, eventually, exit_and_stderr, run_cmd, term, wait_exit, Keeper, Proc, TempDir};

const OTHER_UID: u32 = 65534;

fn euid() -> u32 {
    rustix::process::geteuid().as_raw()
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// `holdfast ARGS` with the default control path under `tmp`: no
/// `XDG_RUNTIME_DIR`, `TMPDIR=tmp`.
fn holdfast_in(tmp: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(bin("holdfast"));
    c.args(args)
        .env("TMPDIR", tmp)
        .env_remove("XDG_RUNTIME_DIR")
        .env("HOLDFAST_LOG", "info");
    c
}

fn run_default(tmp: &Path) -> Command {
    let svc = bin("hf-testsvc").display().to_string();
    holdfast_in(tmp, &["run", "--listen", "127.0.0.1:0", "--", &svc])
}

/// The attack: without `XDG_RUNTIME_DIR` and `--control`, the
/// keeper's directory is `$TMPDIR/holdfast-UID`; another user created it
/// first, world-writable, and listens there. The keeper refuses to start,
/// and `holdfast upgrade` sends its command line to nobody; a directory of
/// ours that others can write is refused too; a missing one is created
/// owner-only.
#[test]
fn squatted_control_directory_is_refused() {
    let tmp = TempDir::new("control-squat");
    let dir = tmp.path().join(format!("holdfast-{}", euid()));
    std::fs::create_dir(&dir).unwrap();
    std::os::unix::fs::chown(&dir, Some(OTHER_UID), Some(OTHER_UID)).unwrap();
    chmod(&dir, 0o1777);
    let squatter = UnixListener::bind(dir.join("control.sock")).unwrap();
    squatter.set_nonblocking(true).unwrap();

    let (st, err) = exit_and_stderr(
        &mut run_default(tmp.path()),
        Duration::from_secs(10),
        "a keeper on a squatted control directory",
    );
    assert!(!st.success(), "{err}");
    assert!(
        err.contains(&dir.display().to_string()) && err.contains("owned by uid 65534"),
        "stderr does not say whose directory it is:\n{err}"
    );
    let (code, out, err) = run_cmd(&mut holdfast_in(
        tmp.path(),
        &["upgrade", "--", "/srv/app-v2", "--token", "hunter2"],
    ));
    assert_ne!(code, 0, "{out}");
    assert!(err.contains("owned by uid 65534"), "{err}");
    let (code, out, err) = run_cmd(&mut holdfast_in(tmp.path(), &["status"]));
    assert_ne!(code, 0, "{out}");
    assert!(err.contains("owned by uid 65534"), "{err}");
    assert!(
        squatter.accept().is_err(),
        "a client connected to the squatter's socket"
    );
    drop(squatter);

    // Ours, but writable by others.
    std::fs::remove_file(dir.join("control.sock")).unwrap();
    std::os::unix::fs::chown(&dir, Some(euid()), Some(0)).unwrap();
    chmod(&dir, 0o777);
    let (st, err) = exit_and_stderr(
        &mut run_default(tmp.path()),
        Duration::from_secs(10),
        "a keeper on a world-writable control directory",
    );
    assert!(!st.success(), "{err}");
    assert!(err.contains("writable by other users"), "{err}");

    // Missing: the keeper makes it, owner-only, and the client finds it.
    std::fs::remove_dir(&dir).unwrap();
    let mut keeper = Proc(
        run_default(tmp.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let control = dir.join("control.sock");
    hf_tests::wait_status(
        &control,
        "the keeper serving",
        Duration::from_secs(20),
        |s| s.phase == hf_tests::Phase::Serving,
    );
    let md = std::fs::symlink_metadata(&dir).unwrap();
    assert_eq!((md.uid(), md.mode() & 0o7777), (euid(), 0o700));
    let (code, out, err) = run_cmd(&mut holdfast_in(tmp.path(), &["status", "--json"]));
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("\"serving\""), "{out}");
    term(keeper.0.id());
    let st = wait_exit(&mut keeper.0, Duration::from_secs(10)).expect("keeper exit");
    assert!(st.success(), "{st}");
}

/// Another uid reaching the control socket (its directory and mode opened
/// up by hand) is refused by the keeper itself: no status, no upgrade.
#[test]
fn control_connection_from_another_uid_is_refused() {
    let svc = bin("hf-testsvc").display().to_string();
    let mut k = Keeper::start(&[], &[&svc]);
    let ctl = k.control.display().to_string();
    chmod(k.control.parent().unwrap(), 0o755);
    chmod(&k.control, 0o666);
    let as_other = |args: &[&str]| {
        let mut c = Command::new(bin("holdfast"));
        c.args(args).uid(OTHER_UID).gid(OTHER_UID);
        run_cmd(&mut c)
    };
    let (code, out, err) = as_other(&["status", "--json", "--control", &ctl]);
    assert_ne!(code, 0, "uid {OTHER_UID} got the status:\n{out}");
    assert!(!out.contains("keeper_pid"), "{out}");
    assert!(err.contains("permission denied"), "{err}");
    let (code, out, err) = as_other(&["upgrade", "--control", &ctl, "--", "/bin/true"]);
    assert_ne!(code, 0, "{out}");
    assert!(err.contains("permission denied"), "{err}");
    let s = k
        .status()
        .expect("the keeper's own user still gets the status");
    assert_eq!(
        (s.upgrades, s.failed_upgrades, s.generation),
        (0, 0, 1),
        "an upgrade from uid {OTHER_UID} reached the keeper"
    );
    assert!(
        k.log().contains("control connection refused"),
        "log:\n{}",
        k.log()
    );
    let _ = k.wait_for("still serving", |s| s.phase == hf_tests::Phase::Serving);
}

/// The client talks only to a keeper of its own user (or root): a socket
/// of another user's keeper, moved into a directory the client trusts, is
/// refused after connecting (`SO_PEERCRED`), before any command is sent.
#[test]
fn client_refuses_a_keeper_of_another_user() {
    let theirs = TempDir::new("control-theirs");
    std::os::unix::fs::chown(theirs.path(), Some(OTHER_UID), Some(OTHER_UID)).unwrap();
    chmod(theirs.path(), 0o700);
    let log: PathBuf = theirs.path().join("keeper.log");
    let logf = std::fs::File::create(&log).unwrap();
    let svc = bin("hf-testsvc").display().to_string();
    let mut other = Command::new(bin("holdfast"));
    other
        .args(["run", "--listen", "127.0.0.1:0", "--control"])
        .arg(theirs.path().join("control.sock"))
        .args(["--", &svc])
        .uid(OTHER_UID)
        .gid(OTHER_UID)
        .stdin(Stdio::null())
        .stdout(logf.try_clone().unwrap())
        .stderr(logf);
    let mut other = Proc(other.spawn().unwrap());
    eventually(
        Duration::from_secs(20),
        "the other user's keeper serving",
        || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("worker active")
                .then_some(())
        },
    );
    let ours = TempDir::new("control-ours");
    let control = ours.path().join("control.sock");
    std::fs::rename(theirs.path().join("control.sock"), &control).unwrap();
    let ctl = control.display().to_string();

    let (code, out, err) = run_cmd(Command::new(bin("holdfast")).args([
        "upgrade",
        "--control",
        &ctl,
        "--",
        "/srv/app-v2",
        "--token",
        "hunter2",
    ]));
    assert_ne!(code, 0, "{out}");
    assert!(err.contains("runs as uid 65534"), "{err}");
    let (code, out, err) =
        run_cmd(Command::new(bin("holdfast")).args(["status", "--control", &ctl]));
    assert_ne!(code, 0, "{out}");
    assert!(err.contains("runs as uid 65534"), "{err}");
    let theirs_log = std::fs::read_to_string(&log).unwrap();
    assert!(
        !theirs_log.contains("hunter2"),
        "the other user's keeper received the command:\n{theirs_log}"
    );
    term(other.0.id());
    let _ = wait_exit(&mut other.0, Duration::from_secs(10));
}

/// Sends `request` as it is on the control socket and returns the one line
/// the keeper answers.
fn raw_request(control: &Path, request: &[u8]) -> String {
    use std::io::{BufRead, Write};
    let mut s = std::os::unix::net::UnixStream::connect(control).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // A refused request may be answered before it is all sent.
    let _ = s.write_all(request);
    let mut line = String::new();
    std::io::BufReader::new(s).read_line(&mut line).unwrap();
    line
}

/// Requests the keeper cannot take — not JSON, an unknown command, one
/// whose name needs escaping, missing arguments, one longer than the limit
/// — are each answered with a JSON error that says why, and the keeper
/// goes on serving and answering.
#[test]
fn malformed_control_requests_get_a_clear_error_and_the_keeper_goes_on() {
    let svc = bin("hf-testsvc").display().to_string();
    let mut k = Keeper::start(&[], &[&svc]);
    let before = k.wait_for("serving", |s| s.phase == hf_tests::Phase::Serving);
    let long = format!(
        "{{\"cmd\":\"status\",\"pad\":\"{}\"}}\n",
        "x".repeat(hf_keeper::proto::MAX_REQUEST)
    );
    let cases: [(&[u8], &str, &str); 6] = [
        (
            b"status\n",
            "malformed",
            "malformed request: expected value",
        ),
        (
            b"{\"cmd\":\"frobnicate\"}\n",
            "unknown_command",
            "unknown command \"frobnicate\" (the keeper knows: status, upgrade, upgrade_keeper)",
        ),
        (
            "{\"cmd\":\"\\u001b[2J\u{e9}\"}\n".as_bytes(),
            "unknown_command",
            "unknown command \"\\u{1b}[2J\u{e9}\"",
        ),
        (
            b"{\"cmd\":\"upgrade\"}\n",
            "bad_arguments",
            "bad arguments to \"upgrade\": missing field `upgrade`",
        ),
        (
            b"{\"cmd\":42}\n",
            "malformed",
            "malformed request: \"cmd\" is not a string",
        ),
        (
            long.as_bytes(),
            "too_long",
            "request longer than 65536 bytes",
        ),
    ];
    for (request, code, says) in cases {
        let line = raw_request(&k.control, request);
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"));
        assert_eq!(v["code"], code, "{line}");
        let error = v["error"].as_str().unwrap_or_default();
        assert!(
            error.starts_with(says),
            "{error:?} does not start with {says:?}"
        );
    }
    // The keeper is unharmed: same process, still serving, nothing upgraded.
    let after = k.status().expect("status after the bad requests");
    assert_eq!(after.keeper_pid, before.keeper_pid);
    assert_eq!(after.phase, hf_tests::Phase::Serving);
    assert_eq!((after.upgrades, after.failed_upgrades), (0, 0));
    // The typed client reads such an answer as an error with its text.
    let e = hf_keeper::proto::parse_reply::<hf_tests::Snapshot>(&raw_request(
        &k.control,
        b"{\"cmd\":\"frobnicate\"}\n",
    ))
    .unwrap_err();
    assert!(e.to_string().starts_with("unknown command"), "{e}");
    assert!(k.log().contains("control request refused"), "{}", k.log());
}
