//! Running node test suites (client-js, the browser tests) from Rust tests.

use std::process::Stdio;
use std::time::Duration;

/// Runs `node --test --test-reporter=spec FILES` in `dir` (relative to the crate) with `env`,
/// fails the calling test unless every node test passed and none was skipped, and returns the
/// report (printed too, for `--nocapture`).
pub async fn node_tests(dir: &str, files: &str, env: &[(&str, String)]) -> String {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    assert!(
        dir.join("node_modules").exists(),
        "{}/node_modules is missing: scripts/test runs `npm ci` there",
        dir.display()
    );
    let mut cmd = tokio::process::Command::new("node");
    cmd.args(["--test", "--test-reporter=spec", files])
        .current_dir(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().expect("run node");
    let out = tokio::time::timeout(Duration::from_secs(180), child.wait_with_output())
        .await
        .expect("node tests finish in time")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "node tests failed:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("fail 0") && stdout.contains("skipped 0"),
        "{stdout}"
    );
    stdout
}
