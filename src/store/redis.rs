//! The Redis store of SPEC §12 (one Redis ≥ 7 or Valkey node for now; leases between nodes come
//! later): every call is one round trip, and every session write is one Lua script that checks
//! the epoch and applies [`memory::change`](super::memory)'s rules atomically inside Redis, so
//! that a write racing a take-over by another process is either applied before it or refused
//! (RECOVERY.md: neither XMPP server fences a second writer; the store must).
//!
//! Key layout, under a prefix (`boshmux:` by default; a bare JID holds no `:`, `*`, `?` or `[`
//! in its node or domain that could matter here, as only the prefix is ever matched):
//! - `{p}session:{bare}` — hash: `epoch`, `meta`, `caches`, `handed_on` (decimal);
//! - `{p}requests:{bare}` — hash: rid (decimal) → exact request bytes, rids above `handed_on`;
//! - `{p}epoch:{bare}` — the last epoch `bare` had, kept after its session is removed, so that a
//!   re-created session's epoch is above any a fenced former owner could still write at;
//! - `{p}cred:{token|ticket}:{hex SHA-256}` — hash: `bare`, `expires_at`; Redis deletes it at
//!   `expires_at` (`EXPIREAT`);
//! - `{p}creds:{bare}` — set of `{kind}:{hex}`, the credentials of `bare`: a logout removes
//!   them in O(their number), where a `SCAN` of every credential would cost O(all users') on
//!   every logout. Members whose key expired are pruned when `bare` gets a new credential.
//!
//! Connection: [`RedisStore::open`] only parses the URL (`Store::open` is synchronous and may
//! run outside the runtime); the connection (redis-rs's `ConnectionManager`, which reconnects
//! after a loss) is made by the first call, the daemon's `load()` at start — a daemon that cannot
//! read the store at start stops there, since it could not take its sessions over. Later, a lost
//! Redis costs running sessions only the durability of their writes (SPEC §12). A call that cannot reach Redis within [`RESPONSE_TIMEOUT`] fails with
//! [`StoreError::Unavailable`]; the next call tries again.
//!
//! Not yet cluster-safe (Redis Cluster): `remove` and the credential scripts touch keys they
//! derive inside the script. One node is what SPEC §12 asks for.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, RedisError, Script};

mod membership;

pub use membership::{Located, Member, node_of};

use super::{
    Backend, Credential, CredentialKind, SessionRecord, Snapshot, StoreError, StoreFuture, Write,
    unix_now,
};

/// The key prefix of [`RedisStore::open`].
pub const DEFAULT_PREFIX: &str = "boshmux:";
/// How long one call waits for Redis's answer (and a connection attempt for the connection)
/// before it fails with [`StoreError::Unavailable`]: a write-ahead record is on the path of
/// every upstream request, which must not hang on a frozen Redis.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Keys read per round trip by [`Backend::load`].
const LOAD_BATCH: usize = 256;

/// Checks the epoch of `KEYS[1]` (session hash) against `ARGV[1]`; on success falls through to
/// the caller's code. Answers `fenced:N` (its epoch is N), `fenced` (no session, and the last
/// epoch, in the last key, is above the writer's: it was taken over and removed), or `lost`
/// (no session and no later epoch: the store lost its data — Redis restarted empty — and the
/// writer carries on; SPEC §12).
const CHECK_EPOCH: &str = r"
local cur = redis.call('HGET', KEYS[1], 'epoch')
if not cur then
  local last = redis.call('GET', KEYS[#KEYS])
  if last and tonumber(last) > tonumber(ARGV[1]) then return 'fenced' end
  return 'lost'
end
if tonumber(cur) ~= tonumber(ARGV[1]) then return 'fenced:' .. cur end
";

/// KEYS: session, requests, last epoch. ARGV: epoch, kind (`request` | `handed_on` | `caches` | `meta`),
/// rid / mark / restart_at (`''` for none), bytes, `'1'` when a `handed_on` carries caches.
/// The rules of `memory::change`, in its order: clear, drop through the mark, mark, insert,
/// meta, caches. Rids are compared as numbers (below 2^53, exact in Lua) but written as the
/// decimal strings given, never through Lua's number formatting.
const WRITE: &str = r"
local kind = ARGV[2]
local handed_on = redis.call('HGET', KEYS[1], 'handed_on')
if kind == 'request' then
  if tonumber(ARGV[3]) > tonumber(handed_on) then
    redis.call('HSET', KEYS[2], ARGV[3], ARGV[4])
  end
elseif kind == 'handed_on' then
  local mark = ARGV[3]
  if tonumber(handed_on) > tonumber(mark) then mark = handed_on end
  local through = tonumber(mark)
  for _, rid in ipairs(redis.call('HKEYS', KEYS[2])) do
    if tonumber(rid) <= through then redis.call('HDEL', KEYS[2], rid) end
  end
  redis.call('HSET', KEYS[1], 'handed_on', mark)
  if ARGV[5] == '1' then redis.call('HSET', KEYS[1], 'caches', ARGV[4]) end
elseif kind == 'caches' then
  redis.call('HSET', KEYS[1], 'caches', ARGV[4])
elseif kind == 'meta' then
  if ARGV[3] ~= '' then
    redis.call('DEL', KEYS[2])
    redis.call('HSET', KEYS[1], 'handed_on', ARGV[3])
  end
  redis.call('HSET', KEYS[1], 'meta', ARGV[4])
else
  return redis.error_reply('boshmux: unknown write ' .. kind)
end
return 'ok'
";

/// KEYS: session, requests, last epoch. ARGV: meta, handed_on, then [`OWN`]'s. Replaces any
/// record; the epoch is one above the last `bare` had (and above the record's, should the
/// last-epoch key be lost).
const CREATE: &str = r"
local epoch = redis.call('INCR', KEYS[3])
local cur = tonumber(redis.call('HGET', KEYS[1], 'epoch'))
if cur and epoch <= cur then
  epoch = cur + 1
  redis.call('SET', KEYS[3], string.format('%d', epoch))
end
local before = redis.call('HGET', KEYS[1], 'owner')
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('HSET', KEYS[1], 'epoch', string.format('%d', epoch), 'meta', ARGV[1],
  'caches', '', 'handed_on', ARGV[2])
own(before, ARGV[3], ARGV[4], ARGV[5])
return 'epoch:' .. string.format('%d', epoch)
";

/// Ownership bookkeeping of the cluster (SPEC §12), prepended to the scripts that change a
/// session's owner: `own(before, member, prefix, bare)` records `member` (`''`: none, a store of
/// one process) as the owner of `bare`, in the session hash (`KEYS[1]`) and the members' sets of
/// owned sessions, and drops a pending claim.
const OWN: &str = r"
local function own(before, member, prefix, bare)
  if before and before ~= member then redis.call('SREM', prefix .. 'owned:' .. before, bare) end
  redis.call('DEL', prefix .. 'claim:' .. bare)
  if member == '' then
    redis.call('HDEL', KEYS[1], 'owner')
    return
  end
  redis.call('HSET', KEYS[1], 'owner', member)
  redis.call('SADD', prefix .. 'owned:' .. member, bare)
  redis.call('SADD', prefix .. 'members', member)
end
";

/// KEYS: session, requests, last epoch. ARGV: epoch, then [`OWN`]'s. The new epoch, after which
/// writes at the old one are refused; the taker is the owner.
const TAKE_OVER: &str = r"
local epoch = redis.call('INCR', KEYS[3])
if epoch <= tonumber(cur) then
  epoch = tonumber(cur) + 1
  redis.call('SET', KEYS[3], string.format('%d', epoch))
end
redis.call('HSET', KEYS[1], 'epoch', string.format('%d', epoch))
own(redis.call('HGET', KEYS[1], 'owner'), ARGV[2], ARGV[3], ARGV[4])
return 'epoch:' .. string.format('%d', epoch)
";

/// KEYS: session, requests, credential index, last epoch. ARGV: epoch, credential key prefix,
/// key prefix, bare. The last epoch stays, one above the removed record's: a late write at the
/// removed epoch is refused as fenced, not taken for a store that lost its data.
const REMOVE: &str = r"
redis.call('SET', KEYS[4], string.format('%d', tonumber(ARGV[1]) + 1))
for _, m in ipairs(redis.call('SMEMBERS', KEYS[3])) do
  redis.call('DEL', ARGV[2] .. m)
end
local owner = redis.call('HGET', KEYS[1], 'owner')
if owner then redis.call('SREM', ARGV[3] .. 'owned:' .. owner, ARGV[4]) end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
return 'ok'
";

/// KEYS: credential, index of its bare JID. ARGV: bare, expires_at, index member, credential
/// key prefix, index key prefix.
const PUT_CREDENTIAL: &str = r"
local before = redis.call('HGET', KEYS[1], 'bare')
if before and before ~= ARGV[1] then
  redis.call('SREM', ARGV[5] .. before, ARGV[3])
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'bare', ARGV[1], 'expires_at', ARGV[2])
redis.call('EXPIREAT', KEYS[1], ARGV[2])
for _, m in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  if redis.call('EXISTS', ARGV[4] .. m) == 0 then redis.call('SREM', KEYS[2], m) end
end
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('SADD', KEYS[2], ARGV[3]) end
return 'ok'
";

/// KEYS: credential. ARGV: index member, index key prefix.
const REMOVE_CREDENTIAL: &str = r"
local bare = redis.call('HGET', KEYS[1], 'bare')
redis.call('DEL', KEYS[1])
if bare then redis.call('SREM', ARGV[2] .. bare, ARGV[1]) end
return 'ok'
";

/// The scripts, each loaded once per Redis (`EVALSHA`, `SCRIPT LOAD` again after a restart:
/// redis-rs does both).
struct Scripts {
    write: Script,
    create: Script,
    take_over: Script,
    remove: Script,
    put_credential: Script,
    remove_credential: Script,
}

impl Scripts {
    fn new() -> Scripts {
        let fenced = |body: &str| Script::new(&format!("{CHECK_EPOCH}{body}"));
        Scripts {
            write: fenced(WRITE),
            create: Script::new(&format!("{OWN}{CREATE}")),
            take_over: Script::new(&format!("{OWN}{CHECK_EPOCH}{TAKE_OVER}")),
            remove: fenced(REMOVE),
            put_credential: Script::new(PUT_CREDENTIAL),
            remove_credential: Script::new(REMOVE_CREDENTIAL),
        }
    }
}

/// See the module documentation. Cheap to share: calls from many sessions are pipelined on one
/// multiplexed connection.
pub struct RedisStore {
    client: Client,
    /// Made on the first call (inside the runtime), then cloned per call.
    manager: Mutex<Option<ConnectionManager>>,
    scripts: std::sync::Arc<Scripts>,
    prefix: std::sync::Arc<str>,
    /// The URL without its password, for messages.
    location: String,
    /// The cluster member this process writes as (SPEC §12): recorded as the owner of the
    /// sessions it creates or takes over. `None` until the node registers.
    member: std::sync::Arc<Mutex<Option<std::sync::Arc<str>>>>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("location", &self.location)
            .field("prefix", &self.prefix)
            .finish()
    }
}

/// `url` without its password (a Redis URL may carry one): what messages may show.
pub(super) fn redacted(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            let _ = u.set_password(None);
            u.to_string()
        }
        Err(_) => "redis://…".to_owned(),
    }
}

/// What a script answered.
enum Answer {
    Ok,
    Epoch(u64),
    Fenced(Option<u64>),
}

fn answer(s: &str) -> Result<Answer, StoreError> {
    let bad = || StoreError::Unavailable(format!("unexpected answer from Redis: {s:?}"));
    match s.split_once(':') {
        None if s == "ok" => Ok(Answer::Ok),
        None if s == "fenced" => Ok(Answer::Fenced(None)),
        None if s == "lost" => Err(StoreError::Unavailable(
            "the session's record is gone from Redis (restarted empty?)".into(),
        )),
        Some(("fenced", n)) => Ok(Answer::Fenced(Some(n.parse().map_err(|_| bad())?))),
        Some(("epoch", n)) => Ok(Answer::Epoch(n.parse().map_err(|_| bad())?)),
        _ => Err(bad()),
    }
}

fn unavailable(e: &RedisError) -> StoreError {
    StoreError::Unavailable(format!("Redis: {e}"))
}

fn kind_name(kind: CredentialKind) -> &'static str {
    match kind {
        CredentialKind::Token => "token",
        CredentialKind::Ticket => "ticket",
    }
}

fn hex(hash: &[u8; 32]) -> String {
    use std::fmt::Write as _;
    hash.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn unhex(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// The keys of one store (one prefix).
#[derive(Clone)]
struct Keys(std::sync::Arc<str>);

impl Keys {
    fn session(&self, bare: &str) -> String {
        format!("{}session:{bare}", self.0)
    }
    fn requests(&self, bare: &str) -> String {
        format!("{}requests:{bare}", self.0)
    }
    fn epoch(&self, bare: &str) -> String {
        format!("{}epoch:{bare}", self.0)
    }
    fn cred_prefix(&self) -> String {
        format!("{}cred:", self.0)
    }
    fn index_prefix(&self) -> String {
        format!("{}creds:", self.0)
    }
    fn cred(&self, kind: CredentialKind, hash: &[u8; 32]) -> String {
        format!("{}cred:{}", self.0, member(kind, hash))
    }
    fn index(&self, bare: &str) -> String {
        format!("{}creds:{bare}", self.0)
    }
}

/// A credential's name in its bare JID's index (and, after the prefix, its key).
fn member(kind: CredentialKind, hash: &[u8; 32]) -> String {
    format!("{}:{}", kind_name(kind), hex(hash))
}

impl RedisStore {
    /// The store at `url` (`redis://[:password@]host:port/db` or `rediss://…`) with keys under
    /// [`DEFAULT_PREFIX`]. Parses the URL only; the connection is made by the first call.
    ///
    /// # Errors
    /// [`StoreError::Open`] naming the URL without its password: the URL is not one redis-rs
    /// reads.
    pub fn open(url: &str) -> Result<RedisStore, StoreError> {
        RedisStore::with_prefix(url, DEFAULT_PREFIX)
    }

    /// Like [`RedisStore::open`], every key under `prefix` (tests give each store its own; it
    /// must hold no glob character, `*?[\`, as it is matched by `SCAN`).
    ///
    /// # Errors
    /// As [`RedisStore::open`]; also a `prefix` with a glob character.
    pub fn with_prefix(url: &str, prefix: &str) -> Result<RedisStore, StoreError> {
        let location = redacted(url);
        let fail = |message: String| StoreError::Open {
            location: location.clone(),
            message,
        };
        if prefix.contains(['*', '?', '[', ']', '\\']) {
            return Err(fail(format!(
                "key prefix {prefix:?} holds a glob character"
            )));
        }
        // `rediss://` builds its TLS configuration with the process's rustls provider (ring, as
        // for the upstream HTTPS client).
        crate::bosh::transport::install_crypto_provider();
        let client = Client::open(url).map_err(|e| fail(e.to_string()))?;
        Ok(RedisStore {
            client,
            manager: Mutex::new(None),
            scripts: std::sync::Arc::new(Scripts::new()),
            prefix: std::sync::Arc::from(prefix),
            location,
            member: Default::default(),
        })
    }

    /// The connection, made on first use (no I/O here: the manager connects on its first
    /// request and reconnects after a loss).
    fn connection(&self) -> Result<ConnectionManager, StoreError> {
        let mut slot = self.manager.lock();
        if let Some(m) = &*slot {
            return Ok(m.clone());
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(RESPONSE_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            // Reconnecting is retried on the next call, not in a long loop behind this one.
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let m = self
            .client
            .get_connection_manager_lazy(config)
            .map_err(|e| unavailable(&e))?;
        *slot = Some(m.clone());
        Ok(m)
    }

    fn keys(&self) -> Keys {
        Keys(self.prefix.clone())
    }

    /// The arguments of [`OWN`]: this process's member (or `''`), the prefix, `bare`.
    fn own_args(&self, bare: &str) -> [Vec<u8>; 3] {
        let member = self
            .member
            .lock()
            .as_deref()
            .unwrap_or_default()
            .as_bytes()
            .to_vec();
        [
            member,
            self.prefix.as_bytes().to_vec(),
            bare.as_bytes().to_vec(),
        ]
    }

    /// Runs `script` (chosen from [`Scripts`]) with `keys` and `args`; its answer.
    fn run(
        &self,
        pick: fn(&Scripts) -> &Script,
        keys: Vec<String>,
        args: Vec<Vec<u8>>,
    ) -> StoreFuture<Answer> {
        let conn = self.connection();
        let scripts = self.scripts.clone();
        Box::pin(async move {
            let mut conn = conn?;
            let script = pick(&scripts);
            let mut call = script.prepare_invoke();
            for k in &keys {
                call.key(k);
            }
            for a in &args {
                call.arg(&a[..]);
            }
            let s: String = call
                .invoke_async(&mut conn)
                .await
                .map_err(|e| unavailable(&e))?;
            answer(&s)
        })
    }
}

fn epoch_of(a: Answer) -> Result<u64, StoreError> {
    match a {
        Answer::Epoch(e) => Ok(e),
        Answer::Fenced(current) => Err(StoreError::Fenced { current }),
        Answer::Ok => Err(StoreError::Unavailable(
            "Redis answered without an epoch".into(),
        )),
    }
}

fn done(a: Answer) -> Result<(), StoreError> {
    match a {
        Answer::Ok => Ok(()),
        Answer::Fenced(current) => Err(StoreError::Fenced { current }),
        Answer::Epoch(_) => Err(StoreError::Unavailable(
            "Redis answered an epoch to a write".into(),
        )),
    }
}

fn num(n: u64) -> Vec<u8> {
    n.to_string().into_bytes()
}

/// Every key matching `pattern`, by `SCAN` (never `KEYS`, which blocks Redis).
async fn scan(conn: &mut ConnectionManager, pattern: &str) -> Result<Vec<String>, RedisError> {
    let mut cursor = 0u64;
    let mut out = Vec::new();
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await?;
        out.extend(batch);
        if next == 0 {
            // SCAN may return a key twice.
            out.sort_unstable();
            out.dedup();
            return Ok(out);
        }
        cursor = next;
    }
}

type Fields = HashMap<String, Vec<u8>>;

fn field_u64(f: &Fields, name: &str) -> Option<u64> {
    std::str::from_utf8(f.get(name)?).ok()?.parse().ok()
}

/// A session's record from its hash `s` and its requests hash `r`.
fn record(bare: String, epoch: u64, handed_on: u64, s: &Fields, r: &Fields) -> SessionRecord {
    let mut requests: Vec<(u64, Bytes)> = r
        .iter()
        .filter_map(|(rid, bytes)| Some((rid.parse().ok()?, Bytes::from(bytes.clone()))))
        .filter(|(rid, _)| *rid > handed_on)
        .collect();
    requests.sort_unstable_by_key(|(rid, _)| *rid);
    let bytes = |name: &str| Bytes::from(s.get(name).cloned().unwrap_or_default());
    SessionRecord {
        bare,
        epoch,
        meta: bytes("meta"),
        caches: bytes("caches"),
        handed_on,
        requests,
    }
}

/// Reads every session and credential: keys by `SCAN`, then each batch of records in one
/// `MULTI` (a session's hash and its requests are read together, never half a write apart).
async fn load(mut conn: ConnectionManager, keys: Keys) -> Result<Snapshot, RedisError> {
    let session_prefix = keys.session("");
    let mut sessions = Vec::new();
    let bares: Vec<String> = scan(&mut conn, &format!("{session_prefix}*"))
        .await?
        .into_iter()
        .filter_map(|k| k.strip_prefix(&session_prefix).map(str::to_owned))
        .collect();
    for chunk in bares.chunks(LOAD_BATCH) {
        let mut pipe = redis::pipe();
        pipe.atomic();
        for bare in chunk {
            pipe.hgetall(keys.session(bare))
                .hgetall(keys.requests(bare));
        }
        let replies: Vec<Fields> = pipe.query_async(&mut conn).await?;
        for (bare, pair) in chunk.iter().zip(replies.chunks(2)) {
            let [s, r] = pair else { continue };
            // Removed between the scan and the read.
            if s.is_empty() {
                continue;
            }
            let (Some(epoch), Some(handed_on)) = (field_u64(s, "epoch"), field_u64(s, "handed_on"))
            else {
                tracing::warn!("store: the Redis record of {bare} is damaged; left out");
                continue;
            };
            sessions.push(record(bare.clone(), epoch, handed_on, s, r));
        }
    }

    let cred_prefix = keys.cred_prefix();
    let names = scan(&mut conn, &format!("{cred_prefix}*")).await?;
    let now = unix_now();
    let mut credentials = Vec::new();
    for chunk in names.chunks(LOAD_BATCH) {
        let mut pipe = redis::pipe();
        for name in chunk {
            pipe.hgetall(name);
        }
        let replies: Vec<Fields> = pipe.query_async(&mut conn).await?;
        for (name, f) in chunk.iter().zip(&replies) {
            let parsed = name
                .strip_prefix(&cred_prefix)
                .and_then(|rest| rest.split_once(':'))
                .and_then(|(kind, h)| {
                    let kind = match kind {
                        "token" => CredentialKind::Token,
                        "ticket" => CredentialKind::Ticket,
                        _ => return None,
                    };
                    Some((kind, unhex(h)?))
                });
            let bare = f
                .get("bare")
                .and_then(|b| String::from_utf8(b.clone()).ok());
            let (Some((kind, hash)), Some(bare), Some(expires_at)) =
                (parsed, bare, field_u64(f, "expires_at"))
            else {
                continue; // expired between the scan and the read, or not ours
            };
            if expires_at > now {
                credentials.push(Credential {
                    kind,
                    hash,
                    bare,
                    expires_at,
                });
            }
        }
    }
    Ok(Snapshot {
        sessions,
        credentials,
    })
}

impl Backend for RedisStore {
    fn load(&self) -> StoreFuture<Snapshot> {
        let conn = self.connection();
        let keys = self.keys();
        Box::pin(async move { load(conn?, keys).await.map_err(|e| unavailable(&e)) })
    }

    fn create(&self, bare: &str, meta: Bytes, handed_on: u64) -> StoreFuture<u64> {
        let k = self.keys();
        let keys = vec![k.session(bare), k.requests(bare), k.epoch(bare)];
        let mut args = vec![meta.to_vec(), num(handed_on)];
        args.extend(self.own_args(bare));
        let run = self.run(|s| &s.create, keys, args);
        Box::pin(async move { epoch_of(run.await?) })
    }

    fn take_over(&self, bare: &str, epoch: u64) -> StoreFuture<u64> {
        let k = self.keys();
        let keys = vec![k.session(bare), k.requests(bare), k.epoch(bare)];
        let mut args = vec![num(epoch)];
        args.extend(self.own_args(bare));
        let run = self.run(|s| &s.take_over, keys, args);
        Box::pin(async move { epoch_of(run.await?) })
    }

    fn write(&self, bare: &str, epoch: u64, write: Write) -> StoreFuture<()> {
        let k = self.keys();
        let keys = vec![k.session(bare), k.requests(bare), k.epoch(bare)];
        let (kind, n, bytes, flag): (&str, Option<u64>, Bytes, bool) = match write {
            Write::Request { rid, bytes } => ("request", Some(rid), bytes, false),
            Write::HandedOn { rid, caches } => {
                let flag = caches.is_some();
                ("handed_on", Some(rid), caches.unwrap_or_default(), flag)
            }
            Write::Caches(c) => ("caches", None, c, false),
            Write::Meta { meta, restart_at } => ("meta", restart_at, meta, false),
        };
        let args = vec![
            num(epoch),
            kind.as_bytes().to_vec(),
            n.map(num).unwrap_or_default(),
            bytes.to_vec(),
            if flag { b"1".to_vec() } else { Vec::new() },
        ];
        let run = self.run(|s| &s.write, keys, args);
        Box::pin(async move { done(run.await?) })
    }

    fn remove(&self, bare: &str, epoch: u64) -> StoreFuture<()> {
        let k = self.keys();
        let keys = vec![
            k.session(bare),
            k.requests(bare),
            k.index(bare),
            k.epoch(bare),
        ];
        let args = vec![
            num(epoch),
            k.cred_prefix().into_bytes(),
            self.prefix.as_bytes().to_vec(),
            bare.as_bytes().to_vec(),
        ];
        let run = self.run(|s| &s.remove, keys, args);
        Box::pin(async move { done(run.await?) })
    }

    fn put_credential(&self, c: Credential) -> StoreFuture<()> {
        let k = self.keys();
        let keys = vec![k.cred(c.kind, &c.hash), k.index(&c.bare)];
        let args = vec![
            c.bare.into_bytes(),
            num(c.expires_at),
            member(c.kind, &c.hash).into_bytes(),
            k.cred_prefix().into_bytes(),
            k.index_prefix().into_bytes(),
        ];
        let run = self.run(|s| &s.put_credential, keys, args);
        Box::pin(async move { done(run.await?) })
    }

    fn remove_credential(&self, kind: CredentialKind, hash: [u8; 32]) -> StoreFuture<()> {
        let k = self.keys();
        let keys = vec![k.cred(kind, &hash)];
        let args = vec![
            member(kind, &hash).into_bytes(),
            k.index_prefix().into_bytes(),
        ];
        let run = self.run(|s| &s.remove_credential, keys, args);
        Box::pin(async move { done(run.await?) })
    }

    fn find_credential(
        &self,
        kind: CredentialKind,
        hash: [u8; 32],
        take: bool,
    ) -> StoreFuture<Option<Credential>> {
        /// KEYS: credential. ARGV: `take` flag, index member, index key prefix. `{bare,
        /// expires_at}` or nothing; removed with `take`.
        const FIND: &str = r"
local bare = redis.call('HGET', KEYS[1], 'bare')
if not bare then return {} end
local at = redis.call('HGET', KEYS[1], 'expires_at')
if ARGV[1] == '1' then
  redis.call('DEL', KEYS[1])
  redis.call('SREM', ARGV[3] .. bare, ARGV[2])
end
return {bare, at}
";
        let k = self.keys();
        let keys = vec![k.cred(kind, &hash)];
        let args = vec![
            if take { b"1".to_vec() } else { b"0".to_vec() },
            member(kind, &hash).into_bytes(),
            k.index_prefix().into_bytes(),
        ];
        let call = self.eval::<Vec<String>>(FIND, keys, args);
        Box::pin(async move {
            let found = call.await?;
            let [bare, at] = found.as_slice() else {
                return Ok(None);
            };
            let expires_at: u64 = at.parse().unwrap_or(0);
            Ok((expires_at > unix_now()).then(|| Credential {
                kind,
                hash,
                bare: bare.clone(),
                expires_at,
            }))
        })
    }

    fn restore(
        &self,
        bare: &str,
        epoch: u64,
        meta: Bytes,
        caches: Bytes,
        handed_on: u64,
    ) -> StoreFuture<()> {
        /// KEYS: session, requests, last epoch. ARGV: [`OWN`]'s, epoch, meta, caches, handed_on.
        const RESTORE: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 'ok' end
local last = tonumber(redis.call('GET', KEYS[3]) or '0')
if last < tonumber(ARGV[4]) then redis.call('SET', KEYS[3], ARGV[4]) end
redis.call('HSET', KEYS[1], 'epoch', ARGV[4], 'meta', ARGV[5], 'caches', ARGV[6],
  'handed_on', ARGV[7])
own(nil, ARGV[1], ARGV[2], ARGV[3])
return 'ok'
";
        let k = self.keys();
        let keys = vec![k.session(bare), k.requests(bare), k.epoch(bare)];
        let mut args: Vec<Vec<u8>> = self.own_args(bare).into();
        args.extend([num(epoch), meta.to_vec(), caches.to_vec(), num(handed_on)]);
        static SCRIPT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        let script = SCRIPT.get_or_init(|| format!("{OWN}{RESTORE}"));
        let call = self.eval::<String>(script, keys, args);
        Box::pin(async move { call.await.map(|_| ()) })
    }

    fn confirm(&self, bare: &str, epoch: u64) -> StoreFuture<()> {
        self.confirm_epoch(bare, epoch)
    }

    fn durable(&self) -> bool {
        true
    }
}

/// Makes [`RedisStore::connection`]'s lazily built manager usable by tests that need to
/// reach Redis directly.
#[cfg(test)]
impl RedisStore {
    async fn raw(&self) -> ConnectionManager {
        let mut c = self.connection().unwrap();
        let _: () = redis::AsyncCommands::set(&mut c, format!("{}ping", self.prefix), 1)
            .await
            .unwrap();
        c
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;
    use redis::AsyncCommands as _;

    use super::super::{Store, StoreError, Write};
    use super::RedisStore;

    /// The test Redis (scripts/redis.sh). Panics when the run was not started by scripts/test:
    /// a server test never passes by skipping.
    fn url() -> String {
        std::env::var("BOSHMUX_TEST_REDIS_URL").unwrap_or_else(|_| {
            panic!(
                "BOSHMUX_TEST_REDIS_URL is not set: tests that need Redis run through \
                 scripts/test (or `source scripts/redis.sh; redis_start`)"
            )
        })
    }

    /// A store on the test Redis with keys of its own, and the backend behind it.
    fn fresh() -> (Store, std::sync::Arc<RedisStore>, String) {
        let prefix = format!("boshmux-test-{}:", uuid::Uuid::new_v4().simple());
        let backend = std::sync::Arc::new(RedisStore::with_prefix(&url(), &prefix).unwrap());
        (
            Store {
                backend: backend.clone(),
                shared: Some(backend.clone()),
            },
            backend,
            prefix,
        )
    }

    /// A second process's view of the same keys.
    fn other(prefix: &str) -> Store {
        Store::new(RedisStore::with_prefix(&url(), prefix).unwrap())
    }

    fn b(s: &str) -> Bytes {
        Bytes::from(s.to_owned())
    }

    #[tokio::test]
    async fn redis_store_follows_the_store_rules() {
        let (store, _, _) = fresh();
        assert!(store.durable());
        super::super::conformance::run(&store).await;
    }

    #[tokio::test]
    async fn redis_store_keeps_credentials_and_epochs_with_redis_expiry() {
        let (store, backend, prefix) = fresh();
        let mut raw = backend.raw().await;
        let s = store.create("a@x", b("m"), 0).await.unwrap();
        let expires_at = super::unix_now() + 600;
        store
            .put_credential(super::Credential {
                kind: super::CredentialKind::Token,
                hash: [0xab; 32],
                bare: "a@x".into(),
                expires_at,
            })
            .await
            .unwrap();
        let key = format!("{prefix}cred:token:{}", "ab".repeat(32));
        let at: i64 = redis::cmd("EXPIRETIME")
            .arg(&key)
            .query_async(&mut raw)
            .await
            .unwrap();
        assert_eq!(at, i64::try_from(expires_at).unwrap(), "Redis expires it");
        let index: Vec<String> = raw.smembers(format!("{prefix}creds:a@x")).await.unwrap();
        assert_eq!(index, [format!("token:{}", "ab".repeat(32))]);
        s.remove().await.unwrap();
        let left: Vec<String> = super::scan(&mut raw, &format!("{prefix}*")).await.unwrap();
        assert_eq!(
            left,
            [format!("{prefix}epoch:a@x"), format!("{prefix}ping")],
            "only the last epoch outlives the session"
        );
    }

    #[tokio::test]
    async fn a_take_over_by_another_process_fences_this_ones_writes() {
        let (mine, _, prefix) = fresh();
        let theirs = other(&prefix);
        let s = mine.create("a@x", b("m"), 10).await.unwrap();
        s.request(11, b("r11")).await.unwrap();
        let record = theirs.load().await.unwrap().sessions.remove(0);
        assert_eq!(record.requests, vec![(11, b("r11"))]);
        let t = theirs.take_over(&record).await.unwrap();
        for w in [
            Write::Request {
                rid: 12,
                bytes: b("late"),
            },
            Write::HandedOn {
                rid: 11,
                caches: Some(b("late")),
            },
            Write::Caches(b("late")),
            Write::Meta {
                meta: b("late"),
                restart_at: Some(99),
            },
        ] {
            assert_eq!(
                s.write(w).await,
                Err(StoreError::Fenced {
                    current: Some(t.epoch())
                })
            );
        }
        assert!(matches!(s.remove().await, Err(StoreError::Fenced { .. })));
        let r = &mine.load().await.unwrap().sessions[0];
        assert_eq!(
            (r.epoch, r.meta.clone(), r.caches.clone(), r.handed_on),
            (t.epoch(), b("m"), Bytes::new(), 10),
            "nothing of the fenced writer's got in"
        );
        assert_eq!(r.requests, vec![(11, b("r11"))]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_racing_a_take_over_lands_before_it_or_not_at_all() {
        let (mine, _, prefix) = fresh();
        let theirs = other(&prefix);
        for round in 0..50u64 {
            let bare = format!("u{round}@x");
            let s = mine.create(&bare, b("m"), 0).await.unwrap();
            let record = theirs
                .load()
                .await
                .unwrap()
                .sessions
                .into_iter()
                .find(|r| r.bare == bare)
                .unwrap();
            // The old owner writes rids 1.. while the other process takes over; the new owner
            // then writes its own record. The old owner's accepted writes must be a prefix of
            // its attempts, all visible to the new owner, and none after the take-over.
            let writer = tokio::spawn(async move {
                let mut accepted = Vec::new();
                for rid in 1..=20u64 {
                    match s.request(rid, Bytes::from(format!("old {rid}"))).await {
                        Ok(()) => accepted.push(rid),
                        Err(StoreError::Fenced { .. }) => break,
                        Err(e) => panic!("{e}"),
                    }
                }
                accepted
            });
            let t = theirs.take_over(&record).await.unwrap();
            let seen: Vec<u64> = theirs
                .load()
                .await
                .unwrap()
                .sessions
                .into_iter()
                .find(|r| r.bare == bare)
                .unwrap()
                .requests
                .iter()
                .map(|(rid, _)| *rid)
                .collect();
            t.request(100, b("new")).await.unwrap();
            let accepted = writer.await.unwrap();
            let after: Vec<u64> = mine
                .load()
                .await
                .unwrap()
                .sessions
                .into_iter()
                .find(|r| r.bare == bare)
                .unwrap()
                .requests
                .iter()
                .map(|(rid, _)| *rid)
                .collect();
            let mut want = accepted.clone();
            want.push(100);
            assert_eq!(
                after, want,
                "round {round}: nothing landed after the take-over"
            );
            assert!(
                seen.iter().all(|rid| accepted.contains(rid)),
                "round {round}: {seen:?} ⊆ {accepted:?}"
            );
            assert_eq!(
                seen, accepted,
                "round {round}: what the new owner read right after taking over is all there is"
            );
        }
    }

    /// Retries `f` until it succeeds, for at most 10 s (a reconnection is not an event this
    /// side can await).
    async fn until_ok<T, F, Fut>(mut f: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match f().await {
                Ok(v) => return v,
                Err(StoreError::Unavailable(_)) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("Redis did not come back: {e}"),
            }
        }
    }

    #[tokio::test]
    async fn a_killed_connection_and_flushed_scripts_are_unavailable_then_writes_work_again() {
        let (store, backend, _) = fresh();
        let s = store.create("a@x", b("m"), 0).await.unwrap();
        s.request(1, b("r1")).await.unwrap();
        // Another client kills this store's connection (by its name would need CLIENT SETNAME;
        // every client but the killer is this test's, and its own keys make the rest harmless).
        let mut killer = redis::Client::open(url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let id: i64 = redis::cmd("CLIENT")
            .arg("ID")
            .query_async(&mut backend.connection().unwrap())
            .await
            .unwrap();
        let killed: i64 = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("ID")
            .arg(id)
            .query_async(&mut killer)
            .await
            .unwrap();
        assert_eq!(killed, 1);
        // As after a Redis restart, the scripts are gone too: they are loaded again.
        let _: () = redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async(&mut killer)
            .await
            .unwrap();
        // The first write finds the connection dead (`Unavailable`), unless the client noticed
        // the close and reconnected first: either is right, nothing else is.
        let first = s.request(2, b("r2")).await;
        assert!(
            matches!(first, Ok(()) | Err(StoreError::Unavailable(_))),
            "{first:?}"
        );
        until_ok(|| s.request(3, b("r3"))).await;
        let r = &store.load().await.unwrap().sessions[0];
        let rids: Vec<u64> = r.requests.iter().map(|(rid, _)| *rid).collect();
        assert!(rids.starts_with(&[1]) && rids.ends_with(&[3]), "{rids:?}");
    }

    /// A Redis of this test's own (the binary scripts/redis.sh installed), with its append-only
    /// file in `dir`, on `port`.
    fn own_redis(dir: &std::path::Path, port: u16) -> tokio::process::Child {
        tokio::process::Command::new("redis-server")
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--save",
                "",
            ])
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            .arg("--dir")
            .arg(dir)
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server runs (scripts/redis.sh installs it)")
    }

    #[tokio::test]
    async fn a_restarted_redis_is_unavailable_meanwhile_then_writes_work_again() {
        url(); // run only where the test Redis (and so redis-server) is
        let dir = std::env::temp_dir().join(format!("boshmux-redis-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut server = own_redis(&dir, port);
        let store = Store::open(&format!("redis://127.0.0.1:{port}/0")).unwrap();
        let s = until_ok(|| store.create("a@x", b("m"), 0)).await;
        s.request(1, b("r1")).await.unwrap();

        server.kill().await.unwrap();
        assert!(matches!(
            s.request(2, b("r2")).await,
            Err(StoreError::Unavailable(_))
        ));
        assert!(matches!(
            s.request(2, b("r2")).await,
            Err(StoreError::Unavailable(_))
        ));

        let mut server = own_redis(&dir, port);
        until_ok(|| s.request(3, b("r3"))).await;
        let r = &store.load().await.unwrap().sessions[0];
        assert_eq!(r.epoch, s.epoch(), "the epoch survived the restart");
        assert_eq!(r.requests, vec![(1, b("r1")), (3, b("r3"))]);
        server.kill().await.unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn an_unreachable_redis_is_unavailable_not_fatal() {
        // A port nothing listens on: connection refused at once.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let store = Store::new(RedisStore::open(&format!("redis://127.0.0.1:{port}/0")).unwrap());
        assert!(matches!(
            store.create("a@x", b("m"), 0).await,
            Err(StoreError::Unavailable(_))
        ));
        assert!(matches!(
            store.load().await,
            Err(StoreError::Unavailable(_))
        ));
    }

    #[tokio::test]
    async fn a_rediss_url_opens_and_its_tls_needs_no_other_setup() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let store = Store::open(&format!("rediss://localhost:{port}/0")).unwrap();
        assert!(matches!(
            store.create("a@x", b("m"), 0).await,
            Err(StoreError::Unavailable(_))
        ));
    }

    #[test]
    fn a_bad_url_is_refused_without_its_password() {
        let err = Store::open("redis://:hunter2@cache:notaport/0").unwrap_err();
        let StoreError::Open { location, .. } = &err else {
            panic!("{err:?}")
        };
        assert!(!location.contains("hunter2"), "{location}");
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }
}
