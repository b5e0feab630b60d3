//! The daemon's counters and latency histograms, rendered in the Prometheus text format at
//! `GET /metrics`. Lock-free atomics: recording costs a few instructions on the hot paths.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

use crate::bosh::DropReason;

/// Upper bounds of the latency buckets, seconds.
const BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    10.0, 60.0,
];

/// A latency histogram with fixed buckets.
#[derive(Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    /// Sum in nanoseconds.
    sum_ns: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(
            u64::try_from(d.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, bound) in BUCKETS.iter().enumerate() {
            cumulative += self.counts[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
    }
}

/// Everything counted. Shared by the registry, the session actors, the BOSH schedulers and the
/// page tasks of one daemon.
#[derive(Default)]
pub struct Metrics {
    /// New upstream BOSH requests.
    pub upstream_requests: AtomicU64,
    /// Upstream resends after transport failures.
    pub upstream_retries: AtomicU64,
    /// HTTP requests actually posted upstream (new ones and resends), counted once the
    /// write-ahead record or the epoch check let them go: what a fenced node must never add to.
    pub upstream_posts: AtomicU64,
    /// Sessions this node adopted from a dead or departed cluster node (SPEC §12).
    pub cluster_adoptions: AtomicU64,
    /// Times this node found its cluster lease lost and let its sessions go.
    pub cluster_leases_lost: AtomicU64,
    /// Times the cluster store was found emptied and this node wrote its sessions back.
    pub cluster_store_lost: AtomicU64,
    /// API requests sent on to the node that owns the session.
    pub cluster_forwarded: AtomicU64,
    /// Pages on this node relayed to a session another node drives, now.
    pub cluster_relayed_pages: AtomicU64,
    /// Held upstream requests cut by something in between and resent (SPEC §7); not retries.
    pub upstream_cuts: AtomicU64,
    /// Stanzas received from upstream.
    pub stanzas_in: AtomicU64,
    /// Stanzas sent upstream.
    pub stanzas_out: AtomicU64,
    /// Frames written to pages.
    pub frames_to_pages: AtomicU64,
    /// Messages buffered while no page was attached.
    pub buffered: AtomicU64,
    /// Messages dropped because a buffer was full.
    pub buffer_dropped: AtomicU64,
    /// Pages closed for reading too slowly (4002).
    pub slow_page_closes: AtomicU64,
    /// Logins (first ones and re-logins) that succeeded.
    pub logins: AtomicU64,
    /// Re-logins after an upstream session was lost.
    pub relogins: AtomicU64,
    /// Pages rejected for a hostile or malformed frame.
    pub rejected_frames: AtomicU64,
    /// Session store writes that failed (store unreachable or full); the session went on
    /// without the durability of that write (SPEC §8).
    pub store_errors: AtomicU64,
    /// Upstream sessions lost, by terminal condition.
    terminal: Mutex<Vec<(String, u64)>>,
    /// Inbound stanzas dropped by the response reader, by [`DropReason`] (in its order).
    inbound_dropped: [AtomicU64; 3],
    /// Round trip of upstream requests that carried stanzas.
    pub upstream_latency: Histogram,
    /// From a stanza's arrival at the session to its frame written to a page's socket.
    pub fanout_latency: Histogram,
}

impl Metrics {
    /// Counts one stanza dropped from an upstream response.
    pub fn inbound_dropped(&self, reason: DropReason) {
        self.inbound_dropped[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Stanzas dropped from upstream responses for `reason` so far.
    pub fn inbound_dropped_count(&self, reason: DropReason) -> u64 {
        self.inbound_dropped[reason as usize].load(Ordering::Relaxed)
    }

    /// Counts one terminal upstream error under `condition`.
    pub fn terminal_error(&self, condition: &str) {
        let mut t = self.terminal.lock();
        match t.iter_mut().find(|(c, _)| c == condition) {
            Some((_, n)) => *n += 1,
            None => t.push((condition.to_owned(), 1)),
        }
    }

    /// The Prometheus text exposition, with the gauges given by the caller.
    pub fn render(&self, sessions: usize, pages: usize) -> String {
        let mut out = String::with_capacity(4096);
        let gauge = |out: &mut String, name: &str, help: &str, v: usize| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        gauge(
            &mut out,
            "boshmux_sessions",
            "Live user sessions (one upstream BOSH session each).",
            sessions,
        );
        gauge(
            &mut out,
            "boshmux_pages",
            "Pages (WebSockets) attached.",
            pages,
        );
        gauge(
            &mut out,
            "boshmux_cluster_relayed_pages",
            "Pages on this node relayed to a session another cluster node drives.",
            self.cluster_relayed_pages.load(Ordering::Relaxed) as usize,
        );
        let counters: [(&str, &str, &AtomicU64); 18] = [
            (
                "boshmux_cluster_adoptions_total",
                "Sessions adopted from a dead or departed cluster node.",
                &self.cluster_adoptions,
            ),
            (
                "boshmux_cluster_leases_lost_total",
                "Times this node found its cluster lease lost and let its sessions go.",
                &self.cluster_leases_lost,
            ),
            (
                "boshmux_cluster_store_lost_total",
                "Times the cluster store was found emptied and the sessions written back.",
                &self.cluster_store_lost,
            ),
            (
                "boshmux_cluster_forwarded_total",
                "API requests sent on to the node that owns the session.",
                &self.cluster_forwarded,
            ),
            (
                "boshmux_upstream_posts_total",
                "HTTP requests posted upstream (new and resent), after the store let them go.",
                &self.upstream_posts,
            ),
            (
                "boshmux_upstream_requests_total",
                "New upstream BOSH requests.",
                &self.upstream_requests,
            ),
            (
                "boshmux_upstream_retries_total",
                "Upstream requests resent after a transport failure.",
                &self.upstream_retries,
            ),
            (
                "boshmux_upstream_cuts_total",
                "Held upstream requests cut by a proxy after being held, and resent.",
                &self.upstream_cuts,
            ),
            (
                "boshmux_stanzas_in_total",
                "Stanzas received from upstream.",
                &self.stanzas_in,
            ),
            (
                "boshmux_stanzas_out_total",
                "Stanzas sent upstream.",
                &self.stanzas_out,
            ),
            (
                "boshmux_frames_to_pages_total",
                "Frames written to pages.",
                &self.frames_to_pages,
            ),
            (
                "boshmux_buffered_total",
                "Messages buffered while no page was attached.",
                &self.buffered,
            ),
            (
                "boshmux_buffer_dropped_total",
                "Messages dropped because the buffer was full.",
                &self.buffer_dropped,
            ),
            (
                "boshmux_slow_page_closes_total",
                "Pages closed with 4002 for reading too slowly.",
                &self.slow_page_closes,
            ),
            (
                "boshmux_logins_total",
                "Successful upstream logins.",
                &self.logins,
            ),
            (
                "boshmux_relogins_total",
                "Re-logins after an upstream session was lost.",
                &self.relogins,
            ),
            (
                "boshmux_rejected_frames_total",
                "Frames from pages refused as malformed or hostile.",
                &self.rejected_frames,
            ),
            (
                "boshmux_store_errors_total",
                "Session store writes that failed; the session went on without them.",
                &self.store_errors,
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
        let name = "boshmux_upstream_terminal_errors_total";
        let _ = writeln!(
            out,
            "# HELP {name} Upstream sessions lost, by condition.\n# TYPE {name} counter"
        );
        for (condition, n) in self.terminal.lock().iter() {
            let _ = writeln!(
                out,
                "{name}{{condition=\"{}\"}} {n}",
                escape_label(condition)
            );
        }
        let name = "boshmux_inbound_stanzas_dropped_total";
        let _ = writeln!(
            out,
            "# HELP {name} Stanzas from upstream dropped (too large, or refused by the strict parser), by reason.\n# TYPE {name} counter"
        );
        for reason in [
            DropReason::TooLarge,
            DropReason::BodyFull,
            DropReason::Invalid,
        ] {
            let _ = writeln!(
                out,
                "{name}{{reason=\"{}\"}} {}",
                reason.label(),
                self.inbound_dropped_count(reason)
            );
        }
        self.upstream_latency.render(
            &mut out,
            "boshmux_upstream_request_seconds",
            "Round trip of upstream requests that carried stanzas.",
        );
        self.fanout_latency.render(
            &mut out,
            "boshmux_fanout_seconds",
            "From a stanza reaching its session to its frame written to a page.",
        );
        out
    }
}

/// Appends the gauges of pages that speak BOSH (SPEC §4b) to a [`Metrics::render`] output:
/// `boshmux_bosh_pages`, the virtual BOSH sessions of pages (attached, authenticating, or
/// prebound and not used yet), and `boshmux_prebinds_unused`, the prebinds no page has used yet
/// (each counts against `pages_per_user` until it is used or expires).
pub fn render_bosh_pages(out: &mut String, bosh_pages: usize, prebinds_unused: usize) {
    for (name, help, v) in [
        (
            "boshmux_bosh_pages",
            "Virtual BOSH sessions of pages (attached, authenticating, or prebound and unused).",
            bosh_pages,
        ),
        (
            "boshmux_prebinds_unused",
            "Prebinds no page has used yet.",
            prebinds_unused,
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn escape_label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_text_format() {
        let m = Metrics::default();
        m.upstream_requests.fetch_add(3, Ordering::Relaxed);
        m.upstream_cuts.fetch_add(4, Ordering::Relaxed);
        m.store_errors.fetch_add(4, Ordering::Relaxed);
        m.terminal_error("item-not-found");
        m.terminal_error("item-not-found");
        m.fanout_latency.observe(Duration::from_micros(300));
        m.fanout_latency.observe(Duration::from_millis(20));
        let text = m.render(2, 5);
        assert!(text.contains("# TYPE boshmux_sessions gauge\nboshmux_sessions 2\n"));
        assert!(text.contains("boshmux_pages 5\n"));
        assert!(text.contains("boshmux_upstream_requests_total 3\n"));
        assert!(text.contains(
            "# TYPE boshmux_upstream_cuts_total counter\nboshmux_upstream_cuts_total 4\n"
        ));
        assert!(
            text.contains(
                "# TYPE boshmux_store_errors_total counter\nboshmux_store_errors_total 4\n"
            )
        );
        assert!(
            text.contains(
                "boshmux_upstream_terminal_errors_total{condition=\"item-not-found\"} 2\n"
            )
        );
        assert!(text.contains("boshmux_fanout_seconds_bucket{le=\"0.00025\"} 0\n"));
        assert!(text.contains("boshmux_fanout_seconds_bucket{le=\"0.0005\"} 1\n"));
        assert!(text.contains("boshmux_fanout_seconds_bucket{le=\"0.025\"} 2\n"));
        let mut bosh = String::new();
        render_bosh_pages(&mut bosh, 3, 1);
        assert_eq!(
            bosh.lines()
                .filter(|l| !l.starts_with('#'))
                .collect::<Vec<_>>(),
            ["boshmux_bosh_pages 3", "boshmux_prebinds_unused 1"]
        );
        assert!(text.contains("boshmux_fanout_seconds_bucket{le=\"+Inf\"} 2\nboshmux_fanout_seconds_sum 0.0203\nboshmux_fanout_seconds_count 2\n"));
    }
}
