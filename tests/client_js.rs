//! client-js's own test suite (node's built-in runner): its unit tests, and its integration tests
//! against an in-process `boshmux demo` (the daemon in front of the development server), whose
//! address, api key, domain and accounts are passed in the environment.

mod support;

#[tokio::test]
async fn client_js_passes_its_tests_against_the_daemon() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let demo = boshmux::demo::start(listener).await.unwrap();
    let users: Vec<String> = boshmux::demo::USERS
        .iter()
        .map(|(u, p)| format!("{u}:{p}"))
        .collect();
    let report = support::node::node_tests(
        "client-js",
        "test/",
        &[
            ("BOSHMUX_HTTP", format!("http://{}", demo.addr)),
            ("BOSHMUX_API_KEY", demo.api_key.clone()),
            ("BOSHMUX_DOMAIN", boshmux::demo::DOMAIN.into()),
            ("BOSHMUX_USERS", users.join(",")),
            (
                "BOSHMUX_ORIGIN",
                format!("http://127.0.0.1:{}", demo.addr.port()),
            ),
            ("BOSHMUX_CLIENT_JS_UNIT_ONLY", "0".into()),
        ],
    )
    .await;
    assert!(
        report.contains("iq() to the domain resolves"),
        "the integration tests ran:\n{report}"
    );
    demo.stop().await.unwrap();
}
