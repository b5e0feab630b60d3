//! A cluster for the tests of SPEC §12: N `boshmux serve` processes sharing one Redis database,
//! behind a private HAProxy run with the settings of `contrib/haproxy.cfg` (the operator's file,
//! with the nodes as servers and a loopback frontend put in).
//!
//! Needs `BOSHMUX_TEST_REDIS_URL` (scripts/redis.sh) and `BOSHMUX_TEST_HAPROXY`
//! (scripts/haproxy.sh); without them a cluster test fails, it never skips.
//!
//! Redis databases of the test Redis: 0 is the store's unit tests', 2 `store_redis.rs`', 3 the
//! store bench's; each cluster test names its own among 4..=15 and [`Cluster::start`] empties it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::process::{Child, Command};

use super::Server;
use super::daemon::Daemon;
use super::process::{DaemonProcess, free_port};

/// The lease every node is given unless `extra` says otherwise (`BOSHMUX_LEASE`): short, so
/// that failover tests wait seconds, not the production default.
pub const LEASE: &str = "2s";

/// How long the cluster may take to start, or a node to change state in HAProxy's view.
const LIMIT: Duration = Duration::from_secs(20);

/// The HAProxy backend that health-checks the nodes (contrib/haproxy.cfg).
const BACKEND: &str = "boshmux";

/// The test Redis's database `db` as a store URL. Panics when the run was not started by
/// scripts/test (or `source scripts/redis.sh; redis_start`).
pub fn redis_url(db: u32) -> String {
    let url = std::env::var("BOSHMUX_TEST_REDIS_URL").unwrap_or_else(|_| {
        panic!(
            "BOSHMUX_TEST_REDIS_URL is not set: cluster tests run through scripts/test \
             (or `source scripts/redis.sh; redis_start`)"
        )
    });
    let base = url.rsplit_once('/').map_or(url.as_str(), |(b, _)| b);
    format!("{base}/{db}")
}

/// The HAProxy binary. Panics when the run was not started by scripts/test.
fn haproxy_bin() -> String {
    std::env::var("BOSHMUX_TEST_HAPROXY").unwrap_or_else(|_| {
        panic!(
            "BOSHMUX_TEST_HAPROXY is not set: cluster tests run through scripts/test \
             (or `source scripts/haproxy.sh; haproxy_check`)"
        )
    })
}

/// One server line of HAProxy's `show stat`.
#[derive(Debug, Clone)]
pub struct ServerStat {
    /// The backend (`pxname`).
    pub backend: String,
    /// The server (`svname`): the node's id.
    pub server: String,
    /// `UP`, `DOWN`, `UP 1/2` (going down), `DOWN 1/2` (coming up), `MAINT`, …
    pub status: String,
    /// The last health check's result (`L7OK`, `L4CON`, `L4TOUT`, …; empty for a tracking server).
    pub check_status: String,
    /// Requests (HAProxy sessions) sent to this server so far (`stot`); health checks excluded.
    pub sessions: u64,
    /// Requests whose connection to this server failed and that went to another (`wredis`).
    pub redispatched: u64,
}

/// N daemon processes on one Redis database behind one HAProxy; everything is stopped (SIGKILL)
/// and HAProxy's temporary directory (its config, admin socket) removed on drop, unless
/// `BOSHMUX_TEST_HAPROXY_KEEP` is set.
pub struct Cluster {
    nodes: Vec<DaemonProcess>,
    ids: Vec<String>,
    frozen: Vec<bool>,
    domain: String,
    redis_url: String,
    frontend: SocketAddr,
    dir: PathBuf,
    haproxy: Child,
    haproxy_log: Arc<Mutex<Vec<String>>>,
}

impl Cluster {
    /// Starts `nodes` daemons in front of `p` on the test Redis's database `redis_db` (4..=15,
    /// one per test; emptied first), node `i` with `BOSHMUX_NODE_ID=node{i+1}`,
    /// `BOSHMUX_ADVERTISE_URL=http://127.0.0.1:PORT` and `BOSHMUX_LEASE=`[`LEASE`], then more
    /// `BOSHMUX_*` variables from `extra` (which win). Returns once HAProxy's health checks see
    /// every node up.
    pub async fn start(p: &Server, nodes: usize, redis_db: u32, extra: &[(&str, &str)]) -> Cluster {
        assert!(nodes >= 1);
        assert!(
            (4..16).contains(&redis_db),
            "Redis database {redis_db}: cluster tests use 4..=15 (0, 2 and 3 are other tests')"
        );
        let haproxy_bin = haproxy_bin();
        let redis_url = redis_url(redis_db);
        let mut redis = redis::Client::open(redis_url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap_or_else(|e| panic!("the test Redis at {redis_url}: {e}"));
        let _: () = redis::cmd("FLUSHDB").query_async(&mut redis).await.unwrap();

        let mut procs = Vec::with_capacity(nodes);
        let mut ids = Vec::with_capacity(nodes);
        for i in 0..nodes {
            let id = format!("node{}", i + 1);
            let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
            let advertise = format!("http://{addr}");
            let mut env = vec![
                ("BOSHMUX_NODE_ID", id.as_str()),
                ("BOSHMUX_ADVERTISE_URL", advertise.as_str()),
                ("BOSHMUX_LEASE", LEASE),
            ];
            env.extend_from_slice(extra);
            procs.push(DaemonProcess::start_shared(p, addr, &redis_url, &env).await);
            ids.push(id);
        }

        let dir =
            std::env::temp_dir().join(format!("boshmux-haproxy-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir(&dir).unwrap();
        let frontend = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let servers: Vec<(String, SocketAddr)> = ids
            .iter()
            .cloned()
            .zip(procs.iter().map(|d| d.daemon.addr))
            .collect();
        let contrib = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/haproxy.cfg");
        let operator = std::fs::read_to_string(&contrib).unwrap();
        let cfg = haproxy_config(&operator, frontend, &dir.join("admin.sock"), &servers);
        std::fs::write(dir.join("haproxy.cfg"), cfg).unwrap();

        let mut haproxy = Command::new(haproxy_bin)
            .arg("-f")
            .arg(dir.join("haproxy.cfg"))
            .arg("-db")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("haproxy runs");
        let haproxy_log: Arc<Mutex<Vec<String>>> = Arc::default();
        let mut lines = tokio::io::BufReader::new(haproxy.stderr.take().unwrap()).lines();
        let log = haproxy_log.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                log.lock().push(line);
            }
        });

        let cluster = Cluster {
            nodes: procs,
            frozen: vec![false; ids.len()],
            ids,
            domain: p.domain.clone(),
            redis_url,
            frontend,
            dir,
            haproxy,
            haproxy_log,
        };
        cluster.wait_all_healthy().await;
        cluster
    }

    /// The number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// The cluster as pages and web apps reach it: through HAProxy (API, `/handoff`, `/ws`, …).
    pub fn balancer(&self) -> Daemon {
        Daemon::external(self.frontend, &self.domain)
    }

    /// Node `i` directly, bypassing HAProxy.
    pub fn node(&self, i: usize) -> &Daemon {
        &self.nodes[i].daemon
    }

    /// Node `i`'s process (signals, counters, its log).
    pub fn process(&mut self, i: usize) -> &mut DaemonProcess {
        &mut self.nodes[i]
    }

    /// Node `i`'s id (`node{i+1}`), as the API's `"node"` and HAProxy's server name give it.
    pub fn node_id(&self, i: usize) -> &str {
        &self.ids[i]
    }

    /// The index of the node whose id is `id`.
    pub fn index_of(&self, id: &str) -> usize {
        self.ids
            .iter()
            .position(|n| n == id)
            .unwrap_or_else(|| panic!("no node {id:?} among {:?}", self.ids))
    }

    /// The shared store's URL (`redis://…/DB`).
    pub fn redis_url(&self) -> &str {
        &self.redis_url
    }

    /// `kill -9` node `i`: no stop, nothing but what Redis already has.
    pub async fn kill9(&mut self, i: usize) {
        self.nodes[i].kill9().await;
        self.frozen[i] = false;
    }

    /// `kill -STOP` node `i`: frozen, its sockets open, its leases running out.
    pub fn sigstop(&mut self, i: usize) {
        assert!(!self.frozen[i], "node {i} is already stopped");
        self.nodes[i].signal("STOP");
        self.frozen[i] = true;
    }

    /// `kill -CONT` node `i` after [`Cluster::sigstop`].
    pub fn sigcont(&mut self, i: usize) {
        assert!(self.frozen[i], "node {i} is not stopped");
        self.nodes[i].signal("CONT");
        self.frozen[i] = false;
    }

    /// `kill -TERM` node `i` and waits for the graceful stop to end (the process exits).
    pub async fn term(&mut self, i: usize) -> std::process::ExitStatus {
        assert!(
            !self.frozen[i],
            "node {i} is stopped (SIGSTOP): sigcont it first"
        );
        self.nodes[i].term();
        self.nodes[i].wait_exit().await
    }

    /// A new process for node `i` (killed or stopped before) on the same address, id and Redis.
    pub async fn restart(&mut self, i: usize) {
        self.nodes[i].restart().await;
    }

    /// The id of the node that owns `bare`'s session, as the API of the first running node
    /// answers (`GET /api/v1/sessions/{bare}` → `"node"`).
    pub async fn owner(&self, bare: &str) -> String {
        let i = (0..self.len())
            .find(|&i| self.nodes[i].is_running() && !self.frozen[i])
            .expect("a running node");
        let info = self.nodes[i].daemon.info(bare).await;
        info["node"]
            .as_str()
            .unwrap_or_else(|| panic!("no \"node\" in the session info of {bare}: {info}"))
            .to_owned()
    }

    /// HAProxy's view of the nodes (backend `boshmux`, the health-checked one), in node order.
    pub async fn servers(&self) -> Vec<ServerStat> {
        let all = self.show_stat().await.unwrap_or_else(|e| {
            panic!(
                "HAProxy's stats socket: {e}\n{}",
                self.haproxy_log.lock().join("\n")
            )
        });
        self.ids
            .iter()
            .map(|id| {
                all.iter()
                    .find(|s| s.backend == BACKEND && &s.server == id)
                    .unwrap_or_else(|| panic!("HAProxy has no server {id}: {all:?}"))
                    .clone()
            })
            .collect()
    }

    /// Waits until HAProxy's health checks see every node up (a check passed: `L7OK`).
    pub async fn wait_all_healthy(&self) {
        let started = Instant::now();
        loop {
            if let Ok(all) = self.show_stat().await {
                let up = self.ids.iter().all(|id| {
                    all.iter().any(|s| {
                        s.backend == BACKEND
                            && &s.server == id
                            && s.status == "UP"
                            && s.check_status == "L7OK"
                    })
                });
                if up {
                    return;
                }
                assert!(
                    started.elapsed() < LIMIT,
                    "HAProxy does not see every node up: {all:?}\n{}",
                    self.logs()
                );
            } else {
                assert!(
                    started.elapsed() < LIMIT,
                    "HAProxy's stats socket does not answer\n{}",
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until HAProxy marks node `i` down; returns how long that took from the call.
    pub async fn wait_down(&self, i: usize) -> Duration {
        self.wait_status(i, "DOWN").await
    }

    /// Waits until HAProxy marks node `i` up again; returns how long that took from the call.
    pub async fn wait_up(&self, i: usize) -> Duration {
        self.wait_status(i, "UP").await
    }

    async fn wait_status(&self, i: usize, want: &str) -> Duration {
        let started = Instant::now();
        loop {
            let s = &self.servers().await[i];
            if s.status == want {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < LIMIT,
                "HAProxy does not mark {} {want}: {s:?}\n{}",
                self.ids[i],
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Everything every node and HAProxy logged, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for (id, node) in self.ids.iter().zip(&self.nodes) {
            out.push_str(&format!("==== {id} ====\n"));
            for line in node.log.lock().iter() {
                out.push_str(line);
                out.push('\n');
            }
        }
        out.push_str("==== haproxy ====\n");
        for line in self.haproxy_log.lock().iter() {
            out.push_str(line);
            out.push('\n');
        }
        out
    }

    /// `show stat` on HAProxy's admin socket, server lines only.
    async fn show_stat(&self) -> std::io::Result<Vec<ServerStat>> {
        let mut sock = tokio::net::UnixStream::connect(self.dir.join("admin.sock")).await?;
        sock.write_all(b"show stat\n").await?;
        let mut csv = String::new();
        tokio::time::timeout(Duration::from_secs(5), sock.read_to_string(&mut csv))
            .await
            .map_err(|_| std::io::Error::other("show stat timed out"))??;
        parse_stat(&csv)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.haproxy.start_kill();
        if std::env::var_os("BOSHMUX_TEST_HAPROXY_KEEP").is_some() {
            eprintln!("cluster: kept {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The CSV of `show stat` (header `# pxname,svname,…`), its server lines.
fn parse_stat(csv: &str) -> std::io::Result<Vec<ServerStat>> {
    let mut lines = csv.lines();
    let header: Vec<&str> = lines
        .next()
        .and_then(|h| h.strip_prefix("# "))
        .ok_or_else(|| std::io::Error::other(format!("not a stat CSV: {csv:?}")))?
        .split(',')
        .collect();
    let col = |name: &str| {
        header
            .iter()
            .position(|h| *h == name)
            .ok_or_else(|| std::io::Error::other(format!("no column {name} in {header:?}")))
    };
    let (px, sv, status, check, stot, wredis) = (
        col("pxname")?,
        col("svname")?,
        col("status")?,
        col("check_status")?,
        col("stot")?,
        col("wredis")?,
    );
    Ok(lines
        .map(|l| l.split(',').collect::<Vec<_>>())
        .filter(|f| f.len() > check && !["FRONTEND", "BACKEND"].contains(&f[sv]))
        .map(|f| ServerStat {
            backend: f[px].to_owned(),
            server: f[sv].to_owned(),
            status: f[status].to_owned(),
            check_status: f[check].trim_start_matches('*').to_owned(),
            sessions: f[stot].parse().unwrap_or(0),
            redispatched: f[wredis].parse().unwrap_or(0),
        })
        .collect())
}

/// `contrib/haproxy.cfg` made runnable here: no daemon mode, user, chroot or syslog (HAProxy
/// logs to its stderr, which [`Cluster::logs`] shows), the admin socket at `socket`, the
/// frontend's `bind` on `frontend`, and in each backend its server lines replaced by one line per
/// node built from the first (name and address replaced, other references to the name too:
/// `cookie node1`, `track boshmux/node1`). Every other setting is the operator's.
fn haproxy_config(
    operator: &str,
    frontend: SocketAddr,
    socket: &Path,
    servers: &[(String, SocketAddr)],
) -> String {
    let mut out =
        String::from("# Generated by tests/support/cluster.rs from contrib/haproxy.cfg\n");
    let mut section = "";
    let mut servers_done = false;
    for line in operator.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let Some(&first) = words.first() else {
            out.push('\n');
            continue;
        };
        if first.starts_with('#') {
            continue;
        }
        if !line.starts_with(char::is_whitespace) {
            section = first;
            servers_done = false;
            out.push_str(line);
            out.push('\n');
            if section == "global" {
                out.push_str("    log stderr format raw local0\n");
                out.push_str(&format!(
                    "    stats socket {} mode 600 level admin\n",
                    socket.display()
                ));
            }
            continue;
        }
        match (section, first) {
            ("global", "log" | "stats" | "user" | "group" | "daemon" | "chroot" | "pidfile") => {}
            (_, "bind") => out.push_str(&format!("    bind {frontend}\n")),
            (_, "server") if servers_done => {}
            (_, "server") => {
                servers_done = true;
                let old = words[1];
                for (name, addr) in servers {
                    let rest: Vec<String> = words[3..]
                        .iter()
                        .map(|w| match w.strip_suffix(old) {
                            Some("") => name.clone(),
                            Some(prefix) if prefix.ends_with('/') => format!("{prefix}{name}"),
                            _ => (*w).to_owned(),
                        })
                        .collect();
                    let line = format!("server {name} {addr} {}", rest.join(" "));
                    out.push_str(&format!("    {}\n", line.trim_end()));
                }
            }
            _ => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}
