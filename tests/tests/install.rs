//! `cargo install --path crates/holdfast-cli` gives a `holdfast` that works
//! on its own: its demo proves zero loss with nothing but what the install
//! placed (no hf-httpd, no workspace on the PATH), and its completions and
//! manual page come with it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use hf_tests::{bin, wait_exit, Proc, TempDir};

/// The install, for real: cargo as the tests were run with, offline, with
/// the workspace's lock file, into a root of its own.
///
/// It builds in the workspace's target directory, where the tests' own
/// build of holdfast-cli is (same profile, same features: `cargo build
/// --release -p holdfast-cli` shares its artifacts), so after that build
/// the install only copies; run on sources changed since, it builds what
/// that build would have. cargo holds no lock on the target directory
/// while tests run, and no other test runs in this binary meanwhile.
fn install(into: &Path, log: &Path) -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let target = bin("holdfast")
        .parent()
        .and_then(Path::parent)
        .expect("target/release/holdfast")
        .to_owned();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut child = Proc(
        Command::new(cargo)
            .args(["install", "--offline", "--locked", "--path"])
            .arg(workspace.join("crates/holdfast-cli"))
            .arg("--root")
            .arg(into)
            .env("CARGO_TARGET_DIR", &target)
            .env_remove("CARGO_BUILD_TARGET_DIR")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(log).unwrap())
            .stderr(std::fs::File::create(log.with_extension("err")).unwrap())
            .spawn()
            .expect("run cargo install"),
    );
    let st = wait_exit(&mut child.0, Duration::from_secs(20 * 60))
        .expect("cargo install still running after 20 minutes");
    let err = std::fs::read_to_string(log.with_extension("err")).unwrap_or_default();
    assert!(st.success(), "cargo install: {st}\n{err}");
    into.join("bin")
}

#[test]
fn installed_holdfast_runs_its_demo_alone() {
    let dir = TempDir::new("install");
    let bin_dir = install(&dir.path().join("root"), &dir.path().join("install.log"));
    let mut installed: Vec<String> = std::fs::read_dir(&bin_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    installed.sort();
    assert_eq!(installed, ["holdfast", "holdfast-demo"]);
    let holdfast = bin_dir.join("holdfast");

    // Nothing of the workspace on the PATH, run from elsewhere.
    let run = |args: &[&str]| {
        let out = Command::new(&holdfast)
            .args(args)
            .env("PATH", "/usr/bin:/bin")
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (
            out.status,
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (st, out, err) = run(&["demo", "--check"]);
    assert!(st.success(), "installed demo --check: {st}\n{out}\n{err}");
    for w in [
        "under holdfast:",
        " 0 failed,",
        "plain restart:",
        "no request failed, every byte verified",
    ] {
        assert!(out.contains(w), "no {w:?} in the demo's output:\n{out}");
    }
    let (st, out, err) = run(&["completions", "bash"]);
    assert!(st.success(), "{err}");
    assert!(out.contains("complete -F _holdfast"), "{out}");
    let (st, out, err) = run(&["man"]);
    assert!(st.success(), "{err}");
    assert!(out.contains(".TH holdfast 1"), "{out}");
}
