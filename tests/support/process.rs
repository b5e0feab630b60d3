//! The daemon as a real process (`boshmux serve`), for tests that kill it: `kill -9` at the
//! moments that matter, then a new process on the same address and store directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::AsyncBufReadExt as _;
use tokio::process::{Child, Command};

use super::Server;
use super::daemon::{API_KEY, Daemon, ORIGIN};

const LIMIT: Duration = Duration::from_secs(20);

/// A `boshmux serve` process with an embedded store (or a shared one, [`DaemonProcess::start_shared`]),
/// restartable on the same port and store.
pub struct DaemonProcess {
    /// Talks to the current process (the page and API helpers of the in-process daemon).
    pub daemon: Daemon,
    child: Option<Child>,
    bosh: String,
    store: StoreAt,
    addr: SocketAddr,
    extra: Vec<(String, String)>,
    /// Everything the processes logged (stderr), for failure messages.
    pub log: std::sync::Arc<parking_lot::Mutex<Vec<String>>>,
}

/// Where a process keeps its sessions (`BOSHMUX_STORE`).
enum StoreAt {
    /// An embedded store in this directory, removed on drop.
    Dir(PathBuf),
    /// A store other processes share (`redis://…`), left as it is on drop.
    Shared(String),
}

/// A free loopback TCP port (the small window before the daemon binds it is accepted).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A fresh store directory under the system's temporary directory.
pub fn store_dir(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "boshmux-store-{name}-{}",
        uuid::Uuid::new_v4().simple()
    ))
}

impl DaemonProcess {
    /// Starts `boshmux serve` in front of `p` with its store in `store`; `extra` are more
    /// `BOSHMUX_*` variables.
    pub async fn start(p: &Server, store: &Path, extra: &[(&str, &str)]) -> DaemonProcess {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        DaemonProcess::start_at(p, addr, StoreAt::Dir(store.to_owned()), extra).await
    }

    /// Starts `boshmux serve` in front of `p` on `addr` with `BOSHMUX_STORE=store` (a store
    /// other processes share, e.g. `redis://127.0.0.1:PORT/DB`; nothing is removed on drop);
    /// `extra` are more `BOSHMUX_*` variables (a cluster node's `BOSHMUX_NODE_ID`, …).
    pub async fn start_shared(
        p: &Server,
        addr: SocketAddr,
        store: &str,
        extra: &[(&str, &str)],
    ) -> DaemonProcess {
        DaemonProcess::start_at(p, addr, StoreAt::Shared(store.to_owned()), extra).await
    }

    async fn start_at(
        p: &Server,
        addr: SocketAddr,
        store: StoreAt,
        extra: &[(&str, &str)],
    ) -> DaemonProcess {
        let mut d = DaemonProcess {
            daemon: Daemon::external(addr, &p.domain),
            child: None,
            bosh: p.bosh.clone(),
            store,
            addr,
            extra: extra
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            log: Default::default(),
        };
        d.spawn().await;
        d
    }

    async fn spawn(&mut self) {
        let store = match &self.store {
            StoreAt::Dir(dir) => dir.as_os_str(),
            StoreAt::Shared(url) => url.as_ref(),
        };
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_boshmux"));
        cmd.arg("serve")
            .env("BOSHMUX_LISTEN", self.addr.to_string())
            .env("BOSHMUX_BOSH_URL", &self.bosh)
            .env("BOSHMUX_XMPP_DOMAIN", &self.daemon.domain)
            .env("BOSHMUX_API_KEY", API_KEY)
            .env("BOSHMUX_ALLOWED_ORIGINS", ORIGIN)
            .env("BOSHMUX_BOSH_WAIT", "10")
            .env("BOSHMUX_STORE", store)
            // `BOSHMUX_TEST_DAEMON_LOG=boshmux=debug` for a closer look at a failing crash test.
            .env(
                "BOSHMUX_LOG",
                std::env::var("BOSHMUX_TEST_DAEMON_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in &self.extra {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("boshmux runs");
        let stderr = child.stderr.take().unwrap();
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        let log = self.log.clone();
        tokio::time::timeout(LIMIT, async {
            while let Some(line) = lines.next_line().await.unwrap() {
                let serving = line.contains("serving");
                log.lock().push(line);
                if serving {
                    return;
                }
            }
            panic!(
                "the daemon exited before serving:\n{}",
                log.lock().join("\n")
            );
        })
        .await
        .expect("the daemon serves");
        // Keep reading its log so that it never blocks on a full pipe.
        let log = self.log.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                log.lock().push(line);
            }
        });
        self.child = Some(child);
    }

    /// `kill -9`: no stop, no flush, nothing but what the store already has.
    pub async fn kill9(&mut self) {
        let mut child = self.child.take().expect("running");
        child.start_kill().unwrap(); // SIGKILL
        child.wait().await.unwrap();
    }

    /// `kill -TERM`: the graceful stop starts; the process is still running when this returns.
    pub fn term(&mut self) {
        self.signal("TERM");
    }

    /// Sends `kill -NAME` (`TERM`, `STOP`, `CONT`, …) to the running process.
    pub fn signal(&self, name: &str) {
        let status = std::process::Command::new("kill")
            .args([&format!("-{name}"), &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{name} {}", self.pid());
    }

    /// Waits for the process to exit by itself (after [`DaemonProcess::term`]).
    pub async fn wait_exit(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        tokio::time::timeout(LIMIT, child.wait())
            .await
            .expect("the daemon exits in time")
            .unwrap()
    }

    /// A new process on the same address and store.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "kill it first");
        self.log.lock().push("---- restart ----".into());
        self.spawn().await;
    }

    /// The value of the counter `name` in `/metrics` (0 when absent).
    pub async fn counter(&self, name: &str) -> u64 {
        let text = reqwest::get(self.daemon.url("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or(0)
    }

    /// The store directory (panics for a shared store).
    pub fn store(&self) -> &Path {
        match &self.store {
            StoreAt::Dir(dir) => dir,
            StoreAt::Shared(url) => panic!("the store is {url}, not a directory"),
        }
    }

    /// The process id of the running process (for signals: `kill -STOP`, …).
    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .expect("running")
            .id()
            .expect("not reaped")
    }

    /// Whether a process was started and has not been killed or waited for since.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        // A failing test shows what the processes logged: crash tests fail at moments that are
        // hard to replay, and the log is the only account of them.
        if std::thread::panicking() {
            let log = self.log.lock();
            let tail = log.len().saturating_sub(400);
            eprintln!("---- daemon log (last {} lines) ----", log.len() - tail);
            for line in &log[tail..] {
                eprintln!("{line}");
            }
        }
        if let Some(child) = &mut self.child {
            let _ = child.start_kill();
        }
        if let StoreAt::Dir(dir) = &self.store {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Waits until the contact `b` sees `a_full` available (and nothing else from it first).
pub async fn sees_available(b: &mut boshmux::bosh::BoshSession, a_full: &str) {
    loop {
        let s = super::next_stanza(&mut b.events, LIMIT).await;
        if s.is("presence", boshmux::xmpp::ns::CLIENT) && s.attr("from") == Some(a_full) {
            assert_eq!(s.attr("type"), None, "{s}");
            return;
        }
    }
}

/// Every frame a page of a stopped or killed daemon still gets until its socket ends.
pub async fn drain_texts(mut page: super::daemon::Page) -> Vec<String> {
    let mut texts = Vec::new();
    while let Some(Ok(text)) = page.next_text(LIMIT).await {
        texts.push(text);
    }
    texts
}

/// The body of a message frame, if it is one.
pub fn message_body(text: &str) -> Option<String> {
    use boshmux::xmpp::{Limits, ns, parse};
    let el = parse(text.as_bytes(), &Limits::PAGE).ok()?;
    el.is("message", ns::CLIENT)
        .then(|| super::body_text(&el))?
}
