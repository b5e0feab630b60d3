//! `boshmux load` in a small configuration, for correctness only (timings are recorded in
//! BENCHMARKS.md, never asserted): against an in-process demo daemon, and in `--direct` mode
//! against the development server's BOSH endpoint.

use std::time::Duration;

use boshmux::load::{LoadArgs, PageTransport, run};

fn args(url: String, api_key: String) -> LoadArgs {
    LoadArgs {
        url,
        api_key,
        domain: boshmux::demo::DOMAIN.into(),
        users: 4,
        pages: 3,
        user_prefix: "user".into(),
        password_prefix: "pw-".into(),
        rate: 40.0,
        duration: Duration::from_secs(1),
        concurrency: 8,
        page_transport: PageTransport::Websocket,
        direct: None,
        watch_pids: vec![std::process::id()],
        json: None,
        quiet: true,
        failover_kills: 0,
        failover_nodes: vec![],
        failover_serve: String::new(),
        failover_haproxy_socket: None,
        failover_contact_bosh: None,
        failover_probe: Duration::from_millis(200),
        failover_limit: Duration::from_secs(30),
        failover_settle: Duration::from_secs(3),
    }
}

#[tokio::test]
async fn the_load_tool_measures_both_modes() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let demo = boshmux::demo::start_with(listener, 4).await.unwrap();
    let json = std::env::temp_dir().join(format!("boshmux-load-{}.json", std::process::id()));

    let mut a = args(format!("http://{}", demo.addr), demo.api_key.clone());
    a.json = Some(json.clone());
    let r = run(a).await.unwrap();
    assert_eq!(r.mode, "boshmux");
    assert_eq!(r.pages_joined, 12);
    assert!(r.messages_sent > 0);
    assert_eq!(
        r.deliveries_expected,
        r.messages_sent * 3,
        "every page of the recipient"
    );
    assert_eq!(r.deliveries, r.deliveries_expected, "{r}");
    assert!(r.errors.is_empty(), "{r}");
    assert_eq!(r.join_ms.count, 12);
    assert_eq!(r.latency_ms.count as u64, r.deliveries);
    assert!(r.upstream_requests.is_some_and(|n| n > 0), "{r}");
    assert!(r.watched[0].rss_kib.is_some());
    let saved: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(saved["deliveries"], r.deliveries);
    let _ = std::fs::remove_file(&json);

    // Pages that speak BOSH to the daemon (SPEC §4b): the same deliveries.
    let mut b = args(format!("http://{}", demo.addr), demo.api_key.clone());
    b.page_transport = PageTransport::Bosh;
    let r = run(b).await.unwrap();
    assert_eq!(r.mode, "boshmux");
    assert_eq!(r.pages_joined, 12);
    assert_eq!(r.deliveries, r.deliveries_expected, "{r}");
    assert!(r.errors.is_empty(), "{r}");

    let mut d = args(format!("http://{}", demo.addr), String::new());
    d.direct = Some(demo.bosh_url.clone());
    let r = run(d).await.unwrap();
    assert_eq!(r.mode, "direct");
    assert_eq!(r.pages_joined, 12);
    assert_eq!(r.deliveries, r.deliveries_expected, "{r}");
    assert!(r.errors.is_empty(), "{r}");
    assert!(r.upstream_requests.is_some_and(|n| n > 0), "{r}");
    demo.stop().await.unwrap();
}

#[tokio::test]
async fn it_refuses_more_pages_than_it_may_open() {
    let mut a = args("http://127.0.0.1:9".into(), String::new());
    a.users = 1_000_000;
    let err = run(a).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("sockets needed but this process may open"),
        "{err}"
    );
}
