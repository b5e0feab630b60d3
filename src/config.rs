//! Configuration (SPEC §2): a TOML file, then `BOSHMUX_*` environment variables, then flags,
//! later sources winning. Every value is checked on load; an error names the key and the source.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The daemon's settings. `Debug` hides the api key.
#[derive(Clone, PartialEq, Eq)]
pub struct Config {
    /// Address the daemon listens on.
    pub listen: SocketAddr,
    /// Upstream BOSH connection manager.
    pub bosh_url: Option<String>,
    /// The XMPP domain users belong to.
    pub xmpp_domain: Option<String>,
    /// Server-to-server secret for the handoff API; `serve` refuses to start without one.
    pub api_key: Option<String>,
    /// Exact origins allowed to open pages (`scheme://host[:port]`).
    pub allowed_origins: Vec<String>,
    /// How long a session outlives its last page.
    pub grace: Duration,
    /// Where sessions are kept as they change so that they outlive the process (SPEC §8): a
    /// directory for the embedded store, or a `redis://` URL (SPEC §12). None: a stop ends them.
    pub store: Option<String>,
    /// `wait` asked of the connection manager, seconds.
    pub bosh_wait: u32,
    /// Resource asked for when logging a user in (kept across re-logins).
    pub resource: String,
    /// Idle lifetime of a browser token.
    pub token_ttl: Duration,
    /// Limits of SPEC §9.
    pub limits: Limits,
    /// Peers (reverse proxies) whose `X-Forwarded-For` names the client, and which are exempt
    /// from `limits.connections_per_address` (they bound their own clients).
    pub trusted_proxies: Vec<std::net::IpAddr>,
    /// The web app's re-login endpoint (SPEC §7): asked for credentials when a session without a
    /// password in memory is lost upstream. An http(s) URL.
    pub relogin_url: Option<String>,
    /// Longest a whole upstream login may take (create, SASL, bind) before it is given up; the
    /// handoff API then answers 504.
    pub login_timeout: Duration,
    /// This node's name in a cluster (SPEC §12): shown as a session's `node`, and the part of
    /// its member id that a restart keeps. `None`: the host name and the listen port.
    pub node_id: Option<String>,
    /// The base URL the other nodes of a cluster reach this one at (pages and API requests
    /// relayed to the owner of a session). `None`: `http://` and the listen address.
    pub advertise_url: Option<String>,
    /// How long a cluster node's ownership of its sessions outlives its last renewal (renewed
    /// every quarter of it); a dead node's sessions are adopted once it has passed.
    pub lease: Duration,
}

impl std::fmt::Debug for Config {
    // Every field named, so that a new one is a compile error here rather than a leak.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Config {
            listen,
            bosh_url,
            xmpp_domain,
            api_key,
            allowed_origins,
            grace,
            store,
            bosh_wait,
            resource,
            token_ttl,
            limits,
            trusted_proxies,
            relogin_url,
            login_timeout,
            node_id,
            advertise_url,
            lease,
        } = self;
        f.debug_struct("Config")
            .field("listen", listen)
            .field("bosh_url", bosh_url)
            .field("xmpp_domain", xmpp_domain)
            .field("api_key", &api_key.as_ref().map(|_| "<hidden>"))
            .field("allowed_origins", allowed_origins)
            .field("grace", grace)
            .field("store", store)
            .field("bosh_wait", bosh_wait)
            .field("resource", resource)
            .field("token_ttl", token_ttl)
            .field("limits", limits)
            .field("trusted_proxies", trusted_proxies)
            .field("relogin_url", relogin_url)
            .field("login_timeout", login_timeout)
            .field("node_id", node_id)
            .field("advertise_url", advertise_url)
            .field("lease", lease)
            .finish()
    }
}

/// Limits with defaults (SPEC §9).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Pages one user may have open at once.
    pub pages_per_user: usize,
    /// Users (upstream sessions) one daemon holds.
    pub users: usize,
    /// Largest stanza a page may send, bytes.
    pub stanza_bytes: usize,
    /// Bytes queued for one page before it is closed as too slow (4002).
    pub page_queue_bytes: usize,
    /// Stanzas per second one page may send (sustained).
    pub page_send_rate: u32,
    /// Interval of WebSocket pings to pages.
    pub ws_ping_interval: Duration,
    /// A page that answers no ping for this long is closed.
    pub ws_dead_peer_timeout: Duration,
    /// Time allowed from upgrade to bound resource.
    pub handshake_timeout: Duration,
    /// WebSocket upgrades accepted per second, all clients together (an overload guard).
    pub upgrade_rate: u32,
    /// WebSocket upgrades accepted per second from one client (an address, or a user known by
    /// its cookie); the burst is the same number, so the default exceeds `pages_per_user` (a
    /// browser restoring every tab at once).
    pub upgrade_rate_per_client: u32,
    /// Longest time a client may take to send a request's headers, counted from the connection's
    /// start or the end of the previous response (so it is also the keep-alive idle time).
    pub header_read_timeout: Duration,
    /// A connection that has not upgraded is closed after this long with no bytes moving either
    /// way while no request is being handled (e.g. a client that does not read its response).
    pub http_idle_timeout: Duration,
    /// Connections not yet upgraded to WebSocket that one client address (IPv6: its /64) may
    /// hold; more are closed at once. Trusted proxies are exempt.
    pub connections_per_address: usize,
    /// Stanzas buffered for a user while no page is attached.
    pub offline_buffer: usize,
    /// How long an iq waits for its reply before the asker gets an error.
    pub iq_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 5380)),
            bosh_url: None,
            xmpp_domain: None,
            api_key: None,
            allowed_origins: Vec::new(),
            grace: Duration::from_secs(60),
            store: None,
            bosh_wait: 60,
            resource: "boshmux".into(),
            token_ttl: Duration::from_secs(24 * 3600),
            limits: Limits::default(),
            trusted_proxies: Vec::new(),
            relogin_url: None,
            login_timeout: Duration::from_secs(30),
            node_id: None,
            advertise_url: None,
            lease: Duration::from_secs(3),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            pages_per_user: 32,
            users: 10_000,
            stanza_bytes: 256 * 1024,
            page_queue_bytes: 1024 * 1024,
            page_send_rate: 50,
            ws_ping_interval: Duration::from_secs(30),
            ws_dead_peer_timeout: Duration::from_secs(75),
            handshake_timeout: Duration::from_secs(10),
            upgrade_rate: 200,
            upgrade_rate_per_client: 40,
            header_read_timeout: Duration::from_secs(10),
            http_idle_timeout: Duration::from_secs(30),
            connections_per_address: 256,
            offline_buffer: 1000,
            iq_timeout: Duration::from_secs(30),
        }
    }
}

/// A configuration error. Each names where the bad value came from and which key it was.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not TOML.
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message (with line and column).
        message: String,
    },
    /// A key nobody reads: most likely a typo.
    #[error("{source_name}: unknown key `{key}`")]
    UnknownKey {
        /// File path, environment variable or flag.
        source_name: String,
        /// The key.
        key: String,
    },
    /// A value of the wrong form.
    #[error("{source_name}: invalid value for `{key}`: {message}")]
    Invalid {
        /// File path, environment variable or flag.
        source_name: String,
        /// The key.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// A required key is absent.
    #[error("`{key}` is required{hint}")]
    Missing {
        /// The key.
        key: &'static str,
        /// How to set it.
        hint: &'static str,
    },
}

/// Something in the configuration that is ignored, said as a warning (SPEC §2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigWarning {
    /// A `BOSHMUX_*` environment variable that names no setting. Not an error: wrapper scripts
    /// share the prefix (e.g. their own `BOSHMUX_BIN`).
    UnknownEnv {
        /// The variable.
        var: String,
        /// The variable of the setting whose name is closest, if any is close.
        closest: Option<String>,
    },
}

impl std::fmt::Display for ConfigWarning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigWarning::UnknownEnv { var, closest } => {
                write!(
                    f,
                    "environment variable {var} is not a boshmux setting; ignored"
                )?;
                if let Some(closest) = closest {
                    write!(f, " (did you mean {closest}?)")?;
                }
                Ok(())
            }
        }
    }
}

/// Every key [`Config::set`] takes, for suggestions.
const KEYS: &[&str] = &[
    "listen",
    "bosh_url",
    "xmpp_domain",
    "api_key",
    "allowed_origins",
    "grace",
    "store",
    "token_ttl",
    "bosh_wait",
    "resource",
    "trusted_proxies",
    "relogin_url",
    "login_timeout",
    "node_id",
    "advertise_url",
    "lease",
    "limits.pages_per_user",
    "limits.users",
    "limits.stanza_bytes",
    "limits.page_queue_bytes",
    "limits.page_send_rate",
    "limits.ws_ping_interval",
    "limits.ws_dead_peer_timeout",
    "limits.handshake_timeout",
    "limits.upgrade_rate",
    "limits.upgrade_rate_per_client",
    "limits.header_read_timeout",
    "limits.http_idle_timeout",
    "limits.connections_per_address",
    "limits.offline_buffer",
    "limits.iq_timeout",
];

/// The environment variable that sets `key`.
fn env_var_of(key: &str) -> String {
    format!("BOSHMUX_{}", key.replace('.', "_").to_ascii_uppercase())
}

/// The known key most like `key` (Jaro-Winkler similarity at least 0.8), if any.
fn closest_key(key: &str) -> Option<&'static str> {
    KEYS.iter()
        .map(|k| (strsim::jaro_winkler(key, k), *k))
        .filter(|(score, _)| *score >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, k)| k)
}

/// Settings given as command-line flags (SPEC §2); `None` leaves the earlier source's value.
/// `Debug` hides the api key.
#[derive(Clone, Default, clap::Args)]
pub struct Flags {
    /// TOML configuration file.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:5380].
    #[arg(long)]
    pub listen: Option<String>,
    /// Upstream BOSH URL, e.g. http://127.0.0.1:5280/http-bind.
    #[arg(long)]
    pub bosh_url: Option<String>,
    /// The XMPP domain of the users.
    #[arg(long)]
    pub xmpp_domain: Option<String>,
    /// Secret for the handoff API (prefer the config file or BOSHMUX_API_KEY: flags show in `ps`).
    #[arg(long)]
    pub api_key: Option<String>,
    /// An origin allowed to open pages; repeat for several.
    #[arg(long = "allow-origin", value_name = "ORIGIN")]
    pub allow_origin: Vec<String>,
    /// How long a session outlives its last page, e.g. 60s.
    #[arg(long)]
    pub grace: Option<String>,
    /// Where sessions outlive the process: a directory (embedded store) or `redis://host:port/db`.
    #[arg(long)]
    pub store: Option<String>,
    /// The web app's re-login endpoint (SPEC §7), e.g. https://app.example.com/boshmux/relogin.
    #[arg(long)]
    pub relogin_url: Option<String>,
}

impl std::fmt::Debug for Flags {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Flags {
            config,
            listen,
            bosh_url,
            xmpp_domain,
            api_key,
            allow_origin,
            grace,
            store,
            relogin_url,
        } = self;
        f.debug_struct("Flags")
            .field("config", config)
            .field("listen", listen)
            .field("bosh_url", bosh_url)
            .field("xmpp_domain", xmpp_domain)
            .field("api_key", &api_key.as_ref().map(|_| "<hidden>"))
            .field("allow_origin", allow_origin)
            .field("grace", grace)
            .field("store", store)
            .field("relogin_url", relogin_url)
            .finish()
    }
}

impl Config {
    /// Loads the file named in `flags` (if any), then `env` (`BOSHMUX_*` pairs), then `flags`.
    /// Warnings (see [`Config::load_with_warnings`]) are logged at `warn`.
    pub fn load(
        flags: &Flags,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let (cfg, warnings) = Config::load_with_warnings(flags, env)?;
        for w in warnings {
            tracing::warn!("{w}");
        }
        Ok(cfg)
    }

    /// Like [`Config::load`], handing back what was ignored instead of logging it: unknown
    /// `BOSHMUX_*` variables, each with the closest setting's variable.
    pub fn load_with_warnings(
        flags: &Flags,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(Config, Vec<ConfigWarning>), ConfigError> {
        let mut warnings = Vec::new();
        let mut cfg = Config::default();
        if let Some(path) = &flags.config {
            cfg.apply_file(path)?;
        }
        let mut env: Vec<(String, String)> = env
            .into_iter()
            // BOSHMUX_LOG is the log filter, read by the binary; BOSHMUX_TEST_* belong to the tests.
            .filter(|(k, _)| {
                k.starts_with("BOSHMUX_") && k != "BOSHMUX_LOG" && !k.starts_with("BOSHMUX_TEST_")
            })
            .collect();
        env.sort();
        for (var, value) in env {
            let key = var["BOSHMUX_".len()..].to_ascii_lowercase();
            let key = match key.strip_prefix("limits_") {
                Some(rest) => format!("limits.{rest}"),
                None => key,
            };
            if key == "allowed_origins" || key == "trusted_proxies" {
                cfg.clear_list(&key);
                for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                    cfg.set(&var, &key, item)?;
                }
            } else {
                match cfg.set(&var, &key, &value) {
                    Err(ConfigError::UnknownKey { .. }) => {
                        warnings.push(ConfigWarning::UnknownEnv {
                            closest: closest_key(&key).map(env_var_of),
                            var,
                        });
                    }
                    other => other?,
                }
            }
        }
        let pairs = [
            ("--listen", "listen", &flags.listen),
            ("--bosh-url", "bosh_url", &flags.bosh_url),
            ("--xmpp-domain", "xmpp_domain", &flags.xmpp_domain),
            ("--api-key", "api_key", &flags.api_key),
            ("--grace", "grace", &flags.grace),
            ("--store", "store", &flags.store),
            ("--relogin-url", "relogin_url", &flags.relogin_url),
        ];
        for (flag, key, value) in pairs {
            if let Some(v) = value {
                cfg.set(flag, key, v)?;
            }
        }
        if !flags.allow_origin.is_empty() {
            cfg.allowed_origins.clear();
            for origin in &flags.allow_origin {
                cfg.set("--allow-origin", "allowed_origins", origin)?;
            }
        }
        Ok((cfg, warnings))
    }

    /// `node_id`, or this host's name and the listen port (SPEC §12).
    pub fn node_id(&self) -> String {
        self.node_id
            .clone()
            .unwrap_or_else(|| format!("{}:{}", host_name(), self.listen.port()))
    }

    /// `advertise_url`, or `http://` and the listen address (the host's name when listening
    /// on every address).
    pub fn advertise_url(&self) -> String {
        if let Some(url) = &self.advertise_url {
            return url.clone();
        }
        if self.listen.ip().is_unspecified() {
            format!("http://{}:{}", host_name(), self.listen.port())
        } else {
            format!("http://{}", self.listen)
        }
    }

    /// Checks what `serve` needs beyond well-formed values.
    pub fn require_for_serve(&self) -> Result<(), ConfigError> {
        if self.api_key.is_none() {
            return Err(ConfigError::Missing {
                key: "api_key",
                hint: " to serve (config file, BOSHMUX_API_KEY or --api-key)",
            });
        }
        if self.bosh_url.is_none() {
            return Err(ConfigError::Missing {
                key: "bosh_url",
                hint: " (config file, BOSHMUX_BOSH_URL or --bosh-url)",
            });
        }
        if self.xmpp_domain.is_none() {
            return Err(ConfigError::Missing {
                key: "xmpp_domain",
                hint: " (config file, BOSHMUX_XMPP_DOMAIN or --xmpp-domain)",
            });
        }
        Ok(())
    }

    fn apply_file(&mut self, path: &Path) -> Result<(), ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let table: toml::Table =
            text.parse()
                .map_err(|e: toml::de::Error| ConfigError::Syntax {
                    path: path.to_owned(),
                    message: e.to_string().trim_end().to_owned(),
                })?;
        let source_name = path.display().to_string();
        for (key, value) in table {
            if key == "limits" {
                let toml::Value::Table(limits) = value else {
                    return Err(invalid(&source_name, "limits", "expected a table"));
                };
                for (k, v) in limits {
                    let full = format!("limits.{k}");
                    let s = scalar(&source_name, &full, v)?;
                    self.set(&source_name, &full, &s)?;
                }
            } else if key == "allowed_origins" || key == "trusted_proxies" {
                let toml::Value::Array(items) = value else {
                    return Err(invalid(&source_name, &key, "expected an array of strings"));
                };
                self.clear_list(&key);
                for item in items {
                    let s = scalar(&source_name, &key, item)?;
                    self.set(&source_name, &key, &s)?;
                }
            } else {
                let s = scalar(&source_name, &key, value)?;
                self.set(&source_name, &key, &s)?;
            }
        }
        Ok(())
    }

    /// Empties a list-valued key before a source gives its whole list.
    fn clear_list(&mut self, key: &str) {
        match key {
            "trusted_proxies" => self.trusted_proxies.clear(),
            _ => self.allowed_origins.clear(),
        }
    }

    /// Sets one key from its textual value; `allowed_origins` and `trusted_proxies` append.
    fn set(&mut self, source_name: &str, key: &str, value: &str) -> Result<(), ConfigError> {
        let bad = |message: String| invalid(source_name, key, &message);
        let l = &mut self.limits;
        match key {
            "listen" => {
                self.listen = value
                    .parse()
                    .map_err(|_| bad(format!("{value:?} is not an address like 127.0.0.1:5380")))?;
            }
            "bosh_url" => self.bosh_url = Some(http_url(value).map_err(bad)?),
            "relogin_url" => self.relogin_url = Some(http_url(value).map_err(bad)?),
            "login_timeout" => {
                self.login_timeout = positive(duration(value).map_err(bad)?).map_err(bad)?;
            }
            "xmpp_domain" => {
                let jid = crate::xmpp::Jid::parse(value).map_err(|e| bad(e.to_string()))?;
                if jid.local().is_some() || jid.resource().is_some() {
                    return Err(bad(format!("{value:?} is not a bare domain")));
                }
                self.xmpp_domain = Some(jid.domain().to_owned());
            }
            "api_key" => {
                if value.len() < 16 {
                    return Err(bad("must be at least 16 characters".into()));
                }
                self.api_key = Some(value.to_owned());
            }
            "allowed_origins" => {
                self.allowed_origins.push(parse_origin(value).map_err(bad)?);
            }
            "trusted_proxies" => self.trusted_proxies.push(
                value
                    .parse()
                    .map_err(|_| bad(format!("{value:?} is not an IP address")))?,
            ),
            "grace" => self.grace = duration(value).map_err(bad)?,
            "store" => self.store = Some(value.to_owned()),
            "node_id" => {
                if value.is_empty()
                    || value.len() > 128
                    || value
                        .chars()
                        .any(|c| c == '#' || c.is_whitespace() || c.is_control())
                {
                    return Err(bad(
                        "must be 1 to 128 characters without '#', spaces or control characters"
                            .into(),
                    ));
                }
                self.node_id = Some(value.to_owned());
            }
            "advertise_url" => {
                self.advertise_url = Some(
                    http_url(value)
                        .map_err(bad)?
                        .trim_end_matches('/')
                        .to_owned(),
                );
            }
            "lease" => {
                let d = duration(value).map_err(bad)?;
                if d < Duration::from_millis(400) || d > Duration::from_secs(25) {
                    return Err(bad(
                        "must be between 400ms and 25s (well inside the XMPP server's inactivity window)".into(),
                    ));
                }
                self.lease = d;
            }
            "token_ttl" => self.token_ttl = duration(value).map_err(bad)?,
            "bosh_wait" => self.bosh_wait = number(value, 1, 120).map_err(bad)?,
            "resource" => {
                if value.is_empty() || value.chars().any(char::is_control) {
                    return Err(bad(
                        "must be a non-empty resource without control characters".into(),
                    ));
                }
                self.resource = value.to_owned();
            }
            "limits.pages_per_user" => l.pages_per_user = number(value, 1, 10_000).map_err(bad)?,
            "limits.users" => l.users = number(value, 1, 10_000_000).map_err(bad)?,
            "limits.stanza_bytes" => l.stanza_bytes = number(value, 1024, 16 << 20).map_err(bad)?,
            "limits.page_queue_bytes" => {
                l.page_queue_bytes = number(value, 4096, 1 << 30).map_err(bad)?;
            }
            "limits.page_send_rate" => {
                l.page_send_rate = number(value, 1, 1_000_000).map_err(bad)?
            }
            "limits.ws_ping_interval" => l.ws_ping_interval = duration(value).map_err(bad)?,
            "limits.ws_dead_peer_timeout" => {
                l.ws_dead_peer_timeout = duration(value).map_err(bad)?
            }
            "limits.handshake_timeout" => l.handshake_timeout = duration(value).map_err(bad)?,
            "limits.upgrade_rate" => l.upgrade_rate = number(value, 1, 1_000_000).map_err(bad)?,
            "limits.upgrade_rate_per_client" => {
                l.upgrade_rate_per_client = number(value, 1, 1_000_000).map_err(bad)?;
            }
            "limits.header_read_timeout" => {
                l.header_read_timeout = positive(duration(value).map_err(bad)?).map_err(bad)?;
            }
            "limits.http_idle_timeout" => {
                l.http_idle_timeout = positive(duration(value).map_err(bad)?).map_err(bad)?;
            }
            "limits.connections_per_address" => {
                l.connections_per_address = number(value, 1, 1_000_000).map_err(bad)?;
            }
            "limits.offline_buffer" => {
                l.offline_buffer = number(value, 0, 1_000_000).map_err(bad)?
            }
            "limits.iq_timeout" => l.iq_timeout = duration(value).map_err(bad)?,
            _ => {
                return Err(ConfigError::UnknownKey {
                    source_name: source_name.to_owned(),
                    key: key.to_owned(),
                });
            }
        }
        Ok(())
    }
}

fn invalid(source_name: &str, key: &str, message: &str) -> ConfigError {
    ConfigError::Invalid {
        source_name: source_name.to_owned(),
        key: key.to_owned(),
        message: message.to_owned(),
    }
}

/// A TOML scalar as text, so file, environment and flags share one parser per key.
fn scalar(source_name: &str, key: &str, v: toml::Value) -> Result<String, ConfigError> {
    match v {
        toml::Value::String(s) => Ok(s),
        toml::Value::Integer(i) => Ok(i.to_string()),
        toml::Value::Float(f) => Ok(f.to_string()),
        toml::Value::Boolean(b) => Ok(b.to_string()),
        other => Err(invalid(
            source_name,
            key,
            &format!("expected a string or number, found {}", other.type_str()),
        )),
    }
}

/// An absolute http(s) URL, kept as given.
/// The host's name (Linux), else `localhost`.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

fn http_url(value: &str) -> Result<String, String> {
    let url = reqwest::Url::parse(value).map_err(|e| format!("{value:?}: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("{value:?}: scheme must be http or https"));
    }
    Ok(value.to_owned())
}

/// A timeout of zero would close every connection at once.
fn positive(d: Duration) -> Result<Duration, String> {
    if d.is_zero() {
        return Err("must be longer than zero".into());
    }
    Ok(d)
}

fn number<T>(value: &str, min: T, max: T) -> Result<T, String>
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy,
{
    let n: T = value
        .trim()
        .parse()
        .map_err(|_| format!("{value:?} is not a whole number"))?;
    if n < min || n > max {
        return Err(format!("{n} is outside {min}..={max}"));
    }
    Ok(n)
}

/// A duration: whole seconds (`60`) or with units (`90s`, `2m`, `500ms`).
fn duration(value: &str) -> Result<Duration, String> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(v).map_err(|e| format!("{value:?} is not a duration like 60s: {e}"))
}

/// An origin as browsers send it: `scheme://host[:port]`, nothing after.
fn parse_origin(value: &str) -> Result<String, String> {
    let url = reqwest::Url::parse(value).map_err(|e| format!("{value:?}: {e}"))?;
    let canonical = url.origin().ascii_serialization();
    if canonical == "null" || !matches!(url.scheme(), "http" | "https") {
        return Err(format!("{value:?} is not an http(s) origin"));
    }
    if value.trim_end_matches('/') != canonical {
        return Err(format!(
            "{value:?} is not an exact origin (scheme://host[:port], no path); did you mean {canonical:?}?"
        ));
    }
    Ok(canonical)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn write_file(text: &str) -> tempfile_path::TempPath {
        tempfile_path::TempPath::with(text)
    }

    /// A file under the target directory, removed on drop; enough for config tests.
    mod tempfile_path {
        pub(super) struct TempPath(pub(super) std::path::PathBuf);
        impl TempPath {
            pub(super) fn with(text: &str) -> Self {
                let p =
                    std::env::temp_dir().join(format!("boshmux-cfg-{}.toml", uuid::Uuid::new_v4()));
                std::fs::write(&p, text).unwrap();
                TempPath(p)
            }
        }
        impl Drop for TempPath {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    #[test]
    fn defaults() {
        let cfg = Config::load(&Flags::default(), env(&[])).unwrap();
        assert_eq!(cfg, Config::default());
        assert_eq!(cfg.listen.to_string(), "127.0.0.1:5380");
        assert_eq!(cfg.grace, Duration::from_secs(60));
        assert_eq!(cfg.limits.pages_per_user, 32);
    }

    #[test]
    fn later_sources_win() {
        let file = write_file(
            "listen = \"127.0.0.1:6000\"\nbosh_url = \"http://127.0.0.1:5280/http-bind\"\n\
             grace = 30\nallowed_origins = [\"https://a.example\"]\n[limits]\npages_per_user = 8\n",
        );
        let flags = Flags {
            config: Some(file.0.clone()),
            grace: Some("2m".into()),
            ..Flags::default()
        };
        let cfg = Config::load(
            &flags,
            env(&[
                ("BOSHMUX_LISTEN", "127.0.0.1:7000"),
                ("BOSHMUX_GRACE", "45s"),
                ("BOSHMUX_LIMITS_PAGES_PER_USER", "4"),
                (
                    "BOSHMUX_ALLOWED_ORIGINS",
                    "https://b.example, http://c.example:8080",
                ),
                ("BOSHMUX_TEST_PROSODY_BOSH", "ignored"),
                ("PATH", "/bin"),
            ]),
        )
        .unwrap();
        assert_eq!(cfg.listen.to_string(), "127.0.0.1:7000");
        assert_eq!(cfg.grace, Duration::from_secs(120));
        assert_eq!(cfg.limits.pages_per_user, 4);
        assert_eq!(
            cfg.bosh_url.as_deref(),
            Some("http://127.0.0.1:5280/http-bind")
        );
        assert_eq!(
            cfg.allowed_origins,
            ["https://b.example", "http://c.example:8080"]
        );
    }

    #[test]
    fn errors_name_the_key_and_source() {
        let file = write_file("grace = \"soon\"\n");
        let flags = Flags {
            config: Some(file.0.clone()),
            ..Flags::default()
        };
        let err = Config::load(&flags, env(&[])).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!(
                "{}: invalid value for `grace`: \"soon\"",
                file.0.display()
            )),
            "{err}"
        );

        let err = Config::load(
            &Flags::default(),
            env(&[("BOSHMUX_LIMITS_PAGES_PER_USER", "0")]),
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            err,
            "BOSHMUX_LIMITS_PAGES_PER_USER: invalid value for `limits.pages_per_user`: 0 is outside 1..=10000"
        );

        let flags = Flags {
            allow_origin: vec!["https://app.example/path".into()],
            ..Flags::default()
        };
        assert_eq!(
            Config::load(&flags, env(&[])).unwrap_err().to_string(),
            "--allow-origin: invalid value for `allowed_origins`: \"https://app.example/path\" is not an \
             exact origin (scheme://host[:port], no path); did you mean \"https://app.example\"?"
        );

        let file = write_file("[limits]\nstanza_bytes = [1]\n");
        let flags = Flags {
            config: Some(file.0.clone()),
            ..Flags::default()
        };
        assert_eq!(
            Config::load(&flags, env(&[])).unwrap_err().to_string(),
            format!(
                "{}: invalid value for `limits.stanza_bytes`: expected a string or number, found array",
                file.0.display()
            )
        );
        let flags = Flags {
            bosh_url: Some("ftp://x".into()),
            ..Flags::default()
        };
        assert_eq!(
            Config::load(&flags, env(&[])).unwrap_err().to_string(),
            "--bosh-url: invalid value for `bosh_url`: \"ftp://x\": scheme must be http or https"
        );
    }

    #[test]
    fn unknown_environment_variables_are_warnings_naming_the_closest_setting() {
        let (cfg, warnings) = Config::load_with_warnings(
            &Flags::default(),
            env(&[
                ("BOSHMUX_BIN", "/usr/local/bin/boshmux"),
                ("BOSHMUX_LISTN", "127.0.0.1:1"),
                ("BOSHMUX_LIMITS_PAGES_PER_USR", "3"),
                ("BOSHMUX_GRACE", "5s"),
            ]),
        )
        .unwrap();
        assert_eq!(
            cfg.grace,
            Duration::from_secs(5),
            "known variables still apply"
        );
        assert_eq!(cfg.listen, Config::default().listen);
        let shown: Vec<String> = warnings.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "environment variable BOSHMUX_BIN is not a boshmux setting; ignored",
                "environment variable BOSHMUX_LIMITS_PAGES_PER_USR is not a boshmux setting; \
                 ignored (did you mean BOSHMUX_LIMITS_PAGES_PER_USER?)",
                "environment variable BOSHMUX_LISTN is not a boshmux setting; ignored \
                 (did you mean BOSHMUX_LISTEN?)",
            ]
        );
        // An unknown key in the file is still an error; a bad value in a known variable too.
        let file = write_file("listn = \"127.0.0.1:1\"\n");
        let flags = Flags {
            config: Some(file.0.clone()),
            ..Flags::default()
        };
        assert_eq!(
            Config::load(&flags, env(&[])).unwrap_err().to_string(),
            format!("{}: unknown key `listn`", file.0.display())
        );
        assert!(Config::load(&Flags::default(), env(&[("BOSHMUX_GRACE", "soon")])).is_err());
    }

    #[test]
    fn every_suggested_key_is_a_setting() {
        for key in KEYS {
            let mut cfg = Config::default();
            let err = cfg.set("test", key, "");
            assert!(
                !matches!(err, Err(ConfigError::UnknownKey { .. })),
                "{key} is not taken by Config::set"
            );
        }
    }

    #[test]
    fn debug_hides_the_api_key() {
        let secret = "api-key-CANARY-0123456789";
        let cfg = Config::load(&Flags::default(), env(&[("BOSHMUX_API_KEY", secret)])).unwrap();
        let flags = Flags {
            api_key: Some(secret.into()),
            ..Flags::default()
        };
        for shown in [format!("{cfg:?}"), format!("{flags:?}")] {
            assert!(
                !shown.contains(secret) && shown.contains("<hidden>"),
                "{shown}"
            );
        }
    }

    #[test]
    fn relogin_url_and_login_timeout_from_every_source() {
        let file = write_file(
            "relogin_url = \"https://app.example/boshmux/relogin\"\nlogin_timeout = \"5s\"\n",
        );
        let flags = Flags {
            config: Some(file.0.clone()),
            ..Flags::default()
        };
        let cfg = Config::load(&flags, env(&[])).unwrap();
        assert_eq!(
            cfg.relogin_url.as_deref(),
            Some("https://app.example/boshmux/relogin")
        );
        assert_eq!(cfg.login_timeout, Duration::from_secs(5));
        let cfg = Config::load(
            &flags,
            env(&[
                ("BOSHMUX_RELOGIN_URL", "http://127.0.0.1:8000/relogin"),
                ("BOSHMUX_LOGIN_TIMEOUT", "750ms"),
            ]),
        )
        .unwrap();
        assert_eq!(
            cfg.relogin_url.as_deref(),
            Some("http://127.0.0.1:8000/relogin")
        );
        assert_eq!(cfg.login_timeout, Duration::from_millis(750));
        let flags = Flags {
            relogin_url: Some("http://10.0.0.1/r".into()),
            ..flags
        };
        let cfg = Config::load(&flags, env(&[])).unwrap();
        assert_eq!(cfg.relogin_url.as_deref(), Some("http://10.0.0.1/r"));
        assert_eq!(Config::default().relogin_url, None);

        let errors = [
            (
                Flags {
                    relogin_url: Some("ftp://app.example/r".into()),
                    ..Flags::default()
                },
                vec![],
                "--relogin-url: invalid value for `relogin_url`: \"ftp://app.example/r\": scheme must be http or https",
            ),
            (
                Flags::default(),
                vec![("BOSHMUX_RELOGIN_URL", "/relogin")],
                "BOSHMUX_RELOGIN_URL: invalid value for `relogin_url`: \"/relogin\": relative URL without a base",
            ),
            (
                Flags::default(),
                vec![("BOSHMUX_LOGIN_TIMEOUT", "0")],
                "BOSHMUX_LOGIN_TIMEOUT: invalid value for `login_timeout`: must be longer than zero",
            ),
        ];
        for (flags, vars, expected) in errors {
            let err = Config::load(&flags, env(&vars)).unwrap_err();
            assert_eq!(err.to_string(), expected);
        }
    }

    #[test]
    fn syntax_errors_and_missing_files() {
        let file = write_file("listen = \n");
        let flags = Flags {
            config: Some(file.0.clone()),
            ..Flags::default()
        };
        let err = Config::load(&flags, env(&[])).unwrap_err();
        assert!(matches!(err, ConfigError::Syntax { .. }), "{err}");
        let flags = Flags {
            config: Some("/nonexistent/boshmux.toml".into()),
            ..Flags::default()
        };
        assert!(
            Config::load(&flags, env(&[]))
                .unwrap_err()
                .to_string()
                .starts_with("cannot read config file /nonexistent/boshmux.toml:")
        );
    }

    #[test]
    fn connection_limits_and_trusted_proxies() {
        let file = write_file(
            "trusted_proxies = [\"127.0.0.1\", \"::1\"]\n[limits]\nheader_read_timeout = \"2s\"\n\
             http_idle_timeout = 5\nconnections_per_address = 10\nupgrade_rate_per_client = 3\n",
        );
        let flags = Flags {
            config: Some(file.0.clone()),
            ..Flags::default()
        };
        let cfg = Config::load(&flags, env(&[])).unwrap();
        assert_eq!(cfg.trusted_proxies.len(), 2);
        assert_eq!(cfg.limits.header_read_timeout, Duration::from_secs(2));
        assert_eq!(cfg.limits.http_idle_timeout, Duration::from_secs(5));
        assert_eq!(cfg.limits.connections_per_address, 10);
        assert_eq!(cfg.limits.upgrade_rate_per_client, 3);
        let cfg = Config::load(
            &flags,
            env(&[("BOSHMUX_TRUSTED_PROXIES", "10.0.0.1, 10.0.0.2")]),
        )
        .unwrap();
        assert_eq!(
            cfg.trusted_proxies,
            [
                "10.0.0.1".parse::<std::net::IpAddr>().unwrap(),
                "10.0.0.2".parse().unwrap()
            ]
        );
        let err = Config::load(
            &Flags::default(),
            env(&[("BOSHMUX_TRUSTED_PROXIES", "10.0.0.0/8")]),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "BOSHMUX_TRUSTED_PROXIES: invalid value for `trusted_proxies`: \"10.0.0.0/8\" is not an IP address"
        );
        let err = Config::load(
            &Flags::default(),
            env(&[("BOSHMUX_LIMITS_HEADER_READ_TIMEOUT", "0s")]),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "BOSHMUX_LIMITS_HEADER_READ_TIMEOUT: invalid value for `limits.header_read_timeout`: must be longer than zero"
        );
    }

    #[test]
    fn the_example_config_file_loads() {
        let flags = Flags {
            config: Some(
                concat!(env!("CARGO_MANIFEST_DIR"), "/contrib/boshmux.example.toml").into(),
            ),
            ..Flags::default()
        };
        let cfg = Config::load(&flags, env(&[("BOSHMUX_API_KEY", "0123456789abcdef0")])).unwrap();
        assert_eq!(cfg.xmpp_domain.as_deref(), Some("example.com"));
        assert_eq!(cfg.limits.iq_timeout, Duration::from_secs(30));
        assert_eq!(cfg.token_ttl, Duration::from_secs(24 * 3600));
        assert_eq!(cfg.login_timeout, Config::default().login_timeout);
        // The example documents the defaults.
        assert_eq!(cfg.limits, Limits::default());
        cfg.require_for_serve().unwrap();
    }

    #[test]
    fn serve_needs_an_api_key() {
        let cfg = Config::load(&Flags::default(), env(&[])).unwrap();
        assert_eq!(
            cfg.require_for_serve().unwrap_err().to_string(),
            "`api_key` is required to serve (config file, BOSHMUX_API_KEY or --api-key)"
        );
        let short =
            Config::load(&Flags::default(), env(&[("BOSHMUX_API_KEY", "short")])).unwrap_err();
        assert_eq!(
            short.to_string(),
            "BOSHMUX_API_KEY: invalid value for `api_key`: must be at least 16 characters"
        );
    }
}
