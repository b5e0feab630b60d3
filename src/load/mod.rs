//! `boshmux load` (SPEC §10): U users handed off through the API, P pages each doing the full
//! RFC 7395 handshake (PLAIN + token), messages between users at a set rate for a set time; join
//! and send→receive latencies, deliveries, errors and the upstream requests it cost. `--direct`
//! is the status quo for comparison: every page its own BOSH session straight to the server.
//!
//! Runs in its own process (the open-file limit is per process) and only against addresses it is
//! given. Every page of the recipient must receive every message: deliveries are counted per
//! page, latencies measured from the sender's clock (one process, one monotonic clock).

pub mod failover;
mod page;
mod report;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Semaphore;
use tokio::time::Instant;

pub use report::Report;

/// Command-line options of `boshmux load`. `Debug` hides the api key.
#[derive(Clone, clap::Args)]
pub struct LoadArgs {
    /// The daemon's base URL (handoff API and /ws).
    #[arg(long, default_value = "http://127.0.0.1:5380")]
    pub url: String,
    /// The daemon's api key.
    #[arg(
        long,
        env = "BOSHMUX_API_KEY",
        hide_env_values = true,
        default_value = ""
    )]
    pub api_key: String,
    /// The XMPP domain of the accounts.
    #[arg(long)]
    pub domain: String,
    /// Users (accounts PREFIX1 … PREFIXU).
    #[arg(long, default_value_t = 10)]
    pub users: usize,
    /// Pages per user.
    #[arg(long, default_value_t = 2)]
    pub pages: usize,
    /// Account names: PREFIX followed by 1..=users.
    #[arg(long, default_value = "user")]
    pub user_prefix: String,
    /// Passwords: PREFIX followed by the account name.
    #[arg(long, default_value = "pw-")]
    pub password_prefix: String,
    /// Messages per second, all users together (0: hold pages idle).
    #[arg(long, default_value_t = 10.0)]
    pub rate: f64,
    /// How long to send messages (or to hold idle pages).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Pages opening at once.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// How pages reach the daemon: `websocket` (RFC 7395 at /ws) or `bosh` (a virtual BOSH
    /// session of its own at /http-bind, SPEC §4b; PLAIN with the token).
    #[arg(long, value_enum, default_value = "websocket")]
    pub page_transport: PageTransport,
    /// Baseline: each page opens its own BOSH session at this URL instead of using the daemon.
    #[arg(long, value_name = "BOSH_URL")]
    pub direct: Option<String>,
    /// Also report CPU seconds and resident memory of this process (e.g. the XMPP server, the
    /// daemon); repeatable.
    #[arg(long = "watch-pid", value_name = "PID")]
    pub watch_pids: Vec<u32>,
    /// Write the report as JSON here. (With `--page-transport bosh`, `upstream_requests` still
    /// counts the daemon's requests upstream; the pages' own requests into the daemon are logged.)
    #[arg(long, value_name = "FILE")]
    pub json: Option<std::path::PathBuf>,
    /// No progress lines.
    #[arg(long)]
    pub quiet: bool,
    /// Failover mode (SPEC §12): kill -9 a node this many times instead of the load above; `--url`
    /// is then HAProxy in front of the `--failover-node`s, which this process starts itself.
    #[arg(long, default_value_t = 0)]
    pub failover_kills: usize,
    /// A node of the cluster as ID=HOST:PORT (its `BOSHMUX_NODE_ID` and listen address);
    /// repeatable. HAProxy's backend `boshmux` must name its servers by these ids.
    #[arg(long = "failover-node", value_name = "ID=HOST:PORT")]
    pub failover_nodes: Vec<String>,
    /// The command that runs one node (split on spaces), e.g. `taskset -c 0 boshmux serve`; the
    /// node's listen address, id and advertised URL are set in its environment, the rest of the
    /// configuration comes from this process's `BOSHMUX_*` variables.
    #[arg(long, default_value = "")]
    pub failover_serve: String,
    /// HAProxy's admin socket (`show stat`: a restarted node is back in rotation).
    #[arg(long, value_name = "PATH")]
    pub failover_haproxy_socket: Option<std::path::PathBuf>,
    /// The XMPP server's BOSH URL, for the contact that sends the probes from outside the cluster
    /// (account PREFIX{users+1}).
    #[arg(long, value_name = "BOSH_URL")]
    pub failover_contact_bosh: Option<String>,
    /// The interval between two probes to every user.
    #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration)]
    pub failover_probe: Duration,
    /// How long after a kill a page may take before it counts as never back.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub failover_limit: Duration,
    /// The pause after a restarted node is back in HAProxy, before the next kill.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub failover_settle: Duration,
}

impl std::fmt::Debug for LoadArgs {
    // Every field named, so that a new one is a compile error here rather than a leak.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let LoadArgs {
            url,
            api_key: _,
            domain,
            users,
            pages,
            user_prefix,
            password_prefix: _,
            rate,
            duration,
            concurrency,
            direct,
            watch_pids,
            json,
            quiet,
            page_transport,
            failover_kills,
            failover_nodes,
            failover_serve,
            failover_haproxy_socket,
            failover_contact_bosh,
            failover_probe,
            failover_limit,
            failover_settle,
        } = self;
        f.debug_struct("LoadArgs")
            .field("url", url)
            .field("api_key", &"<hidden>")
            .field("domain", domain)
            .field("users", users)
            .field("pages", pages)
            .field("user_prefix", user_prefix)
            .field("password_prefix", &"<hidden>")
            .field("rate", rate)
            .field("duration", duration)
            .field("concurrency", concurrency)
            .field("direct", direct)
            .field("watch_pids", watch_pids)
            .field("json", json)
            .field("quiet", quiet)
            .field("page_transport", page_transport)
            .field("failover_kills", failover_kills)
            .field("failover_nodes", failover_nodes)
            .field("failover_serve", failover_serve)
            .field("failover_haproxy_socket", failover_haproxy_socket)
            .field("failover_contact_bosh", failover_contact_bosh)
            .field("failover_probe", failover_probe)
            .field("failover_limit", failover_limit)
            .field("failover_settle", failover_settle)
            .finish()
    }
}

/// What went wrong, counted by kind.
#[derive(Default)]
pub(crate) struct Errors(Mutex<BTreeMap<String, u64>>);

impl Errors {
    pub(crate) fn add(&self, kind: impl Into<String>) {
        *self.0.lock().entry(kind.into()).or_default() += 1;
    }
}

/// Shared counters of a run.
pub(crate) struct Shared {
    pub(crate) start: Instant,
    pub(crate) joined: AtomicU64,
    pub(crate) sent: AtomicU64,
    pub(crate) delivered: AtomicU64,
    pub(crate) errors: Errors,
    pub(crate) join_us: Mutex<Vec<u64>>,
    pub(crate) latency_us: Mutex<Vec<u64>>,
}

impl Shared {
    /// Microseconds since the run started: what a message carries as its send time.
    pub(crate) fn now_us(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_micros()).unwrap_or(u64::MAX)
    }
}

/// How simulated pages speak to the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PageTransport {
    /// RFC 7395 over `GET /ws`.
    Websocket,
    /// XEP-0124 + XEP-0206 over `POST /http-bind`, one virtual BOSH session per page.
    Bosh,
}

/// Why a run could not start.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// More sockets than this process may open.
    #[error(
        "{needed} sockets needed but this process may open {limit}: lower --users/--pages or raise `ulimit -n`"
    )]
    TooManyFiles {
        /// Sockets needed.
        needed: u64,
        /// The open-file limit.
        limit: u64,
    },
    /// The setup failed before any page opened.
    #[error("{0}")]
    Setup(String),
}

/// Runs the load and returns its report.
pub async fn run(args: LoadArgs) -> Result<Report, LoadError> {
    crate::bosh::transport::install_crypto_provider();
    // boshmux: one WebSocket per page. Direct: a BOSH session holds up to two HTTP connections.
    let bosh_pages = args.direct.is_some() || args.page_transport == PageTransport::Bosh;
    let per_page = if bosh_pages { 2 } else { 1 };
    let needed = (args.users * args.pages * per_page + 64) as u64;
    if let Some(limit) = open_file_limit()
        && needed > limit
    {
        return Err(LoadError::TooManyFiles { needed, limit });
    }
    let shared = Arc::new(Shared {
        start: Instant::now(),
        joined: AtomicU64::new(0),
        sent: AtomicU64::new(0),
        delivered: AtomicU64::new(0),
        errors: Errors::default(),
        join_us: Mutex::new(Vec::new()),
        latency_us: Mutex::new(Vec::new()),
    });
    let watched_before: Vec<_> = args.watch_pids.iter().map(|p| report::sample(*p)).collect();
    let upstream_before = page::upstream_requests(&args).await;

    // Hand users off (or log pages in directly), then open every page.
    let users: Vec<page::User> = (1..=args.users)
        .map(|n| {
            let name = format!("{}{n}", args.user_prefix);
            page::User {
                password: format!("{}{name}", args.password_prefix),
                bare: format!("{name}@{}", args.domain),
                name,
            }
        })
        .collect();
    let gate = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let mut opening = Vec::new();
    for (u, user) in users.iter().enumerate() {
        let token = match &args.direct {
            Some(_) => None,
            None => match page::handoff(&args, user).await {
                Ok(t) => Some(t),
                Err(e) => {
                    shared.errors.add(format!("handoff: {e}"));
                    continue;
                }
            },
        };
        for p in 0..args.pages {
            let (args, user, token, shared, gate) = (
                args.clone(),
                user.clone(),
                token.clone(),
                shared.clone(),
                gate.clone(),
            );
            opening.push(tokio::spawn(async move {
                let _permit = gate.acquire_owned().await.ok()?;
                page::open(&args, &user, token.as_deref(), &shared)
                    .await
                    .map(|page| (u, p, page))
            }));
        }
    }
    let progress = (!args.quiet)
        .then(|| tokio::spawn(report::progress(shared.clone(), args.users * args.pages)));
    let mut pages: Vec<Vec<page::Page>> = (0..args.users).map(|_| Vec::new()).collect();
    for task in opening {
        if let Ok(Some((u, _, page))) = task.await {
            pages[u].push(page);
        }
    }

    // Send: user i's first page writes to user i+1, at the given rate; every page of the
    // recipient should receive each message.
    let mut expected = 0u64;
    if args.rate > 0.0 && args.users > 1 {
        let interval = Duration::from_secs_f64(1.0 / args.rate);
        let mut tick = tokio::time::interval(interval);
        let end = Instant::now() + args.duration;
        let mut seq = 0u64;
        while Instant::now() < end {
            tick.tick().await;
            let from = (seq as usize) % args.users;
            let to = (from + 1) % args.users;
            seq += 1;
            let receivers = pages[to].len() as u64;
            let Some(sender) = pages[from].first() else {
                continue;
            };
            if receivers == 0 {
                continue;
            }
            if sender
                .send_message(&users[to].bare, seq, shared.now_us())
                .await
            {
                shared.sent.fetch_add(1, Ordering::Relaxed);
                expected += receivers;
            } else {
                shared.errors.add("send failed");
            }
        }
        // Let the last messages arrive (bounded).
        let drain = Instant::now() + Duration::from_secs(5);
        while shared.delivered.load(Ordering::Relaxed) < expected && Instant::now() < drain {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    } else {
        tokio::time::sleep(args.duration).await;
    }

    let upstream_after = page::upstream_requests(&args).await;
    let direct_requests = page::direct_requests(&pages).await;
    if args.direct.is_none()
        && args.page_transport == PageTransport::Bosh
        && let Some(n) = direct_requests
    {
        eprintln!(
            "page requests into the daemon: {n} ({:.0}/s)",
            n as f64 / shared.start.elapsed().as_secs_f64().max(0.001)
        );
    }
    let watched: Vec<_> = args
        .watch_pids
        .iter()
        .zip(watched_before)
        .map(|(pid, before)| report::watched(*pid, before))
        .collect();
    if let Some(p) = progress {
        p.abort();
    }
    for user_pages in pages {
        for page in user_pages {
            page.close().await;
        }
    }
    let upstream_requests = match (&args.direct, upstream_before, upstream_after) {
        (Some(_), _, _) => direct_requests,
        (None, Some(b), Some(a)) => Some(a.saturating_sub(b)),
        _ => None,
    };
    let report = Report::build(&args, &shared, expected, upstream_requests, watched);
    write_json(args.json.as_deref(), &report)?;
    Ok(report)
}

/// Writes `report` as pretty JSON to `path` (`--json`), if one was given.
fn write_json(
    path: Option<&std::path::Path>,
    report: &impl serde::Serialize,
) -> Result<(), LoadError> {
    let Some(path) = path else { return Ok(()) };
    let json = serde_json::to_string_pretty(report).map_err(|e| LoadError::Setup(e.to_string()))?;
    std::fs::write(path, json).map_err(|e| LoadError::Setup(format!("{}: {e}", path.display())))
}

/// The soft open-file limit of this process.
fn open_file_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}
