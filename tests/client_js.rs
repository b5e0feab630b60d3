//! client-js's own test suite (node's built-in runner): its unit tests, and its integration tests
//! against an in-process `boshmux demo` (the daemon in front of the development server), whose
//! address, api key, domain and accounts are passed in the environment.

use std::process::Stdio;
use std::time::Duration;

#[tokio::test]
async fn client_js_passes_its_tests_against_the_daemon() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/client-js");
    assert!(
        std::path::Path::new(dir).join("node_modules/ws").exists(),
        "client-js/node_modules is missing: scripts/test runs `npm ci` there"
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let demo = boshmux::demo::start(listener).await.unwrap();
    let users: Vec<String> = boshmux::demo::USERS
        .iter()
        .map(|(u, p)| format!("{u}:{p}"))
        .collect();
    let child = tokio::process::Command::new("node")
        .args(["--test", "--test-reporter=spec", "test/"])
        .current_dir(dir)
        .env("BOSHMUX_HTTP", format!("http://{}", demo.addr))
        .env("BOSHMUX_API_KEY", &demo.api_key)
        .env("BOSHMUX_DOMAIN", boshmux::demo::DOMAIN)
        .env("BOSHMUX_USERS", users.join(","))
        .env(
            "BOSHMUX_ORIGIN",
            format!("http://127.0.0.1:{}", demo.addr.port()),
        )
        .env_remove("BOSHMUX_CLIENT_JS_UNIT_ONLY")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run node");
    let out = tokio::time::timeout(Duration::from_secs(180), child.wait_with_output())
        .await
        .expect("client-js tests finish")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "client-js tests failed:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("fail 0") && stdout.contains("skipped 0"),
        "{stdout}"
    );
    demo.stop().await.unwrap();
}
