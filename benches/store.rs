//! The session store's cost on the path of every upstream request (SPEC §8): one write-ahead
//! record of a ~600-byte body and one `HandedOn` mark, by one writer and by 100 at once, for the
//! embedded store against the in-memory and the null store, and the Redis store when
//! `BOSHMUX_TEST_REDIS_URL` names one (scripts/redis.sh; database 3 is emptied and used); and
//! reading 1000 sessions back at start. Run with `cargo bench --bench store`; results go to
//! BENCHMARKS.md ("Store").
//!
//! Besides criterion's mean time per request+mark, the run ends with a table of per-write
//! latency percentiles and writes/s, measured by this file (criterion reports means only).

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use boshmux::store::embedded::EmbeddedStore;
use boshmux::store::redis::RedisStore;
use boshmux::store::{
    Backend, Credential, CredentialKind, SessionStore, Snapshot, Store, StoreFuture, Write,
};
use bytes::Bytes;
use criterion::{Criterion, Throughput};
use tokio::runtime::Runtime;

/// Concurrent writers in the "many" case.
const WRITERS: usize = 100;

/// A ~600-byte BOSH request: a chat message with the usual extensions.
fn request_body(rid: u64) -> Bytes {
    let text = format!(
        "<body xmlns='http://jabber.org/protocol/httpbind' rid='{rid}' sid='0f6b0c1e8d3a4f55a3c2'>\
         <message xmlns='jabber:client' to='bob@example.com' type='chat' id='a1b2c3d4-{rid}'>\
         <body>Hello Bob, are we still on for lunch tomorrow? I booked the table for 12:30 and \
         told the others; Carol may be late, she has a meeting until noon.</body>\
         <active xmlns='http://jabber.org/protocol/chatstates'/>\
         <request xmlns='urn:xmpp:receipts'/><origin-id xmlns='urn:xmpp:sid:0' id='a1b2c3d4-{rid}'/>\
         <markable xmlns='urn:xmpp:chat-markers:0'/><store xmlns='urn:xmpp:hints'/>\
         </message></body>"
    );
    let mut bytes = text.into_bytes();
    bytes.resize(600, b' ');
    Bytes::from(bytes)
}

/// The embedded store, shared so that its commit count can be read while a `Store` holds it.
struct Shared(Arc<EmbeddedStore>);

impl Backend for Shared {
    fn load(&self) -> StoreFuture<Snapshot> {
        self.0.load()
    }
    fn create(&self, bare: &str, meta: Bytes, handed_on: u64) -> StoreFuture<u64> {
        self.0.create(bare, meta, handed_on)
    }
    fn take_over(&self, bare: &str, epoch: u64) -> StoreFuture<u64> {
        self.0.take_over(bare, epoch)
    }
    fn write(&self, bare: &str, epoch: u64, write: Write) -> StoreFuture<()> {
        self.0.write(bare, epoch, write)
    }
    fn remove(&self, bare: &str, epoch: u64) -> StoreFuture<()> {
        self.0.remove(bare, epoch)
    }
    fn put_credential(&self, credential: Credential) -> StoreFuture<()> {
        self.0.put_credential(credential)
    }
    fn remove_credential(&self, kind: CredentialKind, hash: [u8; 32]) -> StoreFuture<()> {
        self.0.remove_credential(kind, hash)
    }
    fn durable(&self) -> bool {
        self.0.durable()
    }
}

/// One session's handle and its next rid.
struct Writer {
    session: SessionStore,
    rid: AtomicU64,
}

impl Writer {
    /// What the scheduler writes per upstream request: the record, then the previous mark.
    /// Returns the latency of each of the two writes.
    async fn step(&self) -> [Duration; 2] {
        let rid = self.rid.fetch_add(1, Ordering::Relaxed);
        let t0 = Instant::now();
        self.session.request(rid, request_body(rid)).await.unwrap();
        let t1 = Instant::now();
        self.session
            .write(Write::HandedOn {
                rid: rid - 1,
                caches: None,
            })
            .await
            .unwrap();
        [t1 - t0, t1.elapsed()]
    }
}

/// The bench's Redis database (3 of the test Redis), emptied, when `BOSHMUX_TEST_REDIS_URL` is
/// set.
fn redis_url(rt: &Runtime) -> Option<String> {
    let url = std::env::var("BOSHMUX_TEST_REDIS_URL").ok()?;
    let url = format!(
        "{}/3",
        url.rsplit_once('/').map_or(url.as_str(), |(b, _)| b)
    );
    rt.block_on(async {
        let mut c = redis::Client::open(url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let _: () = redis::cmd("FLUSHDB").query_async(&mut c).await.unwrap();
    });
    Some(url)
}

/// The stores (Redis when `redis` is given), each with `WRITERS` sessions.
fn stores(
    rt: &Runtime,
    embedded: &Arc<EmbeddedStore>,
    redis: Option<&str>,
) -> Vec<(&'static str, Store, Arc<Vec<Writer>>)> {
    let redis = redis.map(|url| ("redis", Store::new(RedisStore::open(url).unwrap())));
    [
        ("embedded", Store::new(Shared(embedded.clone()))),
        ("memory", Store::memory()),
        ("none", Store::none()),
    ]
    .into_iter()
    .chain(redis)
    .map(|(name, store)| {
        let writers = rt.block_on(async {
            let mut writers = Vec::new();
            for i in 0..WRITERS {
                let session = store
                    .create(&format!("user{i}@example.com"), Bytes::from("meta"), 0)
                    .await
                    .unwrap();
                writers.push(Writer {
                    session,
                    rid: AtomicU64::new(1),
                });
            }
            writers
        });
        (name, store, Arc::new(writers))
    })
    .collect()
}

/// Runs `steps` request+mark steps split over `n` concurrent writers; the wall time and every
/// write's latency.
async fn run(writers: &Arc<Vec<Writer>>, n: usize, steps: u64) -> (Duration, Vec<Duration>) {
    let per = steps.div_ceil(n as u64);
    let start = Instant::now();
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let writers = writers.clone();
            tokio::spawn(async move {
                let mut lat = Vec::with_capacity(2 * per as usize);
                for _ in 0..per {
                    lat.extend(writers[i].step().await);
                }
                lat
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await.unwrap());
    }
    (start.elapsed(), latencies)
}

fn writes(c: &mut Criterion, rt: &Runtime, stores: &[(&'static str, Store, Arc<Vec<Writer>>)]) {
    for n in [1, WRITERS] {
        let mut group = c.benchmark_group(format!("store_request_and_mark/{n}_writers"));
        // One iteration is one request record plus one mark: two writes.
        group.throughput(Throughput::Elements(2));
        for (name, _, writers) in stores {
            group.bench_function(*name, |b| {
                b.iter_custom(|iters| {
                    let (wall, _) = rt.block_on(run(writers, n, iters));
                    // Per step of all writers together: the inverse of the throughput.
                    let done = iters.div_ceil(n as u64) * n as u64;
                    wall.mul_f64(iters as f64 / done as f64)
                });
            });
        }
        group.finish();
    }
}

/// A store of 1000 sessions with two requests and 4 KiB of caches each, as at start.
fn load(c: &mut Criterion, rt: &Runtime, dir: &Path) -> Vec<(String, u64)> {
    let dir = dir.join("load");
    let mut sizes = Vec::new();
    {
        let store = Store::new(EmbeddedStore::open(&dir).unwrap());
        rt.block_on(async {
            for i in 0..1000 {
                let s = store
                    .create(
                        &format!("user{i}@example.com"),
                        Bytes::from(vec![b'm'; 200]),
                        0,
                    )
                    .await
                    .unwrap();
                s.write(Write::Caches(Bytes::from(vec![b'c'; 4096])))
                    .await
                    .unwrap();
                s.request(1, request_body(1)).await.unwrap();
                s.request(2, request_body(2)).await.unwrap();
            }
        });
        sizes.push(("open, after writing".into(), dir_size(&dir)));
    }
    sizes.push(("closed (log checkpointed)".into(), dir_size(&dir)));
    let store = Store::new(EmbeddedStore::open(&dir).unwrap());
    let mut group = c.benchmark_group("store_load_1000_sessions");
    group.sample_size(20);
    group.bench_function("embedded", |b| {
        b.iter(|| {
            let snap = rt.block_on(store.load()).unwrap();
            assert_eq!(snap.sessions.len(), 1000);
            black_box(snap)
        });
    });
    group.finish();
    sizes
}

/// `load()` of 1000 sessions like [`load`]'s from Redis (keys under their own prefix).
fn load_redis(c: &mut Criterion, rt: &Runtime, url: &str) {
    let store = Store::new(RedisStore::with_prefix(url, "boshmux-load:").unwrap());
    rt.block_on(async {
        for i in 0..1000 {
            let s = store
                .create(
                    &format!("user{i}@example.com"),
                    Bytes::from(vec![b'm'; 200]),
                    0,
                )
                .await
                .unwrap();
            s.write(Write::Caches(Bytes::from(vec![b'c'; 4096])))
                .await
                .unwrap();
            s.request(1, request_body(1)).await.unwrap();
            s.request(2, request_body(2)).await.unwrap();
        }
    });
    let mut group = c.benchmark_group("store_load_1000_sessions");
    group.sample_size(20);
    group.bench_function("redis", |b| {
        b.iter(|| {
            let snap = rt.block_on(store.load()).unwrap();
            assert_eq!(snap.sessions.len(), 1000);
            black_box(snap)
        });
    });
    group.finish();
}

/// Bytes in the files of `dir`.
fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Per-write latency and writes/s for each store, 1 and `WRITERS` writers, ~2 s each.
fn latency_table(
    rt: &Runtime,
    stores: &[(&'static str, Store, Arc<Vec<Writer>>)],
    embedded: &EmbeddedStore,
) {
    println!(
        "\n| writers | store | writes | per-write p50 / p99 / max µs | writes/s | writes per commit |"
    );
    println!("|---|---|---|---|---|---|");
    for n in [1, WRITERS] {
        for (name, _, writers) in stores {
            // Calibrate to about two seconds of work.
            let (probe, _) = rt.block_on(run(writers, n, 2000));
            let steps = (2000.0 * 2.0 / probe.as_secs_f64().max(1e-6)) as u64;
            let steps = steps.clamp(2000, 2_000_000);
            let commits = embedded.commits();
            let (wall, mut lat) = rt.block_on(run(writers, n, steps));
            let per_commit = if *name == "embedded" {
                format!(
                    "{:.1}",
                    lat.len() as f64 / (embedded.commits() - commits) as f64
                )
            } else {
                "–".into()
            };
            lat.sort();
            let us = |d: Duration| d.as_secs_f64() * 1e6;
            println!(
                "| {n} | {name} | {} | {:.1} / {:.1} / {:.0} | {:.0} | {per_commit} |",
                lat.len(),
                us(percentile(&lat, 0.5)),
                us(percentile(&lat, 0.99)),
                us(*lat.last().unwrap()),
                lat.len() as f64 / wall.as_secs_f64()
            );
        }
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // Under target/ (a real disk), not a tmpfs.
    let dir: PathBuf =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("bench-store-{}", std::process::id()));
    let mut c = Criterion::default().configure_from_args();
    let embedded = Arc::new(EmbeddedStore::open(&dir.join("writes")).unwrap());
    let redis = redis_url(&rt);
    if redis.is_none() {
        eprintln!("BOSHMUX_TEST_REDIS_URL is not set: the Redis store is left out");
    }
    let stores = stores(&rt, &embedded, redis.as_deref());
    writes(&mut c, &rt, &stores);
    let sizes = load(&mut c, &rt, &dir);
    if let Some(url) = &redis {
        load_redis(&mut c, &rt, url);
    }
    c.final_summary();
    // Only in a real run (`cargo bench`), not when `cargo test --benches` checks the bench.
    if std::env::args().any(|a| a == "--bench") {
        latency_table(&rt, &stores, &embedded);
        println!("\n1000 sessions (2 requests of 600 B, 4 KiB caches, 200 B meta each):");
        for (when, bytes) in sizes {
            println!("  files: {when}: {} KiB", bytes / 1024);
        }
    }
    drop((stores, embedded));
    let _ = std::fs::remove_dir_all(&dir);
    // Empties database 3 again.
    drop(redis.map(|_| redis_url(&rt)));
}
