//! Rate limits for log lines that outsiders can trigger at will (refused connections, bad
//! frames): one line per interval per kind, with a count of what was left out, so a flood of
//! garbage cannot fill the disk or drown the lines that matter.

use std::collections::HashMap;
use std::net::IpAddr;
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

/// Most source addresses [`PerSource`] tracks at once; beyond that (a flood from many
/// addresses within one interval) further lines are dropped, still counted by the counters.
pub const MAX_SOURCES: usize = 1024;

/// Like [`LogRate`], but one line per [`LOG_INTERVAL`] for each source address: a noisy source
/// cannot hide another one.
#[derive(Debug, Default)]
pub struct PerSource {
    /// Per address: when a line was last let through, and how many were held back since.
    state: Mutex<HashMap<IpAddr, (Instant, u64)>>,
}

impl PerSource {
    /// `Some(held_back)` if a line about `ip` may be logged now, `None` if not.
    pub fn allow(&self, ip: IpAddr) -> Option<u64> {
        let mut m = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        if m.len() >= MAX_SOURCES && !m.contains_key(&ip) {
            m.retain(|_, (last, _)| now.duration_since(*last) < LOG_INTERVAL);
            if m.len() >= MAX_SOURCES {
                return None;
            }
        }
        match m.get_mut(&ip) {
            Some((last, held)) if now.duration_since(*last) < LOG_INTERVAL => {
                *held += 1;
                None
            }
            Some(entry) => {
                let held = entry.1;
                *entry = (now, 0);
                Some(held)
            }
            None => {
                m.insert(ip, (now, 0));
                Some(0)
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

    #[test]
    fn per_source_limits_each_address_apart_and_stays_bounded() {
        let r = PerSource::default();
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        assert_eq!(r.allow(a), Some(0));
        assert_eq!(r.allow(a), None);
        assert_eq!(r.allow(b), Some(0), "a noisy source does not hide another");
        for i in 0..(2 * MAX_SOURCES as u32) {
            let _ = r.allow(IpAddr::from(std::net::Ipv4Addr::from(0x0b00_0000 + i)));
        }
        assert!(r.state.lock().unwrap().len() <= MAX_SOURCES);
    }
}
