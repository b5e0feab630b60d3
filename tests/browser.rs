//! The demo and the status page in a real headless Chromium: the checks in
//! tests/browser/demo.test.mjs (node's test runner, playwright-core driving Debian's chromium),
//! run against an in-process `boshmux demo`. Screenshots land in target/screenshots/.

mod support;

#[tokio::test]
async fn the_demo_in_a_real_browser() {
    assert!(
        std::path::Path::new("/usr/bin/chromium").exists(),
        "/usr/bin/chromium is missing: scripts/test installs Debian's chromium"
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let demo = boshmux::demo::start(listener).await.unwrap();
    let shots = concat!(env!("CARGO_MANIFEST_DIR"), "/target/screenshots");
    let report = support::node::node_tests(
        "tests/browser",
        "demo.test.mjs",
        &[
            ("DEMO_URL", format!("http://{}", demo.addr)),
            ("DEMO_API_KEY", demo.api_key.clone()),
            ("SCREENSHOT_DIR", shots.into()),
        ],
    )
    .await;
    assert!(report.contains("pass 6"), "{report}");
    assert!(
        std::path::Path::new(shots)
            .join("demo-two-tabs.png")
            .exists()
    );
    demo.stop().await.unwrap();
}
