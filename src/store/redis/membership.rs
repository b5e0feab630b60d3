//! Cluster membership and session ownership on Redis (SPEC §12): what the nodes of a cluster
//! share beside the session records.
//!
//! Keys, under the store's prefix:
//! - `{p}member:{member}` — the member's base URL, set with a time to live (the node's lease);
//!   a member is alive while its key exists. A member is `{node_id}#{incarnation}`: a node that
//!   lost its lease comes back as a new member, so that what it owned before stays orphaned and
//!   is adopted (possibly by itself) through the one path that bumps epochs;
//! - `{p}members` — set of every member that owned a session, pruned when a dead member owns none;
//! - `{p}owned:{member}` — set of the bare JIDs a member owns (kept by the store's scripts, so
//!   that finding a dead node's sessions costs what it owned, not a scan of every session);
//! - `{p}claim:{bare}` — the member logging `bare` in, until its record exists: a second node
//!   asked for the same user meanwhile sends the request to the claimant instead of logging in
//!   a second time.
//!
//! A session's lease is its owner member's key: one renewal per node keeps every session it
//! drives, where a key per session would cost a write per session per renewal. Fencing stays per
//! session: every write names the session's epoch, which a new owner changes.

use std::time::Duration;

use redis::Script;

use super::{RedisStore, SessionRecord, StoreError, field_u64, unavailable};
use crate::store::StoreFuture;

/// KEYS: member. ARGV: url, lease (ms), members set key. Registers (or renews, with `XX` as the
/// 4th argument) a member.
const BEAT: &str = r"
local set
if ARGV[4] == 'XX' then
  set = redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2], 'XX')
else
  set = redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  redis.call('SADD', ARGV[3], string.sub(KEYS[1], string.len(ARGV[5]) + 1))
end
if set then return 'ok' end
return 'lost'
";

/// KEYS: session, claim. ARGV: member, claim time to live (ms), prefix. Where `bare`'s session
/// is driven: `{'mine'}`, `{'remote', member, url}`, `{'orphan'}` (a record whose owner is dead,
/// or that has none), or `{'claimed'}`: no session and no live claimant, and the claim is now
/// the caller's.
const LOCATE: &str = r"
local member, ttl, prefix = ARGV[1], ARGV[2], ARGV[3]
local owner = redis.call('HGET', KEYS[1], 'owner')
if owner == member then return {'mine'} end
if owner then
  local url = redis.call('GET', prefix .. 'member:' .. owner)
  if url then return {'remote', owner, url} end
end
if redis.call('EXISTS', KEYS[1]) == 1 then return {'orphan'} end
local claim = redis.call('GET', KEYS[2])
if claim and claim ~= member then
  local url = redis.call('GET', prefix .. 'member:' .. claim)
  if url then return {'remote', claim, url} end
end
if ttl == '' then return {'none'} end
redis.call('SET', KEYS[2], member, 'PX', ttl)
return {'claimed'}
";

/// KEYS: members. ARGV: prefix, limit, this node's id followed by `#`, this member. The bare
/// JIDs owned by dead members (and by this node's former incarnations, dead or not: a restarted
/// node takes its own sessions back at once), at most `limit`; dead members that own nothing
/// are forgotten.
const ORPHANS: &str = r"
local prefix, limit, mine, me = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
local out = {}
for _, m in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local dead = redis.call('EXISTS', prefix .. 'member:' .. m) == 0
  local former = m ~= me and string.sub(m, 1, string.len(mine)) == mine
  if dead or former then
    local owned = redis.call('SMEMBERS', prefix .. 'owned:' .. m)
    if #owned == 0 and dead then
      redis.call('SREM', KEYS[1], m)
    end
    for _, bare in ipairs(owned) do
      if #out >= limit then return out end
      out[#out + 1] = bare
    end
  end
end
return out
";

/// KEYS: session, last epoch. ARGV: epoch. `ok` while `epoch` is the session's, else what
/// [`super::CHECK_EPOCH`] answers.
const CONFIRM: &str = r"
return 'ok'
";

/// A live cluster member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// `{node_id}#{incarnation}`.
    pub id: String,
    /// The base URL other nodes reach it at.
    pub url: String,
}

impl Member {
    /// The node id part of the member id (what operators configured and see).
    pub fn node_id(&self) -> &str {
        node_of(&self.id)
    }
}

/// The node id of member id `member`.
pub fn node_of(member: &str) -> &str {
    member.split_once('#').map_or(member, |(node, _)| node)
}

/// Where a session is driven, as [`RedisStore::locate`] found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Located {
    /// This member owns it.
    Mine,
    /// A live member owns it (or is logging it in).
    Remote(Member),
    /// A record exists and its owner is dead: adopt it.
    Orphan,
    /// No session anywhere; the caller now holds the claim to log it in.
    Claimed,
    /// No session anywhere (nothing was claimed).
    None,
}

impl RedisStore {
    /// Makes `member` the owner recorded by this store's later creations and take-overs.
    pub fn set_member(&self, member: &str) {
        *self.member.lock() = Some(std::sync::Arc::from(member));
    }

    /// Registers `member` at `url` for `lease` (`renew`: only if its key still exists).
    /// `Ok(false)` when renewing found the key gone: the lease was lost.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`]: Redis could not be reached.
    pub fn beat(&self, member: &str, url: &str, lease: Duration, renew: bool) -> StoreFuture<bool> {
        let p = &self.prefix;
        let keys = vec![format!("{p}member:{member}")];
        let args = vec![
            url.as_bytes().to_vec(),
            lease.as_millis().to_string().into_bytes(),
            format!("{p}members").into_bytes(),
            if renew {
                b"XX".to_vec()
            } else {
                b"NEW".to_vec()
            },
            format!("{p}member:").into_bytes(),
        ];
        let call = self.eval::<String>(BEAT, keys, args);
        Box::pin(async move { Ok(call.await? == "ok") })
    }

    /// Ends `member`'s lease now (a graceful stop): what it owned is orphaned at once.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`].
    pub fn release(&self, member: &str) -> StoreFuture<()> {
        let key = format!("{}member:{member}", self.prefix);
        let conn = self.connection();
        Box::pin(async move {
            let mut conn = conn?;
            let _: () = redis::cmd("DEL")
                .arg(key)
                .query_async(&mut conn)
                .await
                .map_err(|e| unavailable(&e))?;
            Ok(())
        })
    }

    /// Where `bare`'s session is driven, seen from `member`; with `claim` set and no session
    /// anywhere, claims it for `member` for that long.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`].
    pub fn locate(
        &self,
        bare: &str,
        member: &str,
        claim: Option<Duration>,
    ) -> StoreFuture<Located> {
        let p = &self.prefix;
        let keys = vec![format!("{p}session:{bare}"), format!("{p}claim:{bare}")];
        let args = vec![
            member.as_bytes().to_vec(),
            claim
                .map(|d| d.as_millis().max(1).to_string())
                .unwrap_or_default()
                .into_bytes(),
            p.as_bytes().to_vec(),
        ];
        let call = self.eval::<Vec<String>>(LOCATE, keys, args);
        Box::pin(async move {
            let answer = call.await?;
            Ok(match answer.as_slice() {
                [m] if m == "mine" => Located::Mine,
                [r, id, url] if r == "remote" => Located::Remote(Member {
                    id: id.clone(),
                    url: url.clone(),
                }),
                [o] if o == "orphan" => Located::Orphan,
                [c] if c == "claimed" => Located::Claimed,
                _ => Located::None,
            })
        })
    }

    /// Drops `member`'s claim on `bare` (its login failed).
    ///
    /// # Errors
    /// [`StoreError::Unavailable`].
    pub fn unclaim(&self, bare: &str, member: &str) -> StoreFuture<()> {
        const UNCLAIM: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 'ok'
";
        let keys = vec![format!("{}claim:{bare}", self.prefix)];
        let call = self.eval::<String>(UNCLAIM, keys, vec![member.as_bytes().to_vec()]);
        Box::pin(async move { call.await.map(|_| ()) })
    }

    /// Up to `limit` sessions whose owner is dead, or a former incarnation of `node_id` (not
    /// `member`, the current one).
    ///
    /// # Errors
    /// [`StoreError::Unavailable`].
    pub fn orphans(&self, node_id: &str, member: &str, limit: usize) -> StoreFuture<Vec<String>> {
        let p = &self.prefix;
        let keys = vec![format!("{p}members")];
        let args = vec![
            p.as_bytes().to_vec(),
            limit.to_string().into_bytes(),
            format!("{node_id}#").into_bytes(),
            member.as_bytes().to_vec(),
        ];
        self.eval::<Vec<String>>(ORPHANS, keys, args)
    }

    /// The live members, by reading their keys.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`].
    pub fn members(&self) -> StoreFuture<Vec<Member>> {
        let p = self.prefix.clone();
        let conn = self.connection();
        Box::pin(async move {
            let mut conn = conn?;
            let ids: Vec<String> = redis::cmd("SMEMBERS")
                .arg(format!("{p}members"))
                .query_async(&mut conn)
                .await
                .map_err(|e| unavailable(&e))?;
            let mut out = Vec::new();
            for id in ids {
                let url: Option<String> = redis::cmd("GET")
                    .arg(format!("{p}member:{id}"))
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| unavailable(&e))?;
                if let Some(url) = url {
                    out.push(Member { id, url });
                }
            }
            Ok(out)
        })
    }

    /// Each live member's node id and how many sessions it owns.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`].
    pub fn census(&self) -> StoreFuture<Vec<(String, usize)>> {
        let members = self.members();
        let p = self.prefix.clone();
        let conn = self.connection();
        Box::pin(async move {
            let members = members.await?;
            let mut conn = conn?;
            let mut out = Vec::new();
            for m in members {
                let n: usize = redis::cmd("SCARD")
                    .arg(format!("{p}owned:{}", m.id))
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| unavailable(&e))?;
                out.push((m.node_id().to_owned(), n));
            }
            out.sort();
            Ok(out)
        })
    }

    /// The owner member of `bare`'s session, if it has a record.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`].
    pub fn owner(&self, bare: &str) -> StoreFuture<Option<String>> {
        let key = format!("{}session:{bare}", self.prefix);
        let conn = self.connection();
        Box::pin(async move {
            let mut conn = conn?;
            redis::cmd("HGET")
                .arg(key)
                .arg("owner")
                .query_async(&mut conn)
                .await
                .map_err(|e| unavailable(&e))
        })
    }

    /// `bare`'s record as stored now, read in one transaction; `None` when there is none.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`].
    pub fn read(&self, bare: &str) -> StoreFuture<Option<SessionRecord>> {
        let keys = self.keys();
        let bare = bare.to_owned();
        let conn = self.connection();
        Box::pin(async move {
            let mut conn = conn?;
            let mut pipe = redis::pipe();
            pipe.atomic()
                .hgetall(keys.session(&bare))
                .hgetall(keys.requests(&bare));
            let (s, r): (super::Fields, super::Fields) = pipe
                .query_async(&mut conn)
                .await
                .map_err(|e| unavailable(&e))?;
            if s.is_empty() {
                return Ok(None);
            }
            let (Some(epoch), Some(handed_on)) =
                (field_u64(&s, "epoch"), field_u64(&s, "handed_on"))
            else {
                return Ok(None);
            };
            Ok(Some(super::record(bare, epoch, handed_on, &s, &r)))
        })
    }

    /// Checks that `epoch` is still `bare`'s: [`StoreError::Fenced`] otherwise.
    pub(super) fn confirm_epoch(&self, bare: &str, epoch: u64) -> StoreFuture<()> {
        let keys = vec![
            format!("{}session:{bare}", self.prefix),
            format!("{}epoch:{bare}", self.prefix),
        ];
        static SCRIPT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        let script = SCRIPT.get_or_init(|| format!("{}{CONFIRM}", super::CHECK_EPOCH));
        let call = self.eval::<String>(script, keys, vec![epoch.to_string().into_bytes()]);
        Box::pin(async move {
            match super::answer(&call.await?)? {
                super::Answer::Fenced(current) => Err(StoreError::Fenced { current }),
                _ => Ok(()),
            }
        })
    }

    /// Runs the Lua `source` (cached by hash) with `keys` and `args`.
    pub(super) fn eval<T: redis::FromRedisValue + Send + 'static>(
        &self,
        source: &'static str,
        keys: Vec<String>,
        args: Vec<Vec<u8>>,
    ) -> StoreFuture<T> {
        let conn = self.connection();
        Box::pin(async move {
            let mut conn = conn?;
            let script = Script::new(source);
            let mut call = script.prepare_invoke();
            for k in &keys {
                call.key(k);
            }
            for a in &args {
                call.arg(&a[..]);
            }
            call.invoke_async(&mut conn)
                .await
                .map_err(|e| unavailable(&e))
        })
    }
}
