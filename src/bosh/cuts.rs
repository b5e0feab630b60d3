//! Held requests cut by something between the daemon and the connection manager (SPEC §7): a
//! reverse proxy's read timeout (nginx's `proxy_read_timeout`, 60 s by default) or a load
//! balancer's idle timeout ends a request the server is holding for up to `wait`. The transport
//! tells such a cut from a failure by how long the request had been on the wire
//! ([`CUT_MIN_HELD`]); the scheduler resends it at once with the same rid, outside the retry
//! budget. This module learns from the cuts' durations: when they recur at a steady duration
//! below `wait`, the next session should ask for a `wait` the proxy lets through.
//!
//! Pure logic on durations; the scheduler feeds it and logs what it finds.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// The least time a request must have been on the wire for a failure before any response to be
/// a cut rather than a failure. A refused or reset connection fails within a round trip
/// (milliseconds), while no proxy's idle timeout is under a few seconds; and since every cut
/// resend must again be held this long before it can be cut, cuts cannot spin (at most one resend
/// per second per session). A fixed floor rather than a fraction of `wait`: a proxy cutting at
/// 3 s must be recognised under a 60 s `wait`.
pub const CUT_MIN_HELD: Duration = Duration::from_secs(1);

/// Cuts in a row at one duration that make a pattern worth acting on.
pub const STEADY_CUTS: usize = 3;

/// How far apart cuts may fall and still count as "the same" duration: half a second (our
/// measurement includes connection setup and scheduling) plus a tenth of the duration (a proxy's
/// timer may start at its own read of the request, not at our send).
fn tolerance(d: Duration) -> Duration {
    Duration::from_millis(500) + d / 10
}

/// A `wait` learned from cuts, in seconds, shared by every session one
/// [`BoshClient`](super::BoshClient) creates (clones share it). Only ever lowered, for the life of
/// the process: a daemon that learned it restarts to forget it.
#[derive(Clone, Debug, Default)]
pub struct WaitHint(Arc<AtomicU32>);

impl WaitHint {
    /// The learned `wait` in seconds, if any.
    pub fn get(&self) -> Option<u32> {
        match self.0.load(Ordering::Relaxed) {
            0 => None,
            w => Some(w),
        }
    }

    /// Lowers the learned `wait` to `wait` seconds (at least 1); a higher value changes nothing.
    pub fn lower_to(&self, wait: u32) {
        let wait = wait.max(1);
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |cur| {
                (cur == 0 || wait < cur).then_some(wait)
            });
    }

    /// The `wait` a new session asks for, seconds: `configured`, or the learned one when lower.
    pub fn wait_to_ask(&self, configured: u32) -> u32 {
        self.get()
            .map_or(configured, |learned| learned.min(configured))
    }
}

/// What a steady series of cuts showed, for the `warn` line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Steady {
    /// The shortest of the [`STEADY_CUTS`] cuts: the proxy gives up no later than this.
    pub cut_after: Duration,
    /// The `wait` of the session that saw them, seconds.
    pub wait: u32,
    /// The `wait` the next session will ask for, seconds: `cut_after` less one second, rounded
    /// down, at least 1 (the server answers at `wait` after its receipt, while the proxy's timer
    /// started before that and our measure includes connection setup).
    pub next_wait: u32,
}

/// Watches the cuts of one session.
#[derive(Debug)]
pub struct CutDetector {
    /// The session's `wait`, seconds.
    wait: u32,
    /// Durations of the latest cuts, oldest first, at most [`STEADY_CUTS`].
    recent: VecDeque<Duration>,
    /// Set once a pattern was found: it is reported once per session.
    found: bool,
    hint: WaitHint,
}

impl CutDetector {
    /// A detector for a session granted `wait` seconds, lowering `hint` when it finds a pattern.
    pub fn new(wait: u32, hint: WaitHint) -> Self {
        CutDetector {
            wait,
            recent: VecDeque::with_capacity(STEADY_CUTS),
            found: false,
            hint,
        }
    }

    /// Records a cut after `held`. Returns the pattern the first time in this session that the
    /// last [`STEADY_CUTS`] cuts fall within [`tolerance`] of each other at a duration that a
    /// shorter `wait` would avoid, and lowers the shared hint to its `next_wait` then. A `held`
    /// under [`CUT_MIN_HELD`] is no cut and is ignored.
    pub fn record(&mut self, held: Duration) -> Option<Steady> {
        if held < CUT_MIN_HELD {
            return None;
        }
        if self.recent.len() == STEADY_CUTS {
            self.recent.pop_front();
        }
        self.recent.push_back(held);
        if self.found || self.recent.len() < STEADY_CUTS {
            return None;
        }
        let lo = *self.recent.iter().min().expect("full");
        let hi = *self.recent.iter().max().expect("full");
        if hi - lo > tolerance(lo) {
            return None;
        }
        let next_wait = u32::try_from(lo.saturating_sub(Duration::from_secs(1)).as_secs())
            .unwrap_or(u32::MAX)
            .max(1);
        // A cut at or past `wait` + 1 s is no proxy timeout that a shorter `wait` would avoid.
        if next_wait >= self.wait {
            return None;
        }
        self.found = true;
        self.hint.lower_to(next_wait);
        Some(Steady {
            cut_after: lo,
            wait: self.wait,
            next_wait,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn three_steady_cuts_below_wait_are_reported_once_and_lower_the_hint() {
        let hint = WaitHint::default();
        let mut d = CutDetector::new(60, hint.clone());
        assert_eq!(d.record(ms(3_020)), None);
        assert_eq!(d.record(ms(3_010)), None);
        assert_eq!(hint.get(), None, "two cuts are no pattern yet");
        assert_eq!(
            d.record(ms(3_050)),
            Some(Steady {
                cut_after: ms(3_010),
                wait: 60,
                next_wait: 2
            })
        );
        assert_eq!(hint.get(), Some(2));
        assert_eq!(hint.wait_to_ask(60), 2);
        for _ in 0..5 {
            assert_eq!(d.record(ms(3_000)), None, "once per session");
        }
    }

    #[test]
    fn scattered_cuts_are_no_pattern_until_three_in_a_row_agree() {
        let hint = WaitHint::default();
        let mut d = CutDetector::new(60, hint.clone());
        for held in [2_000, 9_000, 30_000, 5_000, 44_000] {
            assert_eq!(d.record(ms(held)), None, "{held} ms");
        }
        assert_eq!(d.record(ms(44_500)), None);
        let steady = d
            .record(ms(48_000))
            .expect("44, 44.5, 48 s are within 0.5 s + 10 %");
        assert_eq!(steady.next_wait, 43);
        assert_eq!(hint.get(), Some(43));
    }

    #[test]
    fn a_window_of_three_slides_over_older_cuts() {
        let mut d = CutDetector::new(30, WaitHint::default());
        assert_eq!(d.record(ms(20_000)), None);
        assert_eq!(d.record(ms(5_000)), None);
        assert_eq!(d.record(ms(5_100)), None, "20 s is still in the window");
        assert_eq!(d.record(ms(5_050)).map(|s| s.next_wait), Some(4));
    }

    #[test]
    fn cuts_at_the_wait_itself_ask_for_a_second_less_and_later_ones_for_nothing() {
        // nginx's 60 s read timeout against a 60 s wait: the two race.
        let mut d = CutDetector::new(60, WaitHint::default());
        for held in [60_050, 60_020] {
            assert_eq!(d.record(ms(held)), None);
        }
        assert_eq!(d.record(ms(60_100)).map(|s| s.next_wait), Some(59));

        // Cut after the server should have answered: a shorter wait would not help.
        let hint = WaitHint::default();
        let mut d = CutDetector::new(10, hint.clone());
        for held in [11_500, 11_600, 11_550] {
            assert_eq!(d.record(ms(held)), None);
        }
        assert_eq!(hint.get(), None);
    }

    #[test]
    fn the_next_wait_is_at_least_one_second_and_below_the_current_one() {
        let mut d = CutDetector::new(10, WaitHint::default());
        d.record(ms(1_500));
        d.record(ms(1_600));
        assert_eq!(d.record(ms(1_550)).map(|s| s.next_wait), Some(1));

        // Already at 1 s: nothing shorter to ask for.
        let mut d = CutDetector::new(1, WaitHint::default());
        for held in [1_500, 1_600, 1_550] {
            assert_eq!(d.record(ms(held)), None);
        }
    }

    #[test]
    fn failures_shorter_than_the_floor_are_not_cuts() {
        let mut d = CutDetector::new(60, WaitHint::default());
        for _ in 0..10 {
            assert_eq!(d.record(ms(5)), None);
        }
        assert_eq!(d.record(ms(999)), None);
        assert!(d.recent.is_empty());
    }

    #[test]
    fn the_hint_only_goes_down_and_never_raises_the_configured_wait() {
        let hint = WaitHint::default();
        assert_eq!(hint.wait_to_ask(60), 60);
        hint.lower_to(20);
        hint.lower_to(45);
        assert_eq!(hint.get(), Some(20));
        assert_eq!(
            hint.wait_to_ask(10),
            10,
            "a configured wait below the hint stands"
        );
        hint.lower_to(0);
        assert_eq!(hint.get(), Some(1), "at least one second");
        let clone = hint.clone();
        clone.lower_to(1);
        assert_eq!(hint.wait_to_ask(60), 1, "clones share the hint");
    }
}
