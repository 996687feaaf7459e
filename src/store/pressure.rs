//! Back-pressure: how far behind the database writer and the fan-out are, and when a client's
//! write is refused rather than queued.
//!
//! Writes slow down by themselves when the writer falls behind (SQLite's job queue is bounded,
//! so a request waits to queue; PostgreSQL's pool makes it wait for a connection). A wait
//! without bound only moves the problem into memory and client timeouts, so past a configured
//! depth a new write is refused at once with `429` and `Retry-After`, before anything is
//! stored: `store.max_queue` writes waiting for the database (`baton_writer_queue_depth`),
//! and, for Task writes, `store.max_fanout_lag` committed changes not yet matched and recorded
//! (`baton_fanout_lag_changes`), since every Task write adds a change for the fan-out to
//! catch up on. Notifications themselves are never shed: what is committed is delivered.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::error::{Error, Result};

/// How long a refused client is asked to wait, in seconds: the queue drains in far less
/// when the node is merely busy.
const RETRY_AFTER_SECONDS: u64 = 1;

/// The depths one store's writes are admitted against.
#[derive(Debug)]
pub struct Pressure {
    /// Writes queued for the writer or being applied (SQLite: every job of the writer thread;
    /// PostgreSQL: the client writes in flight on this node).
    queued: AtomicUsize,
    /// Changes committed but not yet matched and recorded, as the matcher last saw them.
    fanout_lag: AtomicU64,
    max_queue: usize,
    max_fanout_lag: u64,
}

/// A write counted in the queue depth until it is dropped.
#[must_use = "the write counts as queued only while this is held"]
pub struct Queued<'a>(&'a Pressure);

/// Which refusals apply to a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteKind {
    /// A Task write: it adds a change, so a fan-out behind refuses it too.
    Task,
    /// A subscription write: only the writer's queue matters.
    Subscription,
}

impl Pressure {
    pub fn new(max_queue: usize, max_fanout_lag: u64) -> Pressure {
        Pressure {
            queued: AtomicUsize::new(0),
            fanout_lag: AtomicU64::new(0),
            max_queue,
            max_fanout_lag,
        }
    }

    /// Refuses a client's write with `429` when the writer's queue or (for Task writes) the
    /// fan-out is past its limit; nothing has been written when it does.
    pub fn admit(&self, kind: WriteKind) -> Result<()> {
        let queued = self.queued.load(Ordering::Relaxed);
        if queued >= self.max_queue {
            metrics::counter!("baton_writes_refused_total", "reason" => "write-queue").increment(1);
            return Err(Error::too_many_requests(
                format!(
                    "the server is busy: {queued} writes are waiting for the database \
                     (store.max_queue is {}); nothing was written, retry shortly",
                    self.max_queue
                ),
                RETRY_AFTER_SECONDS,
            ));
        }
        let lag = self.fanout_lag.load(Ordering::Relaxed);
        if kind == WriteKind::Task && lag >= self.max_fanout_lag {
            metrics::counter!("baton_writes_refused_total", "reason" => "fanout-lag").increment(1);
            return Err(Error::too_many_requests(
                format!(
                    "the server is busy: notifications for {lag} changes are still being \
                     matched (store.max_fanout_lag is {}); nothing was written, retry shortly",
                    self.max_fanout_lag
                ),
                RETRY_AFTER_SECONDS,
            ));
        }
        Ok(())
    }

    /// Counts a write as queued until the returned guard is dropped.
    pub fn enter(&self) -> Queued<'_> {
        let depth = self.queued.fetch_add(1, Ordering::Relaxed) + 1;
        metrics::gauge!("baton_writer_queue_depth").set(depth as f64);
        Queued(self)
    }

    /// Writes waiting for the database now.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// What the matcher saw: `lag` changes committed and not yet recorded.
    pub fn set_fanout_lag(&self, lag: u64) {
        self.fanout_lag.store(lag, Ordering::Relaxed);
        metrics::gauge!("baton_fanout_lag_changes").set(lag as f64);
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        let depth = self.0.queued.fetch_sub(1, Ordering::Relaxed) - 1;
        metrics::gauge!("baton_writer_queue_depth").set(depth as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;

    #[test]
    fn writes_are_refused_past_the_queue_depth_and_admitted_again_below_it() {
        let pressure = Pressure::new(2, 100);
        let first = pressure.enter();
        assert!(pressure.admit(WriteKind::Task).is_ok());
        let second = pressure.enter();
        let refused = pressure.admit(WriteKind::Subscription).unwrap_err();
        assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
        assert!(refused.to_string().contains("store.max_queue"), "{refused}");
        drop(second);
        assert!(pressure.admit(WriteKind::Task).is_ok());
        drop(first);
        assert_eq!(pressure.queued(), 0);
    }

    #[test]
    fn a_fanout_behind_refuses_task_writes_only() {
        let pressure = Pressure::new(10, 100);
        pressure.set_fanout_lag(99);
        assert!(pressure.admit(WriteKind::Task).is_ok());
        pressure.set_fanout_lag(100);
        let refused = pressure.admit(WriteKind::Task).unwrap_err();
        assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
        assert!(
            refused.to_string().contains("store.max_fanout_lag"),
            "{refused}"
        );
        assert!(pressure.admit(WriteKind::Subscription).is_ok());
        pressure.set_fanout_lag(0);
        assert!(pressure.admit(WriteKind::Task).is_ok());
    }
}
