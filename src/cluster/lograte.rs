//! Rate limits for log lines that outsiders can trigger at will (refused connections, bad
//! frames): one line per interval per kind, with a count of what was left out, so a flood of
//! garbage cannot fill the disk or drown the lines that matter.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// One line per this interval for each rate-limited kind of event.
pub const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Lets through one log line per [`LOG_INTERVAL`] and counts the rest.
#[derive(Debug, Default)]
pub struct LogRate {
    /// When a line was last let through, and how many were held back since.
    state: Mutex<(Option<Instant>, u64)>,
}

impl LogRate {
    /// `Some(held_back)` if a line may be logged now (`held_back`: lines suppressed since the
    /// last one, to mention in it); `None` if this one must be suppressed.
    pub fn allow(&self) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        match s.0 {
            Some(last) if now.duration_since(last) < LOG_INTERVAL => {
                s.1 += 1;
                None
            }
            _ => {
                let held = s.1;
                *s = (Some(now), 0);
                Some(held)
            }
        }
    }
}

/// " (N similar lines suppressed)" or nothing, to append to a rate-limited line.
pub fn suppressed(held: u64) -> String {
    if held == 0 {
        String::new()
    } else {
        format!(" ({held} similar lines suppressed in the last {LOG_INTERVAL:?})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_and_a_count_of_the_rest() {
        let r = LogRate::default();
        assert_eq!(r.allow(), Some(0));
        assert_eq!(r.allow(), None);
        assert_eq!(r.allow(), None);
        // Pretend the interval passed.
        r.state.lock().unwrap().0 = Some(Instant::now() - LOG_INTERVAL);
        assert_eq!(r.allow(), Some(2));
        assert_eq!(suppressed(0), "");
        assert!(suppressed(2).starts_with(" (2 similar"));
    }
}
