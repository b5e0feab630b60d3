//! The embedded store of SPEC §8: SQLite in a directory, no server. It survives `kill -9`
//! without an fsync per write: the database is in WAL mode with `synchronous=NORMAL`, so a
//! committed transaction is in the WAL file (the OS page cache) when its commit returns, and a
//! process kill loses nothing acknowledged. A power loss or kernel crash can lose the
//! transactions written since the WAL was last synced (at a checkpoint, every ~4 MiB of WAL),
//! never corrupt the database.
//!
//! One thread owns the connection. Calls reach it through a channel and get their answer through
//! a oneshot, so no tokio worker ever waits on the disk; the thread takes everything queued and
//! applies it in one transaction (group commit), then answers each caller: many sessions writing
//! at once cost one commit. Each call runs in a savepoint, with the epoch checked inside it, so a
//! fenced or failed call changes nothing and fails no other call of its batch.
//!
//! The directory (created with mode 0700 when missing) holds `store.sqlite3` (mode 0600, and its
//! `-wal`/`-shm` files, which SQLite creates with the same mode) and `lock`, locked exclusively
//! while a process has the store open: a second process is refused at once.

use std::collections::HashMap;
use std::fs::{DirBuilder, File, OpenOptions, Permissions, TryLockError};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rusqlite::types::Type;
use rusqlite::{Connection, OptionalExtension, Row, TransactionBehavior, params};
use tokio::sync::oneshot;

use super::memory::{Change, change};
use super::{
    Backend, Credential, CredentialKind, SessionRecord, Snapshot, StoreError, StoreFuture, Write,
    unix_now,
};

/// The schema this code reads and writes (`PRAGMA user_version`).
const SCHEMA_VERSION: i64 = 1;
/// The database file, inside the store's directory.
const DB_FILE: &str = "store.sqlite3";
/// The file locked while a process has the store open.
const LOCK_FILE: &str = "lock";
/// At most this many calls in one transaction, so that the first caller of a long queue is not
/// kept waiting behind all of it.
const MAX_BATCH: usize = 1024;
/// How often expired credentials are deleted (they are never loaded once expired).
const PURGE_EVERY: Duration = Duration::from_secs(600);

const SCHEMA: &str = "
CREATE TABLE sessions (
    bare TEXT PRIMARY KEY NOT NULL,
    epoch INTEGER NOT NULL,
    meta BLOB NOT NULL,
    caches BLOB NOT NULL,
    handed_on INTEGER NOT NULL
) STRICT;
CREATE TABLE requests (
    bare TEXT NOT NULL,
    rid INTEGER NOT NULL,
    bytes BLOB NOT NULL,
    PRIMARY KEY (bare, rid)
) STRICT, WITHOUT ROWID;
CREATE TABLE credentials (
    kind TEXT NOT NULL,
    hash BLOB NOT NULL,
    bare TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (kind, hash)
) STRICT, WITHOUT ROWID;
CREATE INDEX credentials_by_bare ON credentials (bare);
-- The last epoch each bare JID had, kept after its session is removed, so that a re-created
-- session's epoch is higher than any a fenced former owner could still write at.
CREATE TABLE epochs (
    bare TEXT PRIMARY KEY NOT NULL,
    epoch INTEGER NOT NULL
) STRICT, WITHOUT ROWID;
";

/// See the module documentation. Dropping it waits for the writer thread to finish what is
/// queued and close the database (a few milliseconds at most), then releases the lock.
pub struct EmbeddedStore {
    dir: PathBuf,
    /// `None` only while dropping.
    jobs: Option<mpsc::Sender<Job>>,
    writer: Option<JoinHandle<()>>,
    /// Transactions committed so far (group commit makes it lower than the calls).
    commits: Arc<AtomicU64>,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("dir", &self.dir)
            .finish()
    }
}

/// One call, as the writer thread carries it out.
enum Op {
    Load,
    Create {
        bare: String,
        meta: Bytes,
        handed_on: u64,
    },
    TakeOver {
        bare: String,
        epoch: u64,
    },
    Write {
        bare: String,
        epoch: u64,
        write: Write,
    },
    Remove {
        bare: String,
        epoch: u64,
    },
    PutCredential(Credential),
    RemoveCredential(CredentialKind, [u8; 32]),
}

enum Reply {
    Snapshot(Snapshot),
    Epoch(u64),
    Done,
}

struct Job {
    op: Op,
    reply: oneshot::Sender<Result<Reply, StoreError>>,
}

impl EmbeddedStore {
    /// Opens (creating when missing) the store in directory `dir`, and locks it for this process
    /// until the store is dropped. Blocking file I/O: call it at start.
    ///
    /// # Errors
    /// [`StoreError::Open`] naming `dir`: the directory or database cannot be created or opened,
    /// another process has the store open, the database is not a boshmux store, or its schema
    /// version is not one this build knows.
    pub fn open(dir: &Path) -> Result<EmbeddedStore, StoreError> {
        let fail = |message: String| StoreError::Open {
            location: dir.display().to_string(),
            message,
        };
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| fail(format!("cannot create the directory: {e}")))?;

        // A lock file rather than SQLite's exclusive locking mode: it is taken at once (SQLite
        // locks lazily, on first access, and reports "database is locked" after a busy wait),
        // it is released by the kernel when the process dies however it dies, and the database
        // itself stays readable by the `sqlite3` shell while the daemon runs.
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(dir.join(LOCK_FILE))
            .map_err(|e| fail(format!("cannot open the lock file: {e}")))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(fail(
                    "in use: another boshmux process has this store open".into(),
                ));
            }
            Err(TryLockError::Error(e)) => return Err(fail(format!("cannot lock: {e}"))),
        }

        // Created here with mode 0600 because SQLite gives its -wal and -shm files the
        // database's mode, and its own default would be 0644 less the umask.
        let path = dir.join(DB_FILE);
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|e| fail(format!("cannot create {DB_FILE}: {e}")))?;
        file.set_permissions(Permissions::from_mode(0o600))
            .map_err(|e| fail(format!("cannot restrict {DB_FILE} to its owner: {e}")))?;
        drop(file);

        let conn = prepare(&path).map_err(fail)?;
        let (jobs, queue) = mpsc::channel();
        let commits = Arc::new(AtomicU64::new(0));
        let counted = commits.clone();
        let writer = std::thread::Builder::new()
            .name("boshmux-store".into())
            .spawn(move || writer(conn, lock, &queue, &counted))
            .map_err(|e| fail(format!("cannot start the writer thread: {e}")))?;
        Ok(EmbeddedStore {
            dir: dir.to_owned(),
            jobs: Some(jobs),
            writer: Some(writer),
            commits,
        })
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Hands `op` to the writer thread; the future resolves when its transaction is committed.
    fn call<T: Send + 'static>(&self, op: Op, pick: fn(Reply) -> Option<T>) -> StoreFuture<T> {
        let (reply, answer) = oneshot::channel();
        // Sent now, not when the future is first polled: calls reach the store in call order.
        let sent = self
            .jobs
            .as_ref()
            .is_some_and(|jobs| jobs.send(Job { op, reply }).is_ok());
        Box::pin(async move {
            if !sent {
                return Err(stopped());
            }
            match answer.await {
                Ok(Ok(r)) => pick(r).ok_or_else(|| {
                    StoreError::Unavailable("store writer answered another call".into())
                }),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(stopped()),
            }
        })
    }

    /// Transactions committed since the store was opened: lower than the calls made when group
    /// commit gathered several calls into one.
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }
}

impl Drop for EmbeddedStore {
    fn drop(&mut self) {
        // Closing the channel ends the writer once the queue is drained; joining makes the lock's
        // release (and a reopen in this process) follow the drop, not race it.
        self.jobs = None;
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

fn stopped() -> StoreError {
    StoreError::Unavailable("the store's writer thread has stopped".into())
}

fn unavailable(e: &rusqlite::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// Opens the database, checks or creates its schema, and sets the journal up.
fn prepare(path: &Path) -> Result<Connection, String> {
    let conn = Connection::open(path).map_err(|e| e.to_string())?;
    conn.set_prepared_statement_cache_capacity(32);
    // Checked before anything is written, so an unknown file is left as it is.
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(|e| format!("not a readable database: {e}"))?;
    match version {
        0 => {
            let tables: i64 = conn
                .query_row("SELECT count(*) FROM sqlite_schema", [], |r| r.get(0))
                .map_err(|e| e.to_string())?;
            if tables != 0 {
                return Err("not a boshmux store (tables, but no schema version)".into());
            }
        }
        SCHEMA_VERSION => {}
        v => {
            return Err(format!(
                "schema version {v} is not one this boshmux knows ({SCHEMA_VERSION})"
            ));
        }
    }
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
        .map_err(|e| e.to_string())?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(format!(
            "cannot use a write-ahead log (journal mode {mode})"
        ));
    }
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(|e| e.to_string())?;
    if version == 0 {
        conn.execute_batch(&format!(
            "BEGIN IMMEDIATE; {SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
        ))
        .map_err(|e| format!("cannot create the schema: {e}"))?;
    }
    purge(&conn).map_err(|e| e.to_string())?;
    Ok(conn)
}

/// Deletes expired credentials.
fn purge(db: &Connection) -> rusqlite::Result<usize> {
    db.prepare_cached("DELETE FROM credentials WHERE expires_at <= ?1")?
        .execute([int(unix_now())?])
}

/// The writer thread: batches of calls, one transaction each, until the store is dropped.
fn writer(mut conn: Connection, lock: File, queue: &mpsc::Receiver<Job>, commits: &AtomicU64) {
    let mut purged = Instant::now();
    while let Ok(first) = queue.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let purge_now = purged.elapsed() >= PURGE_EVERY;
        if purge_now {
            purged = Instant::now();
        }
        let (ops, replies): (Vec<Op>, Vec<_>) = batch.into_iter().map(|j| (j.op, j.reply)).unzip();
        let results = apply_batch(&mut conn, ops, purge_now);
        commits.fetch_add(1, Ordering::Relaxed);
        for (reply, result) in replies.into_iter().zip(results) {
            // A caller that stopped waiting does not matter: the write is in.
            let _ = reply.send(result);
        }
    }
    // The connection closes (checkpointing the log) before the lock is released.
    drop(conn);
    drop(lock);
}

/// Applies `ops` in one transaction; one result per op, in order.
fn apply_batch(
    conn: &mut Connection,
    ops: Vec<Op>,
    purge_now: bool,
) -> Vec<Result<Reply, StoreError>> {
    let mut tx = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(e) => return ops.iter().map(|_| Err(unavailable(&e))).collect(),
    };
    let mut results = Vec::with_capacity(ops.len());
    for op in ops {
        let result = match tx.savepoint() {
            Ok(sp) => match one(&sp, op) {
                // A fenced call changed nothing; releasing its savepoint is as good as undoing.
                Ok(r) => sp.commit().map_err(|e| unavailable(&e)).and(r),
                // Dropping the savepoint undoes this call's part only.
                Err(e) => Err(unavailable(&e)),
            },
            Err(e) => Err(unavailable(&e)),
        };
        results.push(result);
    }
    if purge_now && let Err(e) = purge(&tx) {
        tracing::warn!("store: cannot delete expired credentials: {e}");
    }
    if let Err(e) = tx.commit() {
        tracing::warn!("store: commit failed: {e}");
        for r in &mut results {
            if !matches!(r, Err(StoreError::Fenced { .. })) {
                *r = Err(unavailable(&e));
            }
        }
    }
    results
}

/// A store integer (rids and epochs are below 2^53, so they fit SQLite's signed 64 bits).
fn int(v: u64) -> rusqlite::Result<i64> {
    i64::try_from(v).map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))
}

/// Column `idx` of `row` as a non-negative integer.
fn uint(row: &Row<'_>, idx: usize) -> rusqlite::Result<u64> {
    let v: i64 = row.get(idx)?;
    u64::try_from(v).map_err(|_| rusqlite::Error::IntegralValueOutOfRange(idx, v))
}

fn kind_name(kind: CredentialKind) -> &'static str {
    match kind {
        CredentialKind::Token => "token",
        CredentialKind::Ticket => "ticket",
    }
}

/// `bare`'s `(epoch, handed_on)` if `epoch` is current, else why not.
fn current(db: &Connection, bare: &str, epoch: u64) -> rusqlite::Result<Result<u64, StoreError>> {
    let row = db
        .prepare_cached("SELECT epoch, handed_on FROM sessions WHERE bare = ?1")?
        .query_row([bare], |r| Ok((uint(r, 0)?, uint(r, 1)?)))
        .optional()?;
    Ok(match row {
        Some((e, handed_on)) if e == epoch => Ok(handed_on),
        Some((e, _)) => Err(StoreError::Fenced { current: Some(e) }),
        None => Err(StoreError::Fenced { current: None }),
    })
}

/// Records `epoch` as `bare`'s last.
fn set_epoch(db: &Connection, bare: &str, epoch: u64) -> rusqlite::Result<()> {
    db.prepare_cached(
        "INSERT INTO epochs (bare, epoch) VALUES (?1, ?2) \
         ON CONFLICT (bare) DO UPDATE SET epoch = excluded.epoch",
    )?
    .execute(params![bare, int(epoch)?])?;
    Ok(())
}

/// Carries one call out; the outer error is SQLite's, the inner one the call's answer.
fn one(db: &Connection, op: Op) -> rusqlite::Result<Result<Reply, StoreError>> {
    match op {
        Op::Load => load(db).map(|s| Ok(Reply::Snapshot(s))),
        Op::Create {
            bare,
            meta,
            handed_on,
        } => {
            let last = db
                .prepare_cached("SELECT epoch FROM epochs WHERE bare = ?1")?
                .query_row([&bare], |r| uint(r, 0))
                .optional()?;
            let epoch = last.unwrap_or(0) + 1;
            set_epoch(db, &bare, epoch)?;
            db.prepare_cached("DELETE FROM requests WHERE bare = ?1")?
                .execute([&bare])?;
            db.prepare_cached(
                "INSERT OR REPLACE INTO sessions (bare, epoch, meta, caches, handed_on) \
                 VALUES (?1, ?2, ?3, x'', ?4)",
            )?
            .execute(params![bare, int(epoch)?, &meta[..], int(handed_on)?])?;
            Ok(Ok(Reply::Epoch(epoch)))
        }
        Op::TakeOver { bare, epoch } => {
            if let Err(fenced) = current(db, &bare, epoch)? {
                return Ok(Err(fenced));
            }
            let new = epoch + 1;
            db.prepare_cached("UPDATE sessions SET epoch = ?2 WHERE bare = ?1")?
                .execute(params![bare, int(new)?])?;
            set_epoch(db, &bare, new)?;
            Ok(Ok(Reply::Epoch(new)))
        }
        Op::Write { bare, epoch, write } => {
            let handed_on = match current(db, &bare, epoch)? {
                Ok(h) => h,
                Err(fenced) => return Ok(Err(fenced)),
            };
            carry_out(db, &bare, change(handed_on, write))?;
            Ok(Ok(Reply::Done))
        }
        Op::Remove { bare, epoch } => {
            if let Err(fenced) = current(db, &bare, epoch)? {
                return Ok(Err(fenced));
            }
            for sql in [
                "DELETE FROM sessions WHERE bare = ?1",
                "DELETE FROM requests WHERE bare = ?1",
                "DELETE FROM credentials WHERE bare = ?1",
            ] {
                db.prepare_cached(sql)?.execute([&bare])?;
            }
            Ok(Ok(Reply::Done))
        }
        Op::PutCredential(c) => {
            db.prepare_cached(
                "INSERT OR REPLACE INTO credentials (kind, hash, bare, expires_at) \
                 VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![
                kind_name(c.kind),
                &c.hash[..],
                c.bare,
                int(c.expires_at)?
            ])?;
            Ok(Ok(Reply::Done))
        }
        Op::RemoveCredential(kind, hash) => {
            db.prepare_cached("DELETE FROM credentials WHERE kind = ?1 AND hash = ?2")?
                .execute(params![kind_name(kind), &hash[..]])?;
            Ok(Ok(Reply::Done))
        }
    }
}

/// Carries out `c` (see [`Change`] for the order) on `bare`'s rows.
fn carry_out(db: &Connection, bare: &str, c: Change) -> rusqlite::Result<()> {
    if c.clear_requests {
        db.prepare_cached("DELETE FROM requests WHERE bare = ?1")?
            .execute([bare])?;
    }
    if let Some(through) = c.drop_through {
        db.prepare_cached("DELETE FROM requests WHERE bare = ?1 AND rid <= ?2")?
            .execute(params![bare, int(through)?])?;
    }
    if c.handed_on.is_some() || c.meta.is_some() || c.caches.is_some() {
        db.prepare_cached(
            "UPDATE sessions SET handed_on = coalesce(?2, handed_on), \
             meta = coalesce(?3, meta), caches = coalesce(?4, caches) WHERE bare = ?1",
        )?
        .execute(params![
            bare,
            c.handed_on.map(int).transpose()?,
            c.meta.as_deref(),
            c.caches.as_deref()
        ])?;
    }
    if let Some((rid, bytes)) = c.insert {
        db.prepare_cached(
            "INSERT OR REPLACE INTO requests (bare, rid, bytes) VALUES (?1, ?2, ?3)",
        )?
        .execute(params![bare, int(rid)?, &bytes[..]])?;
    }
    Ok(())
}

/// Everything stored, expired credentials left out.
fn load(db: &Connection) -> rusqlite::Result<Snapshot> {
    let mut sessions = Vec::new();
    let mut index = HashMap::new();
    let mut stmt =
        db.prepare_cached("SELECT bare, epoch, meta, caches, handed_on FROM sessions")?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        let bare: String = r.get(0)?;
        index.insert(bare.clone(), sessions.len());
        sessions.push(SessionRecord {
            bare,
            epoch: uint(r, 1)?,
            meta: Bytes::from(r.get::<_, Vec<u8>>(2)?),
            caches: Bytes::from(r.get::<_, Vec<u8>>(3)?),
            handed_on: uint(r, 4)?,
            requests: Vec::new(),
        });
    }
    drop(rows);
    // Rows at or below the mark are never left behind by a write; the join keeps it so anyway.
    let mut stmt = db.prepare_cached(
        "SELECT r.bare, r.rid, r.bytes FROM requests r JOIN sessions s ON s.bare = r.bare \
         WHERE r.rid > s.handed_on ORDER BY r.bare, r.rid",
    )?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        let bare: String = r.get(0)?;
        if let Some(&i) = index.get(&bare) {
            sessions[i]
                .requests
                .push((uint(r, 1)?, Bytes::from(r.get::<_, Vec<u8>>(2)?)));
        }
    }
    drop(rows);
    let mut credentials = Vec::new();
    let mut stmt = db.prepare_cached(
        "SELECT kind, hash, bare, expires_at FROM credentials WHERE expires_at > ?1",
    )?;
    let mut rows = stmt.query([int(unix_now())?])?;
    while let Some(r) = rows.next()? {
        let kind = match r.get_ref(0)?.as_str()? {
            "token" => CredentialKind::Token,
            "ticket" => CredentialKind::Ticket,
            _ => {
                return Err(rusqlite::Error::FromSqlConversionFailure(
                    0,
                    Type::Text,
                    "unknown credential kind".into(),
                ));
            }
        };
        let hash: [u8; 32] = r.get_ref(1)?.as_blob()?.try_into().map_err(|_| {
            rusqlite::Error::FromSqlConversionFailure(1, Type::Blob, "hash not 32 bytes".into())
        })?;
        credentials.push(Credential {
            kind,
            hash,
            bare: r.get(2)?,
            expires_at: uint(r, 3)?,
        });
    }
    Ok(Snapshot {
        sessions,
        credentials,
    })
}

impl Backend for EmbeddedStore {
    fn load(&self) -> StoreFuture<Snapshot> {
        self.call(Op::Load, |r| match r {
            Reply::Snapshot(s) => Some(s),
            _ => None,
        })
    }

    fn create(&self, bare: &str, meta: Bytes, handed_on: u64) -> StoreFuture<u64> {
        let op = Op::Create {
            bare: bare.to_owned(),
            meta,
            handed_on,
        };
        self.call(op, epoch)
    }

    fn take_over(&self, bare: &str, epoch: u64) -> StoreFuture<u64> {
        let op = Op::TakeOver {
            bare: bare.to_owned(),
            epoch,
        };
        self.call(op, self::epoch)
    }

    fn write(&self, bare: &str, epoch: u64, write: Write) -> StoreFuture<()> {
        let op = Op::Write {
            bare: bare.to_owned(),
            epoch,
            write,
        };
        self.call(op, done)
    }

    fn remove(&self, bare: &str, epoch: u64) -> StoreFuture<()> {
        let op = Op::Remove {
            bare: bare.to_owned(),
            epoch,
        };
        self.call(op, done)
    }

    fn put_credential(&self, credential: Credential) -> StoreFuture<()> {
        self.call(Op::PutCredential(credential), done)
    }

    fn remove_credential(&self, kind: CredentialKind, hash: [u8; 32]) -> StoreFuture<()> {
        self.call(Op::RemoveCredential(kind, hash), done)
    }

    fn durable(&self) -> bool {
        true
    }
}

fn epoch(r: Reply) -> Option<u64> {
    match r {
        Reply::Epoch(e) => Some(e),
        _ => None,
    }
}

fn done(r: Reply) -> Option<()> {
    matches!(r, Reply::Done).then_some(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::path::{Path, PathBuf};
    use std::sync::Arc;

    use bytes::Bytes;

    use super::super::{Backend, Credential, CredentialKind, Store, StoreError, Write, unix_now};
    use super::EmbeddedStore;

    /// A directory that does not exist yet, removed with everything in it when dropped.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> TempDir {
            let dir = std::env::temp_dir()
                .join(format!("boshmux-store-{}", uuid::Uuid::new_v4()))
                .join("store");
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            if let Some(parent) = self.0.parent() {
                let _ = std::fs::remove_dir_all(parent);
            }
        }
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    fn b(s: &str) -> Bytes {
        Bytes::from(s.to_owned())
    }

    #[tokio::test]
    async fn embedded_store_follows_the_store_rules() {
        let dir = TempDir::new();
        let store = Store::open(dir.0.to_str().unwrap()).unwrap();
        assert!(store.durable());
        super::super::conformance::run(&store).await;
        assert_eq!(mode(&dir.0), 0o700, "the directory is private");
        assert_eq!(mode(&dir.0.join(super::DB_FILE)), 0o600);
        let wal = dir.0.join(format!("{}-wal", super::DB_FILE));
        assert_eq!(
            mode(&wal),
            0o600,
            "SQLite's log is as private as the database"
        );
    }

    #[tokio::test]
    async fn everything_is_there_after_reopening() {
        let dir = TempDir::new();
        let store = Store::new(EmbeddedStore::open(&dir.0).unwrap());
        let s = store.create("a@x", b("meta-a"), 10).await.unwrap();
        s.request(11, b("r11")).await.unwrap();
        s.request(12, b("r12")).await.unwrap();
        s.write(Write::HandedOn {
            rid: 11,
            caches: Some(b("caches-a")),
        })
        .await
        .unwrap();
        let gone = store.create("b@x", b("meta-b"), 0).await.unwrap();
        gone.remove().await.unwrap();
        let expires_at = unix_now() + 600;
        let token = Credential {
            kind: CredentialKind::Token,
            hash: [7; 32],
            bare: "a@x".into(),
            expires_at,
        };
        store.put_credential(token.clone()).await.unwrap();
        // Expired: deleted when the store is next opened.
        store
            .put_credential(Credential {
                hash: [8; 32],
                expires_at: unix_now() - 1,
                ..token.clone()
            })
            .await
            .unwrap();
        // Session handles hold the store open too.
        let (epoch_a, epoch_b) = (s.epoch(), gone.epoch());
        drop((store, s, gone));

        let store = Store::open(dir.0.to_str().unwrap()).unwrap();
        let s = store.session("a@x", epoch_a);
        let snap = store.load().await.unwrap();
        assert_eq!(snap.sessions.len(), 1);
        let r = &snap.sessions[0];
        assert_eq!(
            (r.bare.as_str(), r.epoch, r.handed_on),
            ("a@x", epoch_a, 11)
        );
        assert_eq!(
            (r.meta.clone(), r.caches.clone()),
            (b("meta-a"), b("caches-a"))
        );
        assert_eq!(r.requests, vec![(12, b("r12"))]);
        assert_eq!(snap.credentials, vec![token]);
        // The old handle is fenced after a take-over, across the reopen too.
        let t = store.take_over(r).await.unwrap();
        assert!(matches!(
            s.request(13, b("late")).await,
            Err(StoreError::Fenced { current: Some(e) }) if e == t.epoch()
        ));
        // A JID whose record was removed before the reopen still gets a higher epoch.
        let again = store.create("b@x", b("meta-b2"), 0).await.unwrap();
        assert!(again.epoch() > epoch_b);
        drop((store, s, t, again));

        let db = rusqlite::Connection::open(dir.0.join(super::DB_FILE)).unwrap();
        let creds: i64 = db
            .query_row("SELECT count(*) FROM credentials", [], |r| r.get(0))
            .unwrap();
        assert_eq!(creds, 1, "the expired credential was purged");
    }

    #[tokio::test]
    async fn a_second_open_of_the_same_directory_is_refused() {
        let dir = TempDir::new();
        let first = EmbeddedStore::open(&dir.0).unwrap();
        let err = EmbeddedStore::open(&dir.0).unwrap_err();
        let StoreError::Open { location, message } = &err else {
            panic!("{err:?}")
        };
        assert_eq!(location, &dir.0.display().to_string());
        assert!(message.contains("another boshmux process"), "{message}");
        assert!(err.to_string().contains(location.as_str()), "{err}");
        // The first store is unharmed, and the lock goes with it.
        first.create("a@x", b("m"), 0).await.unwrap();
        drop(first);
        let again = EmbeddedStore::open(&dir.0).unwrap();
        assert_eq!(again.load().await.unwrap().sessions.len(), 1);
    }

    #[tokio::test]
    async fn an_unknown_schema_version_is_refused() {
        let dir = TempDir::new();
        drop(EmbeddedStore::open(&dir.0).unwrap());
        let db = rusqlite::Connection::open(dir.0.join(super::DB_FILE)).unwrap();
        db.pragma_update(None, "user_version", 99).unwrap();
        drop(db);
        let err = EmbeddedStore::open(&dir.0).unwrap_err();
        assert!(
            matches!(&err, StoreError::Open { message, .. } if message.contains("version 99")),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn a_fenced_write_fails_alone() {
        let dir = TempDir::new();
        let store = EmbeddedStore::open(&dir.0).unwrap();
        let old = store.create("a@x", b("m"), 0).await.unwrap();
        let new = store.take_over("a@x", old).await.unwrap();
        // Queued together, so most likely one transaction; the outcome must not depend on it.
        let ok1 = store.write(
            "a@x",
            new,
            Write::Request {
                rid: 1,
                bytes: b("r1"),
            },
        );
        let fenced = store.write(
            "a@x",
            old,
            Write::Request {
                rid: 2,
                bytes: b("late"),
            },
        );
        let ok2 = store.write(
            "a@x",
            new,
            Write::Request {
                rid: 3,
                bytes: b("r3"),
            },
        );
        let (ok1, fenced, ok2) = tokio::join!(ok1, fenced, ok2);
        assert_eq!((ok1, ok2), (Ok(()), Ok(())));
        assert_eq!(fenced, Err(StoreError::Fenced { current: Some(new) }));
        let snap = store.load().await.unwrap();
        assert_eq!(snap.sessions[0].requests, vec![(1, b("r1")), (3, b("r3"))]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writers_share_commits_and_lose_nothing() {
        const SESSIONS: u64 = 100;
        const STEPS: u64 = 20;
        let dir = TempDir::new();
        let backend = Arc::new(EmbeddedStore::open(&dir.0).unwrap());
        let store = Store {
            backend: backend.clone(),
            shared: None,
        };
        let mut tasks = Vec::new();
        for i in 0..SESSIONS {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let bare = format!("u{i}@x");
                let s = store.create(&bare, b("m"), 0).await.unwrap();
                for rid in 1..=STEPS {
                    s.request(rid, Bytes::from(format!("{bare} {rid}")))
                        .await
                        .unwrap();
                    if rid > 2 {
                        s.write(Write::HandedOn {
                            rid: rid - 2,
                            caches: Some(Bytes::from(format!("caches {rid}"))),
                        })
                        .await
                        .unwrap();
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let calls = SESSIONS * (1 + STEPS + (STEPS - 2));
        let commits = backend.commits();
        assert!(
            commits < calls,
            "{commits} commits for {calls} calls: writes waiting together share one"
        );
        drop(store);
        drop(backend);
        let store = Store::open(dir.0.to_str().unwrap()).unwrap();
        let snap = store.load().await.unwrap();
        assert_eq!(snap.sessions.len() as u64, SESSIONS);
        for r in &snap.sessions {
            assert_eq!(r.handed_on, STEPS - 2, "{}", r.bare);
            assert_eq!(r.caches, Bytes::from(format!("caches {STEPS}")));
            let want: Vec<(u64, Bytes)> = (STEPS - 1..=STEPS)
                .map(|rid| (rid, Bytes::from(format!("{} {rid}", r.bare))))
                .collect();
            assert_eq!(r.requests, want, "{}", r.bare);
        }
    }
}
