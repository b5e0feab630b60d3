//! What `boshmux load` reports: a table for people, the same as JSON for tools, and a progress
//! line every second while it runs.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde::Serialize;

use super::{LoadArgs, Shared};

/// Latency percentiles, milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Percentiles {
    /// Observations.
    pub count: usize,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
}

impl Percentiles {
    fn of(mut micros: Vec<u64>) -> Percentiles {
        if micros.is_empty() {
            return Percentiles::default();
        }
        micros.sort_unstable();
        let at = |q: f64| {
            let i = ((micros.len() as f64 * q).ceil() as usize).clamp(1, micros.len()) - 1;
            micros[i] as f64 / 1000.0
        };
        Percentiles {
            count: micros.len(),
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            max: micros[micros.len() - 1] as f64 / 1000.0,
        }
    }
}

/// CPU and memory of a watched process over the run.
#[derive(Debug, Clone, Serialize)]
pub struct Watched {
    /// The process.
    pub pid: u32,
    /// CPU seconds (user + system) used during the run.
    pub cpu_seconds: Option<f64>,
    /// Resident memory at the end, KiB.
    pub rss_kib: Option<u64>,
}

/// The result of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// `boshmux` or `direct`.
    pub mode: &'static str,
    /// Users.
    pub users: usize,
    /// Pages per user.
    pub pages_per_user: usize,
    /// Messages per second asked for.
    pub rate: f64,
    /// Sending time, seconds.
    pub duration_secs: f64,
    /// Pages that completed the handshake.
    pub pages_joined: u64,
    /// From opening a page to its bound resource.
    pub join_ms: Percentiles,
    /// Messages sent.
    pub messages_sent: u64,
    /// Deliveries expected: each message to every page of its recipient.
    pub deliveries_expected: u64,
    /// Deliveries seen.
    pub deliveries: u64,
    /// From sending a message to a page receiving it.
    pub latency_ms: Percentiles,
    /// Errors by kind.
    pub errors: BTreeMap<String, u64>,
    /// Upstream BOSH requests made during the run (the daemon's, or all direct sessions').
    pub upstream_requests: Option<u64>,
    /// The same per minute of run time.
    pub upstream_requests_per_minute: Option<f64>,
    /// Watched processes.
    pub watched: Vec<Watched>,
    /// Whole run, seconds.
    pub elapsed_secs: f64,
}

impl Report {
    pub(crate) fn build(
        args: &LoadArgs,
        shared: &Shared,
        expected: u64,
        upstream_requests: Option<u64>,
        watched: Vec<Watched>,
    ) -> Report {
        let elapsed = shared.start.elapsed().as_secs_f64();
        Report {
            mode: if args.direct.is_some() {
                "direct"
            } else {
                "boshmux"
            },
            users: args.users,
            pages_per_user: args.pages,
            rate: args.rate,
            duration_secs: args.duration.as_secs_f64(),
            pages_joined: shared.joined.load(Ordering::Relaxed),
            join_ms: Percentiles::of(shared.join_us.lock().clone()),
            messages_sent: shared.sent.load(Ordering::Relaxed),
            deliveries_expected: expected,
            deliveries: shared.delivered.load(Ordering::Relaxed),
            latency_ms: Percentiles::of(shared.latency_us.lock().clone()),
            errors: shared.errors.0.lock().clone(),
            upstream_requests,
            upstream_requests_per_minute: upstream_requests
                .map(|r| r as f64 * 60.0 / elapsed.max(0.001)),
            watched,
            elapsed_secs: elapsed,
        }
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pct =
            |p: &Percentiles| format!("{:.2} / {:.2} / {:.2} / {:.2}", p.p50, p.p90, p.p99, p.max);
        writeln!(f, "mode                     {}", self.mode)?;
        writeln!(
            f,
            "users × pages            {} × {}",
            self.users, self.pages_per_user
        )?;
        writeln!(f, "pages joined             {}", self.pages_joined)?;
        writeln!(f, "join ms p50/p90/p99/max  {}", pct(&self.join_ms))?;
        writeln!(
            f,
            "messages sent            {} ({} msg/s for {:.0} s)",
            self.messages_sent, self.rate, self.duration_secs
        )?;
        writeln!(
            f,
            "deliveries               {} of {} expected",
            self.deliveries, self.deliveries_expected
        )?;
        writeln!(f, "latency ms p50/p90/p99/max {}", pct(&self.latency_ms))?;
        match (self.upstream_requests, self.upstream_requests_per_minute) {
            (Some(r), Some(m)) => writeln!(f, "upstream requests        {r} ({m:.0}/min)")?,
            _ => writeln!(f, "upstream requests        unknown")?,
        }
        for w in &self.watched {
            writeln!(
                f,
                "process {:<8}         {} CPU s, {} KiB resident",
                w.pid,
                w.cpu_seconds.map_or("?".into(), |c| format!("{c:.2}")),
                w.rss_kib.map_or("?".into(), |r| r.to_string())
            )?;
        }
        if self.errors.is_empty() {
            writeln!(f, "errors                   none")?;
        }
        for (kind, n) in &self.errors {
            writeln!(f, "error                    {n} × {kind}")?;
        }
        Ok(())
    }
}

/// Prints a progress line every second until aborted.
pub(crate) async fn progress(shared: Arc<Shared>, pages: usize) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    loop {
        tick.tick().await;
        let errors: u64 = shared.errors.0.lock().values().sum();
        eprintln!(
            "[{:>5.1}s] pages {}/{pages}  sent {}  delivered {}  errors {errors}",
            shared.start.elapsed().as_secs_f64(),
            shared.joined.load(Ordering::Relaxed),
            shared.sent.load(Ordering::Relaxed),
            shared.delivered.load(Ordering::Relaxed),
        );
    }
}

/// CPU ticks and resident KiB of a process, from /proc.
pub(crate) fn sample(pid: u32) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())?;
    Some((ticks, rss))
}

/// The change over the run. Linux reports CPU in clock ticks of 1/100 s.
pub(crate) fn watched(pid: u32, before: Option<(u64, u64)>) -> Watched {
    let after = sample(pid);
    Watched {
        pid,
        cpu_seconds: before
            .zip(after)
            .map(|(b, a)| a.0.saturating_sub(b.0) as f64 / 100.0),
        rss_kib: after.map(|a| a.1),
    }
}
