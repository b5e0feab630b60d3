//! SPEC §8: the embedded store keeps every acknowledged write through `kill -9`. This test runs
//! its own binary again as a child (the `crash_child` test, told the directory by an environment
//! variable) that writes requests and marks for several sessions and prints each write once the
//! store has acknowledged it; the parent kills it with SIGKILL at a few different moments,
//! reopens the directory and checks every acknowledged write is there.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use boshmux::store::{Store, Write};
use bytes::Bytes;

/// Names the store directory, for the child only.
const DIR_VAR: &str = "BOSHMUX_TEST_STORE_CRASH_DIR";
/// Sessions the child writes to at once.
const SESSIONS: usize = 8;
/// Marks each acknowledgement on the child's stdout (which the test harness shares).
const ACK: &str = "ack:";

/// The write-ahead record of `rid` (about 600 bytes, different for every session and rid).
fn body(bare: &str, rid: u64) -> Bytes {
    let text = format!(
        "<body xmlns='http://jabber.org/protocol/httpbind' rid='{rid}' sid='sid-{bare}'>\
         <message xmlns='jabber:client' to='{bare}' type='chat' id='m{rid}'><body>{}</body>\
         </message></body>",
        format!("{rid:x}-{bare}-").repeat(24)
    );
    Bytes::from(text[..text.len().min(600)].to_owned())
}

/// The caches written with mark `rid`: saying which mark they go with.
fn caches(rid: u64) -> Bytes {
    Bytes::from(format!("caches as of mark {rid}"))
}

/// The child: writes until killed (or for a minute, should the parent be gone).
#[test]
fn crash_child() {
    let Some(dir) = std::env::var_os(DIR_VAR) else {
        return; // run by the parent only
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let store = Store::open(dir.to_str().unwrap()).unwrap();
        let snap = store.load().await.unwrap();
        let mut tasks = Vec::new();
        for i in 0..SESSIONS {
            let bare = format!("u{i}@crash.example");
            // Carry on from what a previous (killed) child left.
            let (s, mut rid) = match snap.sessions.iter().find(|r| r.bare == bare) {
                Some(r) => {
                    let last = r.requests.last().map_or(r.handed_on, |(rid, _)| *rid);
                    (store.take_over(r).await.unwrap(), last)
                }
                None => (
                    store.create(&bare, Bytes::from("meta"), 0).await.unwrap(),
                    0,
                ),
            };
            tasks.push(tokio::spawn(async move {
                let deadline = Instant::now() + Duration::from_secs(60);
                while Instant::now() < deadline {
                    rid += 1;
                    s.request(rid, body(&bare, rid)).await.unwrap();
                    println!("{ACK} request {bare} {rid}");
                    if rid > 2 {
                        let mark = rid - 2;
                        s.write(Write::HandedOn {
                            rid: mark,
                            caches: Some(caches(mark)),
                        })
                        .await
                        .unwrap();
                        println!("{ACK} mark {bare} {mark}");
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
}

/// What the child acknowledged, per session.
#[derive(Default, Debug)]
struct Acked {
    /// Rids whose write-ahead records were acknowledged.
    requests: Vec<u64>,
    /// The highest acknowledged mark.
    mark: u64,
}

#[test]
fn acknowledged_writes_survive_kill_9() {
    let root = std::env::temp_dir().join(format!("boshmux-crash-{}", uuid::Uuid::new_v4()));
    let dir: PathBuf = root.join("store");
    let mut acked: HashMap<String, Acked> = HashMap::new();
    // Kill after this many acknowledgements, each round carrying on from the previous one's
    // store: early (sessions just created or taken over), and later at different points.
    for kill_after in [120, 400, 900, 250, 1500] {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
            .env(DIR_VAR, &dir)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut seen = 0;
        let mut line = String::new();
        let record = |line: &str, acked: &mut HashMap<String, Acked>| -> bool {
            // Only whole lines: one cut by the kill was not printed in full.
            let Some(at) = line.find(ACK).filter(|_| line.ends_with('\n')) else {
                return false;
            };
            let words: Vec<&str> = line[at + ACK.len()..].split_whitespace().collect();
            let [what, bare, rid] = words[..] else {
                panic!("unexpected line from the child: {line:?}")
            };
            let rid: u64 = rid.parse().unwrap();
            let a = acked.entry(bare.to_owned()).or_default();
            match what {
                "request" => a.requests.push(rid),
                "mark" => a.mark = a.mark.max(rid),
                _ => panic!("unexpected line from the child: {line:?}"),
            }
            true
        };
        while seen < kill_after {
            line.clear();
            if out.read_line(&mut line).unwrap() == 0 {
                panic!("the child stopped after {seen} acknowledgements");
            }
            seen += usize::from(record(&line, &mut acked));
        }
        // SIGKILL on Unix: no destructor, no checkpoint, no clean close.
        child.kill().unwrap();
        let status = child.wait().unwrap();
        assert!(!status.success(), "the child was killed: {status:?}");
        // What it printed before dying was acknowledged too.
        loop {
            line.clear();
            if out.read_line(&mut line).unwrap() == 0 {
                break;
            }
            seen += usize::from(record(&line, &mut acked));
        }
        check(&dir, &acked, seen);
    }
    std::fs::remove_dir_all(&root).unwrap();
}

/// Reopens the store in `dir` and checks every acknowledged write is in it.
fn check(dir: &std::path::Path, acked: &HashMap<String, Acked>, seen: usize) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let store = Store::open(dir.to_str().unwrap()).unwrap();
    let snap = rt.block_on(store.load()).unwrap();
    let stored: BTreeMap<&str, _> = snap.sessions.iter().map(|r| (r.bare.as_str(), r)).collect();
    assert_eq!(stored.len(), SESSIONS, "after {seen} acknowledgements");
    for (bare, a) in acked {
        let r = stored[bare.as_str()];
        assert!(
            r.handed_on >= a.mark,
            "{bare}: mark {} stored, {} acknowledged",
            r.handed_on,
            a.mark
        );
        let want = if r.handed_on == 0 {
            Bytes::new()
        } else {
            caches(r.handed_on)
        };
        assert_eq!(r.caches, want, "{bare}: the caches go with the mark");
        let requests: BTreeMap<u64, &Bytes> = r.requests.iter().map(|(k, v)| (*k, v)).collect();
        for &rid in a.requests.iter().filter(|&&rid| rid > r.handed_on) {
            assert_eq!(
                requests.get(&rid).copied(),
                Some(&body(bare, rid)),
                "{bare}: acknowledged request {rid} (mark {})",
                r.handed_on
            );
        }
        for (rid, bytes) in &r.requests {
            assert!(*rid > r.handed_on, "{bare}: {rid} kept below the mark");
            assert_eq!(bytes, &body(bare, *rid), "{bare}: request {rid} altered");
        }
    }
}
