//! Hostile HTTP clients (SPEC §3, §5, §9), against the fake connection manager: `/handoff`
//! redirects that would leave the site, silent and slow connections, an upgrade flood from one
//! client, over-size and mistyped API bodies, and the status page's headers.

mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use boshmux::config::Config;
use boshmux::fake_cm::FakeCm;
use support::daemon::{API_KEY, Daemon, ORIGIN, Page};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpSocket, TcpStream};

const FLOODER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
const NEIGHBOUR: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
const SLOW: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3));
/// Longest any single expected event may take.
const LIMIT: Duration = Duration::from_secs(15);

async fn fake() -> FakeCm {
    support::fake_with(&[("u0", "p0"), ("u1", "p1"), ("u2", "p2")]).await
}

async fn daemon(fake: &FakeCm, tune: impl FnOnce(&mut Config)) -> Daemon {
    Daemon::start(&fake.url(), "example.test", tune).await
}

/// An HTTP client whose connections come from `from`; redirects are not followed.
fn http_from(from: IpAddr) -> reqwest::Client {
    boshmux::bosh::transport::install_crypto_provider();
    reqwest::Client::builder()
        .local_address(from)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

async fn tcp_from(from: IpAddr, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(from, 0)).unwrap();
    socket.connect(to).await.unwrap()
}

/// Reads until the daemon closes the connection (end of stream or reset); panics after `LIMIT`.
async fn closed_by_daemon(mut tcp: TcpStream, what: String) {
    let mut buf = vec![0u8; 64 * 1024];
    tokio::time::timeout(LIMIT, async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what}: still open after {LIMIT:?}"));
}

async fn get_handoff(d: &Daemon, ticket: &str, next: &str) -> reqwest::Response {
    let mut url = reqwest::Url::parse(&d.url("/handoff")).unwrap();
    url.query_pairs_mut()
        .append_pair("ticket", ticket)
        .append_pair("next", next);
    http_from(NEIGHBOUR).get(url).send().await.unwrap()
}

#[tokio::test]
async fn handoff_redirects_only_on_site_or_to_allowed_origins_and_a_refusal_keeps_the_ticket() {
    let f = fake().await;
    let d = daemon(&f, |c| {
        c.allowed_origins = vec!["https://app.example.com".into()];
    })
    .await;
    let h = d.handoff("u0", "p0").await;
    // Each value is what `next` decodes to (the query is percent-encoded on the way).
    let refused = [
        "/\t/evil.com",
        "/\n/evil.com",
        "/\r/evil.com",
        "/\r\n/evil.com",
        "\t//evil.com",
        " //evil.com",
        "/\\evil.com",
        "\\\\evil.com",
        "//evil.com",
        "///evil.com",
        "/.//evil.com",
        "/a/..//evil.com",
        "https://evil.com/",
        "HTTPS://EVIL.COM/",
        "https:evil.com",
        "https://app.example.com.evil.com/",
        "https://app.example.com@evil.com/",
        "https://user:pw@app.example.com/",
        "http://app.example.com/",
        "https://\u{430}pp.example.com/",
        "https://xn--pp-6kc.example.com/",
        "javascript:alert(1)",
        "JavaScript:alert(1)",
        "data:text/html,x",
        "chat",
    ];
    for next in refused {
        let resp = get_handoff(&d, &h.ticket, next).await;
        assert_eq!(resp.status(), 400, "next={next:?}");
        assert!(resp.headers().get("location").is_none(), "next={next:?}");
        assert!(resp.headers().get("set-cookie").is_none(), "next={next:?}");
        let body: serde_json::Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
        assert!(body["error"].as_str().is_some(), "next={next:?}: {body}");
    }
    // The same, with the control characters raw in the request line: refused before routing.
    for raw in ["/%2F\t/evil.com", "/\r/evil.com", "/\n/evil.com"] {
        let mut tcp = tcp_from(NEIGHBOUR, d.addr).await;
        let request = format!(
            "GET /handoff?ticket={}&next={raw} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            h.ticket
        );
        tcp.write_all(request.as_bytes()).await.unwrap();
        let mut answer = String::new();
        let _ = tcp.read_to_string(&mut answer).await;
        assert!(
            answer.starts_with("HTTP/1.1 400"),
            "raw {raw:?}: {answer:?}"
        );
        assert!(
            !answer.to_ascii_lowercase().contains("location:"),
            "{answer}"
        );
    }
    // Neither kind of refusal used the ticket up.
    let resp = get_handoff(&d, &h.ticket, "/chat/../room?x=1").await;
    assert_eq!(resp.status(), 303);
    assert_eq!(resp.headers()["location"], "/room?x=1");
    assert!(resp.headers().get("set-cookie").is_some());
    // Now it is.
    assert_eq!(get_handoff(&d, &h.ticket, "/").await.status(), 403);
    // An allowed origin, written any way a browser accepts, lands on its canonical form.
    let h = d.handoff("u0", "p0").await;
    let resp = get_handoff(&d, &h.ticket, "HTTPS://App.Example.COM:443/chat").await;
    assert_eq!(resp.status(), 303);
    assert_eq!(resp.headers()["location"], "https://app.example.com/chat");
    d.stop().await;
}

#[tokio::test]
async fn silent_and_slow_connections_are_closed_and_never_crowd_out_others() {
    let f = fake().await;
    let cap = 30;
    let d = daemon(&f, |c| {
        c.limits.connections_per_address = cap;
        c.limits.header_read_timeout = Duration::from_secs(1);
        c.limits.http_idle_timeout = Duration::from_secs(2);
    })
    .await;
    // 300 connections that send nothing, from one address: all but `cap` are closed at once.
    let mut silent = Vec::new();
    for _ in 0..300 {
        silent.push(tcp_from(FLOODER, d.addr).await);
    }
    // Slow clients from another address, each sending a header line every 200 ms.
    let slow_lines = Arc::new(AtomicUsize::new(0));
    let slow: Vec<_> = (0..10)
        .map(|i| {
            let addr = d.addr;
            let lines = slow_lines.clone();
            tokio::spawn(async move {
                let mut tcp = tcp_from(SLOW, addr).await;
                tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                    .await
                    .unwrap();
                let mut buf = [0u8; 1024];
                for n in 0.. {
                    tokio::select! {
                        r = tcp.read(&mut buf) => match r {
                            Ok(0) | Err(_) => return n,
                            Ok(_) => {}
                        },
                        () = tokio::time::sleep(Duration::from_millis(200)) => {
                            let line = format!("X-Slow-{i}: {n}\r\n");
                            if tcp.write_all(line.as_bytes()).await.is_err() {
                                return n;
                            }
                            lines.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                unreachable!()
            })
        })
        .collect();
    // Meanwhile everything works for another client: health, the API, a hand-off and a page.
    let http = http_from(NEIGHBOUR);
    let health = http.get(d.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let list = http
        .get(d.url("/api/v1/sessions"))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(list.status(), 200);
    let handoff: serde_json::Value = http
        .post(d.url("/api/v1/sessions"))
        .bearer_auth(API_KEY)
        .header("content-type", "application/json")
        .body(serde_json::json!({"jid": "u1@example.test", "password": "p1"}).to_string())
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .map(|b| serde_json::from_slice(&b).unwrap())
        .unwrap();
    let token = handoff["token"].as_str().expect("a token");
    let mut page = Page::open_from(&d, NEIGHBOUR, &[]).await.expect("upgrade");
    page.login_plain("u1", token).await.expect("page login");
    // Every silent connection is closed: those over the cap at once, the rest after the timeout.
    futures_util::future::join_all(
        silent
            .into_iter()
            .enumerate()
            .map(|(i, tcp)| closed_by_daemon(tcp, format!("silent connection {i}"))),
    )
    .await;
    // The slow ones too, although they never stopped sending.
    for s in slow {
        let lines = tokio::time::timeout(LIMIT, s)
            .await
            .expect("a slow client is closed")
            .unwrap();
        assert!(lines < 20, "a slow client sent {lines} header lines");
    }
    assert!(slow_lines.load(Ordering::Relaxed) > 0);
    // The page is untouched by all this (upgraded connections have their own limits).
    page.sync().await;
    // The address is usable again once its connections are gone.
    let again = http_from(FLOODER)
        .get(d.url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 200);
    d.stop().await;
}

#[tokio::test]
async fn an_idle_keep_alive_connection_and_one_that_does_not_read_are_closed() {
    let f = fake().await;
    let d = daemon(&f, |c| {
        c.limits.header_read_timeout = Duration::from_millis(500);
        c.limits.http_idle_timeout = Duration::from_secs(1);
    })
    .await;
    // One whole request, then nothing: the keep-alive wait is bounded by the header timeout.
    let mut idle = tcp_from(NEIGHBOUR, d.addr).await;
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 512];
    let n = idle.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    closed_by_daemon(idle, "idle keep-alive connection".into()).await;
    // Pipelined requests whose answers are never read: once the socket buffers are full no byte
    // moves, and the connection is closed after the idle timeout.
    let mut stuck = tcp_from(NEIGHBOUR, d.addr).await;
    let requests = "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".repeat(4000);
    let mut written = 0;
    let write = tokio::time::timeout(LIMIT, async {
        // Writing stops when the daemon stops reading; the close then fails the write.
        while written < requests.len() {
            match stuck.write(&requests.as_bytes()[written..]).await {
                Ok(n) => written += n,
                Err(_) => break,
            }
        }
    });
    write.await.expect("writes end");
    closed_by_daemon(stuck, "connection that does not read".into()).await;
    d.stop().await;
}

#[tokio::test]
async fn an_upgrade_flood_from_one_client_leaves_upgrades_for_the_others() {
    let f = fake().await;
    // 10/s per client under a daemon-wide 50/s, which 40 loops exceed on any machine: with one
    // shared bucket the flood alone would empty it.
    let per_client = 10;
    let d = Arc::new(
        daemon(&f, |c| {
            c.limits.upgrade_rate = 50;
            c.limits.upgrade_rate_per_client = per_client;
        })
        .await,
    );
    let h1 = d.handoff("u1", "p1").await;
    let h2 = d.handoff("u2", "p2").await;
    let running = Arc::new(AtomicBool::new(true));
    let flood_start = tokio::time::Instant::now();
    let refused = Arc::new(AtomicUsize::new(0));
    let accepted = Arc::new(AtomicUsize::new(0));
    let first_refusal = Arc::new(tokio::sync::Notify::new());
    let flood: Vec<_> = (0..40)
        .map(|_| {
            let (d, running) = (d.clone(), running.clone());
            let (refused, accepted) = (refused.clone(), accepted.clone());
            let first_refusal = first_refusal.clone();
            tokio::spawn(async move {
                while running.load(Ordering::Relaxed) {
                    match Page::open_from(&d, FLOODER, &[]).await {
                        Ok(page) => {
                            accepted.fetch_add(1, Ordering::Relaxed);
                            page.drop_connection().await;
                        }
                        Err(429) => {
                            refused.fetch_add(1, Ordering::Relaxed);
                            first_refusal.notify_one();
                        }
                        Err(other) => panic!("flood upgrade answered {other}"),
                    }
                }
            })
        })
        .collect();
    // The flood is on once the flooder is being refused.
    tokio::time::timeout(LIMIT, first_refusal.notified())
        .await
        .expect("the flooder is refused");
    // Real pages from another address, and pages with a cookie from the flooder's own address
    // (behind a proxy every page shares its address), all get through while the flood goes on.
    let mut pages = Vec::new();
    for _ in 0..10 {
        let mut p = Page::open_from(&d, NEIGHBOUR, &[])
            .await
            .expect("a page from another address is upgraded");
        p.login_plain("u1", &h1.token).await.expect("page login");
        pages.push(p);
    }
    let cookie = format!("boshmux_token={}", h2.token);
    for _ in 0..10 {
        let p = Page::open_from(&d, FLOODER, &[("origin", ORIGIN), ("cookie", &cookie)])
            .await
            .expect("a page with its user's cookie is upgraded");
        pages.push(p);
    }
    let refused_during = refused.load(Ordering::Relaxed);
    running.store(false, Ordering::Relaxed);
    for t in flood {
        t.await.unwrap();
    }
    let flood_secs = flood_start.elapsed().as_secs_f64();
    assert!(
        refused_during > 40,
        "the flood was refused {refused_during} times"
    );
    // The flooder got its own rate (a burst, then so many per second), not the daemon's.
    let got = accepted.load(Ordering::Relaxed);
    let most = f64::from(per_client) * (1.0 + flood_secs);
    assert!(
        (got as f64) <= most + 1.0,
        "the flooder got {got} upgrades in {flood_secs:.1} s"
    );
    drop(pages);
    Arc::into_inner(d).expect("flood tasks ended").stop().await;
}

#[tokio::test]
async fn api_bodies_over_the_limit_are_413_and_not_json_415() {
    let f = fake().await;
    let d = daemon(&f, |_| {}).await;
    let http = reqwest::Client::new();
    let post = |body: String, content_type: Option<&'static str>| {
        let mut req = http
            .post(d.url("/api/v1/sessions"))
            .bearer_auth(API_KEY)
            .body(body);
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        async move {
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            let bytes = resp.bytes().await.unwrap();
            let body: serde_json::Value =
                serde_json::from_slice(&bytes).expect("a JSON error body");
            (status, body)
        }
    };
    let big = serde_json::json!({"jid": "u0@example.test", "password": "x".repeat(200_000)});
    let (status, body) = post(big.to_string(), Some("application/json")).await;
    assert_eq!(status, 413, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("larger than"),
        "{body}"
    );
    let ok = serde_json::json!({"jid": "u0@example.test", "password": "p0"}).to_string();
    for ct in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        None,
    ] {
        let (status, body) = post(ok.clone(), ct).await;
        assert_eq!(status, 415, "{ct:?}: {body}");
        assert!(body["error"].as_str().unwrap().contains("JSON"), "{body}");
    }
    let (status, body) = post("{\"jid\": ".into(), Some("application/json")).await;
    assert_eq!(status, 400, "{body}");
    // None of it cost the right request anything.
    let (status, body) = post(ok, Some("application/json")).await;
    assert_eq!(status, 201, "{body}");
    d.stop().await;
}

#[tokio::test]
async fn the_status_page_is_never_cached_or_framed() {
    let f = fake().await;
    let d = daemon(&f, |_| {}).await;
    let http = reqwest::Client::new();
    let authorized = http
        .get(d.url("/status"))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap();
    let anonymous = http.get(d.url("/status")).send().await.unwrap();
    assert_eq!(authorized.status(), 200);
    assert_eq!(anonymous.status(), 401);
    for resp in [&authorized, &anonymous] {
        let h = resp.headers();
        assert_eq!(h["cache-control"], "no-store");
        assert_eq!(h["x-frame-options"], "DENY");
        let csp = h["content-security-policy"].to_str().unwrap();
        assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    }
    d.stop().await;
}

#[tokio::test]
async fn a_login_over_time_is_504() {
    // An upstream that accepts connections and never answers: the login runs into its limit
    // (`login_timeout`), and the API says so with 504 as soon as it does.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/http-bind", silent.local_addr().unwrap());
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = silent.accept().await {
            held.push(tcp);
        }
    });
    let d = Daemon::start(&url, "example.test", |c| {
        c.login_timeout = Duration::from_secs(1);
    })
    .await;
    let asked = tokio::time::Instant::now();
    let (status, body) = d
        .api(
            reqwest::Method::POST,
            "/api/v1/sessions",
            Some(serde_json::json!({"jid": "u0@example.test", "password": "p0"})),
        )
        .await;
    assert_eq!(status, 504, "{body}");
    assert_eq!(body["error"], "upstream login timed out");
    // The login's own limit answered, not the API's wait for it (login_timeout + 5 s).
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "{:?}",
        asked.elapsed()
    );
    d.stop().await;
    holder.abort();
}

#[tokio::test]
async fn a_login_the_connection_manager_refuses_is_502_and_a_wrong_password_422() {
    // A connection manager answering 403 to the session creation: a refusal, not a timeout.
    let refusing = axum::Router::new().route(
        "/http-bind",
        axum::routing::post(|| async { axum::http::StatusCode::FORBIDDEN }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/http-bind", listener.local_addr().unwrap());
    let server = tokio::spawn(async move { axum::serve(listener, refusing).await.unwrap() });
    let d = Daemon::start(&url, "example.test", |_| {}).await;
    let (status, body) = d
        .api(
            reqwest::Method::POST,
            "/api/v1/sessions",
            Some(serde_json::json!({"jid": "u0@example.test", "password": "p0"})),
        )
        .await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(
        body["error"],
        "upstream failure: connection manager answered HTTP 403"
    );
    d.stop().await;
    server.abort();

    let f = fake().await;
    let d = daemon(&f, |_| {}).await;
    let (status, body) = d
        .api(
            reqwest::Method::POST,
            "/api/v1/sessions",
            Some(serde_json::json!({"jid": "u0@example.test", "password": "wrong"})),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(
        body["error"],
        "login refused: authentication failed: not-authorized"
    );
    d.stop().await;
}

#[tokio::test]
async fn silent_connections_cannot_use_up_the_file_descriptors_of_the_daemon() {
    // The daemon as its own process with 128 descriptors, and 300 silent connections from one
    // address: without the per-address cap it could accept nothing more.
    let f = fake().await;
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut child = tokio::process::Command::new("bash")
        .arg("-c")
        .arg("ulimit -n 128 && exec \"$0\" serve")
        .arg(env!("CARGO_BIN_EXE_boshmux"))
        .env("BOSHMUX_LISTEN", addr.to_string())
        .env("BOSHMUX_BOSH_URL", f.url())
        .env("BOSHMUX_XMPP_DOMAIN", "example.test")
        .env("BOSHMUX_API_KEY", API_KEY)
        .env("BOSHMUX_LIMITS_CONNECTIONS_PER_ADDRESS", "32")
        .env("BOSHMUX_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // The daemon logs to stderr.
    let stderr = child.stderr.take().unwrap();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stderr));
    tokio::time::timeout(LIMIT, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("serving") {
                return;
            }
        }
        panic!("the daemon exited before serving");
    })
    .await
    .expect("the daemon serves");
    // Keep reading its log so it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    // A daemon that cannot accept leaves connections in the kernel's backlog until it is full;
    // those beyond it never complete, which is no concern of this test.
    let silent = futures_util::future::join_all(
        (0..300).map(|_| tokio::time::timeout(Duration::from_secs(3), tcp_from(FLOODER, addr))),
    )
    .await;
    assert!(silent.iter().filter(|c| c.is_ok()).count() >= 128);
    let http = http_from(NEIGHBOUR);
    let health = tokio::time::timeout(LIMIT, http.get(format!("http://{addr}/healthz")).send())
        .await
        .expect("/healthz answers")
        .unwrap();
    assert_eq!(health.status(), 200);
    let handoff = tokio::time::timeout(
        LIMIT,
        http.post(format!("http://{addr}/api/v1/sessions"))
            .bearer_auth(API_KEY)
            .header("content-type", "application/json")
            .body(serde_json::json!({"jid": "u0@example.test", "password": "p0"}).to_string())
            .send(),
    )
    .await
    .expect("the API answers")
    .unwrap();
    assert_eq!(handoff.status(), 201);
    drop(silent);
    child.kill().await.unwrap();
}
