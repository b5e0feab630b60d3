//! The demo and the status page in a real headless Chromium: the checks in
//! tests/browser/demo.test.mjs (node's test runner, playwright-core driving Debian's chromium),
//! run against an in-process `boshmux demo`. Screenshots land in target/screenshots/.

use std::process::Stdio;
use std::time::Duration;

#[tokio::test]
async fn the_demo_in_a_real_browser() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser");
    assert!(
        std::path::Path::new(dir)
            .join("node_modules/playwright-core")
            .exists(),
        "tests/browser/node_modules is missing: scripts/test runs `npm ci` there"
    );
    assert!(
        std::path::Path::new("/usr/bin/chromium").exists(),
        "/usr/bin/chromium is missing: scripts/test installs Debian's chromium"
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let demo = boshmux::demo::start(listener).await.unwrap();
    let shots = concat!(env!("CARGO_MANIFEST_DIR"), "/target/screenshots");
    let child = tokio::process::Command::new("node")
        .args(["--test", "--test-reporter=spec", "demo.test.mjs"])
        .current_dir(dir)
        .env("DEMO_URL", format!("http://{}", demo.addr))
        .env("DEMO_API_KEY", &demo.api_key)
        .env("SCREENSHOT_DIR", shots)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run node");
    let out = tokio::time::timeout(Duration::from_secs(180), child.wait_with_output())
        .await
        .expect("browser tests finish")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Shown with --nocapture (scripts/test): which browser checks ran.
    println!("{stdout}");
    assert!(
        out.status.success(),
        "browser tests failed:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("pass 6") && stdout.contains("fail 0"),
        "{stdout}"
    );
    assert!(
        std::path::Path::new(shots)
            .join("demo-two-tabs.png")
            .exists()
    );
    demo.stop().await.unwrap();
}
