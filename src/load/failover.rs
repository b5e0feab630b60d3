//! `boshmux load --failover-kills N` (SPEC §12): the failover time of a cluster, measured from
//! the outside. This process starts the nodes itself (so that it can `kill -9` and restart
//! them), with HAProxy already running in front of them; U users × P pages connect through
//! HAProxy and a contact outside the cluster (its own BOSH session straight to the XMPP server)
//! sends each user a numbered message every `--failover-probe`. Each round kills the node that
//! owns the most sessions (`GET /api/v1/sessions/{jid}` → `"node"`) and times, for every page,
//! the interval from the kill to the first message sent after the kill that the page receives —
//! reconnecting through HAProxy with client-js's backoff when its connection is cut. Then the
//! node is restarted, HAProxy is waited for, and the next round begins.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt as _;
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use super::page::{self, User};
use super::{LoadArgs, LoadError};
use crate::bosh::{BoshEvent, BoshHandle};
use crate::xmpp::{self, Element, Limits, ns};

/// Close codes after which client-js does not reconnect (client-js/boshmux.js `FINAL_CODES`).
const FINAL_CODES: [u16; 5] = [1000, 1008, 4001, 4003, 4004];

/// One node of the cluster, as this process runs it.
struct Node {
    id: String,
    addr: String,
    child: Option<std::process::Child>,
    log: PathBuf,
}

impl Node {
    /// Starts `cmd` (program and arguments, e.g. `taskset -c 0 boshmux serve`) as this node:
    /// `BOSHMUX_LISTEN`, `BOSHMUX_NODE_ID` and `BOSHMUX_ADVERTISE_URL` set, the rest of the
    /// environment inherited; its log appended to `self.log`.
    fn start(&mut self, cmd: &[String]) -> Result<(), LoadError> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| LoadError::Setup(format!("{}: {e}", self.log.display())))?;
        let child = std::process::Command::new(&cmd[0])
            .args(&cmd[1..])
            .env("BOSHMUX_LISTEN", &self.addr)
            .env("BOSHMUX_NODE_ID", &self.id)
            .env("BOSHMUX_ADVERTISE_URL", format!("http://{}", self.addr))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| LoadError::Setup(format!("start {}: {e}", self.id)))?;
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILL (`Child::kill`), then reaps the process.
    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM (a graceful stop), then reaps the process.
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = std::process::Command::new("kill")
                .arg(child.id().to_string())
                .status();
            let _ = child.wait();
        }
    }
}

/// What one logical page (one tab, across its reconnects) has seen.
#[derive(Default)]
struct PageState {
    /// Bound to a node right now.
    connected: bool,
    /// Probe numbers received, for duplicates.
    seen: HashSet<u64>,
    /// Probes received twice or more.
    duplicates: u64,
    /// Successful binds (the first included).
    binds: u64,
    /// Set when the page's connection ended during the current round.
    cut_this_round: bool,
    /// When the first probe numbered above the round's kill arrived.
    recovered_at: Option<Instant>,
    /// Gave up after a close code client-js does not retry.
    gave_up: Option<u16>,
}

/// State shared by the pages, the contact and the rounds.
struct Shared {
    /// The last probe number allocated.
    seq: AtomicU64,
    /// Probes numbered above this were sent after the current round's kill.
    kill_seq: AtomicU64,
    stop: AtomicBool,
    close_codes: Mutex<BTreeMap<String, u64>>,
}

/// One kill.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Round {
    /// The node killed.
    pub victim: String,
    /// Sessions it owned when killed.
    pub sessions_owned: usize,
    /// Pages whose session it owned.
    pub pages_of_its_sessions: usize,
    /// Pages whose connection was cut during the round (they were on it, or were closed to
    /// reconnect).
    pub pages_cut: usize,
    /// From the kill until every page received a probe sent after the kill (ms); `None` when
    /// some page never did within the limit.
    pub all_working_ms: Option<f64>,
    /// Pages that did not receive a probe sent after the kill within the limit.
    pub never_back: usize,
}

/// What `--failover-kills` prints and writes as JSON.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FailoverReport {
    /// Users and pages per user.
    pub users: usize,
    /// Pages per user.
    pub pages: usize,
    /// Kills done.
    pub kills: usize,
    /// The interval between two probes to every user (ms): the resolution of a page that was
    /// not affected.
    pub probe_ms: f64,
    /// Per kill, from the kill until every page works again (ms): p50, p99, max over the kills
    /// in which every page came back.
    pub all_working_ms: Percentiles,
    /// Per affected page (its session's owner killed, or its connection cut), from the kill
    /// until it received a probe sent after the kill (ms).
    pub affected_page_ms: Percentiles,
    /// Per unaffected page, the same (ms): the probe interval and the delivery latency.
    pub unaffected_page_ms: Percentiles,
    /// Page-rounds in which a page never received a probe sent after the kill.
    pub never_back: usize,
    /// Probes a page received twice (over the whole run, across its reconnects).
    pub duplicates: u64,
    /// Probes missed by pages whose connection was never cut (between their first and last).
    pub missed_by_uncut_pages: u64,
    /// Pages that gave up on a final close code, by code.
    pub gave_up: BTreeMap<String, u64>,
    /// Close codes (or connection ends) the pages saw, by kind.
    pub close_codes: BTreeMap<String, u64>,
    /// Each kill.
    pub rounds: Vec<Round>,
}

/// p50, p99 and max of a sample (ms), and its size.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Percentiles {
    /// Sample size.
    pub n: usize,
    /// Median (nearest rank).
    pub p50: f64,
    /// 99th percentile (nearest rank: with fewer than 100 values, close to the max).
    pub p99: f64,
    /// Maximum.
    pub max: f64,
}

impl Percentiles {
    fn of(mut v: Vec<f64>) -> Self {
        if v.is_empty() {
            return Self::default();
        }
        v.sort_by(f64::total_cmp);
        let rank = |p: f64| v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
        Self {
            n: v.len(),
            p50: rank(0.5),
            p99: rank(0.99),
            max: v[v.len() - 1],
        }
    }
}

impl fmt::Display for Percentiles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms (n = {})",
            self.p50, self.p99, self.max, self.n
        )
    }
}

impl fmt::Display for FailoverReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "failover: {} kills, {} users x {} pages, a probe to every user every {:.0} ms",
            self.kills, self.users, self.pages, self.probe_ms
        )?;
        for (i, r) in self.rounds.iter().enumerate() {
            writeln!(
                f,
                "  kill {:2}: {} (owned {} sessions, {} pages), {} pages cut, every page working after {}{}",
                i + 1,
                r.victim,
                r.sessions_owned,
                r.pages_of_its_sessions,
                r.pages_cut,
                r.all_working_ms
                    .map_or("never".to_owned(), |ms| format!("{ms:.0} ms")),
                if r.never_back > 0 {
                    format!(", {} pages never back", r.never_back)
                } else {
                    String::new()
                }
            )?;
        }
        writeln!(f, "kill -> every page working: {}", self.all_working_ms)?;
        writeln!(
            f,
            "kill -> affected page working: {}",
            self.affected_page_ms
        )?;
        writeln!(
            f,
            "kill -> unaffected page's next probe: {}",
            self.unaffected_page_ms
        )?;
        writeln!(
            f,
            "pages never back: {}; probes received twice: {}; probes missed by uncut pages: {}",
            self.never_back, self.duplicates, self.missed_by_uncut_pages
        )?;
        writeln!(
            f,
            "gave up: {:?}; closes seen: {:?}",
            self.gave_up, self.close_codes
        )
    }
}

/// Runs the failover measurement (the nodes from `--failover-node`, HAProxy at `--url`).
pub async fn run(args: LoadArgs) -> Result<FailoverReport, LoadError> {
    crate::bosh::transport::install_crypto_provider();
    let setup = |m: String| LoadError::Setup(m);
    let cmd: Vec<String> = args
        .failover_serve
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    if cmd.is_empty() || args.failover_nodes.len() < 2 {
        return Err(setup(
            "--failover-kills needs --failover-serve and two --failover-node or more".into(),
        ));
    }
    let socket = args
        .failover_haproxy_socket
        .clone()
        .ok_or_else(|| setup("--failover-kills needs --failover-haproxy-socket".into()))?;
    let bosh = args
        .failover_contact_bosh
        .clone()
        .ok_or_else(|| setup("--failover-kills needs --failover-contact-bosh".into()))?;
    let log_dir = args
        .json
        .as_ref()
        .and_then(|p| p.parent().map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("."));
    let mut nodes: Vec<Node> = Vec::new();
    for spec in &args.failover_nodes {
        let (id, addr) = spec
            .split_once('=')
            .ok_or_else(|| setup(format!("--failover-node {spec}: expected ID=HOST:PORT")))?;
        nodes.push(Node {
            id: id.to_owned(),
            addr: addr.to_owned(),
            child: None,
            log: log_dir.join(format!("failover-{id}.log")),
        });
    }
    for n in &mut nodes {
        n.start(&cmd)?;
    }
    let result = measure(&args, &mut nodes, &cmd, &socket, &bosh).await;
    for n in &mut nodes {
        n.stop();
    }
    let report = result?;
    super::write_json(args.json.as_deref(), &report)?;
    Ok(report)
}

async fn measure(
    args: &LoadArgs,
    nodes: &mut [Node],
    cmd: &[String],
    socket: &std::path::Path,
    bosh: &str,
) -> Result<FailoverReport, LoadError> {
    let say = |m: String| {
        if !args.quiet {
            eprintln!("{m}");
        }
    };
    for n in nodes.iter() {
        wait_up(socket, &n.id).await?;
    }
    say("every node up in HAProxy".into());
    let users: Vec<User> = (1..=args.users + 1)
        .map(|n| {
            let name = format!("{}{n}", args.user_prefix);
            User {
                password: format!("{}{name}", args.password_prefix),
                bare: format!("{name}@{}", args.domain),
                name,
            }
        })
        .collect();
    let (contact, users) = users.split_last().expect("at least one account");
    let shared = Arc::new(Shared {
        seq: AtomicU64::new(0),
        kill_seq: AtomicU64::new(u64::MAX),
        stop: AtomicBool::new(false),
        close_codes: Mutex::default(),
    });

    // The contact: outside the cluster, so that no kill touches it.
    let contact = contact_login(bosh, contact)
        .await
        .map_err(LoadError::Setup)?;
    let mut tokens = Vec::new();
    for u in users {
        tokens.push(
            page::handoff(args, u)
                .await
                .map_err(|e| LoadError::Setup(format!("handoff {}: {e}", u.bare)))?,
        );
    }
    let mut pages: Vec<(usize, Arc<Mutex<PageState>>)> = Vec::new();
    let mut tasks = Vec::new();
    for (u, user) in users.iter().enumerate() {
        for _ in 0..args.pages {
            let state = Arc::new(Mutex::new(PageState::default()));
            pages.push((u, state.clone()));
            tasks.push(tokio::spawn(page_loop(
                args.clone(),
                user.clone(),
                tokens[u].clone(),
                state,
                shared.clone(),
            )));
        }
    }
    let probe = args.failover_probe;
    let sender = {
        let (shared, bares) = (
            shared.clone(),
            users.iter().map(|u| u.bare.clone()).collect::<Vec<_>>(),
        );
        let handle = contact.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(probe);
            while !shared.stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let seq = shared.seq.fetch_add(1, Ordering::SeqCst) + 1;
                for to in &bares {
                    let msg = Element::new("message", ns::CLIENT)
                        .with_attr("to", to.as_str())
                        .with_attr("type", "chat")
                        .with_attr("id", format!("fo{seq}"))
                        .with_child(
                            Element::new("body", ns::CLIENT).with_text(format!("fo {seq}")),
                        );
                    if handle.send(msg).await.is_err() {
                        eprintln!("the contact's session ended: probes stop");
                        return;
                    }
                }
            }
        })
    };

    let limit = args.failover_limit;
    let mut rounds = Vec::new();
    let (mut all_ms, mut affected_ms, mut unaffected_ms) = (Vec::new(), Vec::new(), Vec::new());
    let client = reqwest::Client::new();
    for k in 0..args.failover_kills {
        // Steady state first: every page bound and receiving.
        let mark = shared.seq.load(Ordering::SeqCst);
        let steady_by = Instant::now() + limit;
        loop {
            let steady = pages.iter().all(|(_, p)| {
                let p = p.lock();
                p.connected && p.seen.iter().any(|&s| s > mark)
            });
            if steady {
                break;
            }
            if Instant::now() > steady_by {
                say(format!(
                    "round {}: not every page steady before the kill",
                    k + 1
                ));
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Owners, as the API says.
        let mut owner = Vec::new();
        for u in users {
            owner.push(owner_of(&client, args, &u.bare).await);
        }
        let running: Vec<usize> = (0..nodes.len()).collect();
        let victim = *running
            .iter()
            .max_by_key(|&&i| {
                let owned = owner
                    .iter()
                    .filter(|o| o.as_deref() == Some(&nodes[i].id))
                    .count();
                // Ties: rotate over the nodes from round to round.
                (owned, i == k % nodes.len())
            })
            .expect("nodes");
        let victim_id = nodes[victim].id.clone();
        let owned: Vec<bool> = owner
            .iter()
            .map(|o| o.as_deref() == Some(victim_id.as_str()))
            .collect();
        for (_, p) in &pages {
            let mut p = p.lock();
            p.recovered_at = None;
            p.cut_this_round = false;
        }
        shared
            .kill_seq
            .store(shared.seq.load(Ordering::SeqCst), Ordering::SeqCst);
        let killed_at = Instant::now();
        nodes[victim].kill9();

        let deadline = killed_at + limit;
        while Instant::now() < deadline
            && !pages.iter().all(|(_, p)| p.lock().recovered_at.is_some())
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut round = Round {
            victim: victim_id.clone(),
            sessions_owned: owned.iter().filter(|&&o| o).count(),
            pages_of_its_sessions: 0,
            pages_cut: 0,
            all_working_ms: None,
            never_back: 0,
        };
        let mut worst = 0.0f64;
        for (u, p) in &pages {
            let p = p.lock();
            let affected = owned[*u] || p.cut_this_round;
            round.pages_of_its_sessions += usize::from(owned[*u]);
            round.pages_cut += usize::from(p.cut_this_round);
            match p.recovered_at {
                Some(at) => {
                    let ms = (at - killed_at).as_secs_f64() * 1000.0;
                    worst = worst.max(ms);
                    if affected {
                        affected_ms.push(ms);
                    } else {
                        unaffected_ms.push(ms);
                    }
                }
                None => round.never_back += 1,
            }
        }
        if round.never_back == 0 {
            round.all_working_ms = Some(worst);
            all_ms.push(worst);
        }
        say(format!(
            "kill {}: {victim_id} ({} sessions), {} pages cut, every page working after {}",
            k + 1,
            round.sessions_owned,
            round.pages_cut,
            round
                .all_working_ms
                .map_or("never".to_owned(), |ms| format!("{ms:.0} ms"))
        ));
        rounds.push(round);

        nodes[victim].start(cmd)?;
        wait_up(socket, &victim_id).await?;
        // Let the restarted node's membership settle before the next kill.
        tokio::time::sleep(args.failover_settle).await;
    }

    shared.stop.store(true, Ordering::Relaxed);
    sender.abort();
    for t in &tasks {
        t.abort();
    }
    let _ = contact.terminate(vec![]).await;
    let mut gave_up = BTreeMap::new();
    let (mut duplicates, mut missed) = (0, 0);
    for (_, p) in &pages {
        let p = p.lock();
        duplicates += p.duplicates;
        if let Some(code) = p.gave_up {
            *gave_up.entry(code.to_string()).or_default() += 1;
        }
        if p.binds == 1
            && let (Some(lo), Some(hi)) = (p.seen.iter().min(), p.seen.iter().max())
        {
            missed += (hi - lo + 1) - p.seen.len() as u64;
        }
    }
    Ok(FailoverReport {
        users: args.users,
        pages: args.pages,
        kills: rounds.len(),
        probe_ms: probe.as_secs_f64() * 1000.0,
        all_working_ms: Percentiles::of(all_ms),
        affected_page_ms: Percentiles::of(affected_ms),
        unaffected_page_ms: Percentiles::of(unaffected_ms),
        never_back: rounds.iter().map(|r| r.never_back).sum(),
        duplicates,
        missed_by_uncut_pages: missed,
        gave_up,
        close_codes: shared.close_codes.lock().clone(),
        rounds,
    })
}

/// One tab: binds through HAProxy, reads probes, and when its connection ends reconnects with
/// client-js's backoff (500 ms doubling up to 30 s, the delay drawn in [base/2, base], the
/// attempt count reset by a successful bind); stops on a final close code, as client-js does.
async fn page_loop(
    args: LoadArgs,
    user: User,
    token: String,
    state: Arc<Mutex<PageState>>,
    shared: Arc<Shared>,
) {
    let mut attempt = 0u32;
    loop {
        let end = match page::handshake(&args, &user, &token).await {
            Ok(ws) => {
                attempt = 0;
                {
                    let mut s = state.lock();
                    s.connected = true;
                    s.binds += 1;
                }
                let (_sink, mut stream) = ws.split();
                let mut end = "ended".to_owned();
                while let Some(msg) = stream.next().await {
                    match msg {
                        Ok(Message::Text(t)) => {
                            if let Some(seq) = probe_number(t.as_str()) {
                                let mut s = state.lock();
                                if !s.seen.insert(seq) {
                                    s.duplicates += 1;
                                }
                                if seq > shared.kill_seq.load(Ordering::SeqCst)
                                    && s.recovered_at.is_none()
                                {
                                    s.recovered_at = Some(Instant::now());
                                }
                            }
                        }
                        Ok(Message::Close(frame)) => {
                            end = frame.map_or(1005, |f| u16::from(f.code)).to_string();
                            break;
                        }
                        Ok(_) => {}
                        Err(e) => {
                            end = format!("error: {e}");
                            break;
                        }
                    }
                }
                let mut s = state.lock();
                s.connected = false;
                s.cut_this_round = true;
                end
            }
            Err(e) => {
                state.lock().cut_this_round = true;
                format!("bind failed: {e}")
            }
        };
        let code = end.parse::<u16>().ok();
        *shared.close_codes.lock().entry(end).or_default() += 1;
        if let Some(code) = code
            && FINAL_CODES.contains(&code)
        {
            state.lock().gave_up = Some(code);
            return;
        }
        let base = Duration::from_millis(500)
            .saturating_mul(1 << attempt.min(6))
            .min(Duration::from_secs(30));
        attempt += 1;
        let delay = base / 2 + base.mul_f64(rand::random::<f64>() / 2.0);
        tokio::time::sleep(delay).await;
    }
}

/// The probe number of a `fo N` message (not a carbon: those have no top-level body).
fn probe_number(frame: &str) -> Option<u64> {
    if !frame.contains(">fo ") {
        return None;
    }
    let el = xmpp::parse(frame.as_bytes(), &Limits::PAGE).ok()?;
    if !el.is("message", ns::CLIENT) {
        return None;
    }
    el.child("body", ns::CLIENT)?
        .text()
        .strip_prefix("fo ")?
        .parse()
        .ok()
}

/// The contact's BOSH session straight to the XMPP server; what it receives is discarded.
async fn contact_login(url: &str, user: &User) -> Result<BoshHandle, String> {
    let mut session = super::page::direct_online(url, user)
        .await
        .map_err(|e| format!("contact {}: {e}", user.bare))?;
    tokio::spawn(async move {
        while let Some(event) = session.events.recv().await {
            if let BoshEvent::Ended(r) = event {
                eprintln!("the contact's session ended: {r:?}");
                break;
            }
        }
    });
    Ok(session.handle)
}

/// The owner node of `bare`'s session (`GET /api/v1/sessions/{bare}` → `"node"`), through
/// HAProxy.
async fn owner_of(client: &reqwest::Client, args: &LoadArgs, bare: &str) -> Option<String> {
    let resp = client
        .get(format!(
            "{}/api/v1/sessions/{bare}",
            args.url.trim_end_matches('/')
        ))
        .bearer_auth(&args.api_key)
        .send()
        .await
        .ok()?;
    let json: serde_json::Value = serde_json::from_slice(&resp.bytes().await.ok()?).ok()?;
    json["node"].as_str().map(str::to_owned)
}

/// Waits (≤ 30 s) until HAProxy's `show stat` says server `id` of backend `boshmux` is `UP`
/// with a passed check.
async fn wait_up(socket: &std::path::Path, id: &str) -> Result<(), LoadError> {
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(csv) = show_stat(socket).await
            && csv.lines().any(|l| {
                let f: Vec<&str> = l.split(',').collect();
                f.len() > 40 && f[0] == "boshmux" && f[1] == id && f[17] == "UP"
            })
        {
            return Ok(());
        }
        if Instant::now() > until {
            return Err(LoadError::Setup(format!("HAProxy does not see {id} up")));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn show_stat(socket: &std::path::Path) -> std::io::Result<String> {
    let mut s = tokio::net::UnixStream::connect(socket).await?;
    s.write_all(b"show stat\n").await?;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
        .await
        .map_err(|_| std::io::Error::other("show stat timed out"))??;
    Ok(out)
}
