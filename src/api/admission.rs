//! Admission of searches: at most `limits.max_concurrent_searches` evaluated at once on this
//! node, at most `limits.search_queue` waiting for a slot, and a 503 with `Retry-After` for
//! the rest.
//!
//! A search holds its page (up to `search.max_page_bytes` of Tasks, parsed, and the Bundle
//! built from them) in memory while it runs, and keeps a database connection busy; without a
//! bound, a burst of large searches takes as much memory and as many connections as it asks
//! for. A waiting search holds nothing but its place, so the queue is cheap; past it, a client
//! is better told to come back than kept waiting behind work it cannot see.

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{Semaphore, SemaphorePermit};

use crate::error::{Error, Result};

/// What a refused search is told to wait, in seconds: searches take milliseconds to a few
/// seconds, so a slot is usually free by then.
const RETRY_AFTER_SECONDS: u64 = 1;

/// The search slots of a node and their wait queue.
pub struct Admission {
    /// One permit per search that may run at once. Tokio's semaphore is fair: a released
    /// slot goes to the longest waiter, never to a search that just arrived.
    slots: Semaphore,
    /// Searches waiting for a slot now.
    waiting: AtomicUsize,
    /// Most searches that may wait.
    queue: usize,
    /// Searches that may run at once, for diagnostics and metrics.
    max_running: usize,
}

/// A search's slot, held until it is dropped.
pub struct Admitted<'a> {
    _permit: SemaphorePermit<'a>,
    admission: &'a Admission,
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        // The permit goes back when this guard's fields drop, just after this.
        let running = self.admission.running().saturating_sub(1);
        metrics::gauge!("baton_searches_running").set(running as f64);
    }
}

/// A search's place in the queue, given up when it gets its slot or is cancelled (the client
/// went away while waiting).
struct Place<'a>(&'a AtomicUsize);

impl Drop for Place<'_> {
    fn drop(&mut self) {
        let waiting = self.0.fetch_sub(1, Ordering::AcqRel) - 1;
        metrics::gauge!("baton_searches_waiting").set(waiting as f64);
    }
}

impl Admission {
    /// `max_running` slots (at least one) and a queue of `queue` places (0: no waiting).
    pub fn new(max_running: usize, queue: usize) -> Admission {
        let max_running = max_running.max(1);
        Admission {
            slots: Semaphore::new(max_running),
            waiting: AtomicUsize::new(0),
            queue,
            max_running,
        }
    }

    /// Takes a slot: at once if one is free, after waiting in the queue if there is room in
    /// it, and otherwise not at all (503, `Retry-After`).
    pub async fn enter(&self) -> Result<Admitted<'_>> {
        let permit = match self.slots.try_acquire() {
            Ok(permit) => permit,
            Err(_) => {
                let _place = self.queue_place()?;
                self.slots
                    .acquire()
                    .await
                    .map_err(|e| Error::internal("the search slots are closed", e.to_string()))?
            }
        };
        metrics::gauge!("baton_searches_running").set(self.running() as f64);
        Ok(Admitted {
            _permit: permit,
            admission: self,
        })
    }

    fn queue_place(&self) -> Result<Place<'_>> {
        let taken = self
            .waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |waiting| {
                (waiting < self.queue).then_some(waiting + 1)
            });
        match taken {
            Ok(before) => {
                metrics::gauge!("baton_searches_waiting").set((before + 1) as f64);
                Ok(Place(&self.waiting))
            }
            Err(waiting) => {
                metrics::counter!("baton_searches_refused_total").increment(1);
                Err(Error::unavailable(
                    format!(
                        "this node is busy: {} searches are running (limits.max_concurrent_searches) \
                         and {waiting} are waiting (limits.search_queue); retry after \
                         {RETRY_AFTER_SECONDS} second",
                        self.max_running
                    ),
                    RETRY_AFTER_SECONDS,
                ))
            }
        }
    }

    fn running(&self) -> usize {
        self.max_running - self.slots.available_permits()
    }

    /// Searches waiting for a slot now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::pin;
    use std::task::Poll;

    /// Polls a future once, without waiting.
    fn poll_once<F: Future>(future: &mut std::pin::Pin<&mut F>) -> Poll<F::Output> {
        let waker = std::task::Waker::noop();
        future
            .as_mut()
            .poll(&mut std::task::Context::from_waker(waker))
    }

    fn refused(result: Result<Admitted<'_>>) -> u64 {
        let error = result.err().expect("refused");
        let client = error.as_client().expect("a client error");
        assert_eq!(client.status, 503);
        client.retry_after.expect("Retry-After")
    }

    #[tokio::test]
    async fn slots_then_queue_then_refusal() {
        let admission = Admission::new(2, 1);
        let first = admission.enter().await.unwrap();
        let _second = admission.enter().await.unwrap();
        // Both slots are taken: the third waits in the queue, the fourth is refused.
        let mut third = pin!(admission.enter());
        assert!(poll_once(&mut third).is_pending());
        assert_eq!(admission.waiting(), 1);
        assert_eq!(refused(admission.enter().await), RETRY_AFTER_SECONDS);
        // A slot comes free: the waiter takes it and leaves the queue.
        drop(first);
        let Poll::Ready(third) = poll_once(&mut third) else {
            panic!("the waiter did not get the free slot");
        };
        let _third = third.unwrap();
        assert_eq!(admission.waiting(), 0);
        assert_eq!(admission.running(), 2);
    }

    #[tokio::test]
    async fn a_cancelled_waiter_gives_up_its_place() {
        let admission = Admission::new(1, 1);
        let _running = admission.enter().await.unwrap();
        {
            let mut waiter = pin!(admission.enter());
            assert!(poll_once(&mut waiter).is_pending());
            assert_eq!(admission.waiting(), 1);
        }
        assert_eq!(admission.waiting(), 0);
        let mut next = pin!(admission.enter());
        assert!(poll_once(&mut next).is_pending());
    }

    #[tokio::test]
    async fn no_queue_refuses_at_once() {
        let admission = Admission::new(1, 0);
        let running = admission.enter().await.unwrap();
        refused(admission.enter().await);
        drop(running);
        assert!(admission.enter().await.is_ok());
    }
}
