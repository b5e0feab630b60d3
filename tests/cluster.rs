//! SPEC §12, the cluster harness itself (tests/support/cluster.rs): three `boshmux serve`
//! processes on one Redis database behind HAProxy configured as `contrib/haproxy.cfg`. What the
//! balancer must do for the cluster tests to mean anything: spread requests over the nodes, take
//! a frozen node out of rotation within seconds of its missed health checks, and keep answering
//! when a node dies between two checks.
//!
//! Redis database 4 of the test Redis. No accounts.

mod support;

use std::time::Duration;

use support::cluster::Cluster;
use support::daemon::Daemon;

/// A frozen or killed node leaves rotation within this (contrib/haproxy.cfg: checks every
/// 500 ms, 750 ms to answer, down after two failures: ~2 s), with a margin for a loaded machine.
const OUT_OF_ROTATION: Duration = Duration::from_secs(5);

/// `GET /healthz` through `lb`: its status, failing the test if no answer comes in 5 s.
async fn healthz(http: &reqwest::Client, lb: &Daemon) -> u16 {
    tokio::time::timeout(Duration::from_secs(5), http.get(lb.url("/healthz")).send())
        .await
        .expect("the balancer answers within 5 s")
        .expect("the balancer answers")
        .status()
        .as_u16()
}

/// Requests HAProxy sent to each node so far.
async fn sessions(c: &Cluster) -> Vec<u64> {
    c.servers().await.iter().map(|s| s.sessions).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_spreads_requests_and_routes_around_a_frozen_or_killed_node() {
    let p = support::prosody();
    let mut c = Cluster::start(&p, 3, 4, &[]).await;
    let lb = c.balancer();
    let http = reqwest::Client::new();

    let before = sessions(&c).await;
    for _ in 0..60 {
        assert_eq!(healthz(&http, &lb).await, 200, "{}", c.logs());
    }
    let after = sessions(&c).await;
    let got: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    assert_eq!(got.iter().sum::<u64>(), 60, "every request reached a node");
    assert!(
        got.iter().all(|&n| n >= 10),
        "requests spread over the three nodes: {got:?}"
    );

    // Frozen: it still accepts connections, only the check timeout finds it.
    c.sigstop(0);
    let took = c.wait_down(0).await;
    assert!(
        took < OUT_OF_ROTATION,
        "frozen node out of rotation after {took:?}"
    );
    let frozen_before = sessions(&c).await[0];
    for _ in 0..30 {
        assert_eq!(healthz(&http, &lb).await, 200, "{}", c.logs());
    }
    assert_eq!(
        sessions(&c).await[0],
        frozen_before,
        "nothing was sent to the frozen node"
    );
    c.sigcont(0);
    c.wait_up(0).await;

    // Killed between two checks: requests sent to it are redispatched, none fails.
    c.kill9(1).await;
    for _ in 0..30 {
        assert_eq!(healthz(&http, &lb).await, 200, "{}", c.logs());
    }
    let killed = &c.servers().await[1];
    assert!(
        killed.redispatched > 0,
        "some requests reached the dead node before its checks failed, and were redispatched: {killed:?}"
    );
    let took = c.wait_down(1).await;
    assert!(
        took < OUT_OF_ROTATION,
        "killed node out of rotation after {took:?}"
    );
    let after_kill = sessions(&c).await;
    for _ in 0..30 {
        assert_eq!(healthz(&http, &lb).await, 200, "{}", c.logs());
    }
    let got = sessions(&c).await;
    assert_eq!(got[1], after_kill[1], "nothing was sent to the dead node");
    assert!(
        got[0] > after_kill[0] && got[2] > after_kill[2],
        "the two live nodes share the load: {after_kill:?} → {got:?}"
    );
}
