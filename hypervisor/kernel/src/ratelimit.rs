//! Log rate limiting for events a guest or a device can repeat at will (unknown hypercalls,
//! faults of unattached devices): the first [`RateLimit::FIRST`] are logged, then one line at
//! each power-of-two count, which reports how many were suppressed since the previous line.
//! The output stays logarithmic in the number of events, whatever their rate.

use core::sync::atomic::{AtomicU64, Ordering};

/// A counter of one kind of event.
pub struct RateLimit {
    count: AtomicU64,
}

/// Whether to log the event just counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Log it; `suppressed` events of this kind were not logged since the previous line.
    Log {
        /// This event's number (1 = the first).
        nth: u64,
        /// Events not logged since the previous logged one.
        suppressed: u64,
    },
    /// Do not log it.
    Suppress,
}

impl RateLimit {
    /// Events logged unconditionally before the power-of-two rule starts.
    pub const FIRST: u64 = 8;

    /// No events yet.
    pub const fn new() -> Self {
        Self {
            count: AtomicU64::new(0),
        }
    }

    /// Counts one event and says whether to log it.
    pub fn event(&self) -> Verdict {
        let nth = self.count.fetch_add(1, Ordering::Relaxed).saturating_add(1);
        if nth <= Self::FIRST {
            return Verdict::Log { nth, suppressed: 0 };
        }
        if !nth.is_power_of_two() {
            return Verdict::Suppress;
        }
        // The previous logged event was nth / 2 (or FIRST when that is smaller).
        let prev = (nth / 2).max(Self::FIRST);
        Verdict::Log {
            nth,
            suppressed: nth - prev - 1,
        }
    }
}
