//! The open-loop update schedule of `baton-load hub` and `baton-fanout websocket`: update `k`
//! is due at `start + k / rate`, whatever earlier ones do, so a slow server cannot slow the
//! load down and hide its own latency. At most `max_in_flight` updates are outstanding; an
//! update that has to wait for one to finish is a "late start", which the reports count.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

/// What the schedule asks for.
#[derive(Debug, Clone, Copy)]
pub struct OpenLoop {
    /// Updates per second.
    pub rate: f64,
    pub total: u64,
    pub max_in_flight: usize,
}

/// How the schedule went.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    pub started: Instant,
    /// When the last update was answered.
    pub ended: Instant,
    pub late_starts: u64,
    pub peak_in_flight: usize,
}

impl Schedule {
    pub fn window(&self) -> Duration {
        self.ended - self.started
    }
}

impl OpenLoop {
    /// `rate` for `duration`, rounded to whole updates.
    pub fn new(rate: f64, duration: Duration, max_in_flight: usize) -> OpenLoop {
        OpenLoop {
            rate,
            total: (rate * duration.as_secs_f64()).round() as u64,
            max_in_flight,
        }
    }

    /// Spawns `update(k)` for k in 0..total when due, and waits until all are answered.
    pub async fn run<F, Fut>(&self, mut update: F) -> anyhow::Result<Schedule>
    where
        F: FnMut(u64) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let permits = Arc::new(Semaphore::new(self.max_in_flight));
        let tick = Duration::from_secs_f64(1.0 / self.rate).max(Duration::from_millis(1));
        let mut interval = tokio::time::interval(tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut late_starts = 0;
        let mut peak_in_flight = 0;
        let mut issued = 0;
        let started = Instant::now();
        while issued < self.total {
            interval.tick().await;
            let due = ((started.elapsed().as_secs_f64() * self.rate) as u64 + 1).min(self.total);
            while issued < due {
                let permit = match permits.clone().try_acquire_owned() {
                    Ok(permit) => permit,
                    Err(_) => {
                        late_starts += 1;
                        permits.clone().acquire_owned().await?
                    }
                };
                peak_in_flight =
                    peak_in_flight.max(self.max_in_flight - permits.available_permits());
                let answered = update(issued);
                issued += 1;
                tokio::spawn(async move {
                    answered.await;
                    drop(permit);
                });
            }
        }
        let _all_answered = permits.acquire_many(self.max_in_flight as u32).await?;
        Ok(Schedule {
            started,
            ended: Instant::now(),
            late_starts,
            peak_in_flight,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[tokio::test]
    async fn every_update_runs_once_and_slow_ones_start_late() {
        let done = Arc::new(AtomicU64::new(0));
        let schedule = OpenLoop::new(200.0, Duration::from_millis(100), 2)
            .run(|_| {
                let done = done.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(30)).await;
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
            .await
            .unwrap();
        assert_eq!(done.load(Ordering::Relaxed), 20);
        assert_eq!(schedule.peak_in_flight, 2);
        assert!(schedule.late_starts > 0);
        assert!(schedule.window() >= Duration::from_millis(90));
    }
}
