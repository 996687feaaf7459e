//! The two runtimes a node runs on: the API's and the deliveries'.
//!
//! The API runtime is the one `run` is called on (`baton serve` makes it with one worker per
//! core); it serves HTTP and reads the websockets. The delivery runtime is a second tokio
//! runtime with fewer workers (`delivery.threads`), made by `run`: the matcher (the outbox
//! consumer), the delivery scheduler and its attempts, the delivery recorder and each
//! websocket's writer run there. Under a broad fan-out the delivery path has work for every
//! thread it is given (BENCHMARKS.md: ~4 300 notifications a second to 10 100 sockets); on
//! one runtime it held the workers a Task PUT needed, and the PUT waited for a thread, not
//! for the database. With its own runtime the fan-out can use only its own workers, and an
//! API request always finds one of the API's free; the operating system shares the cores.
//!
//! Work hands over between the two through channels and the store only: a change committed
//! by the API wakes the matcher through a `Notify`, a notification reaches a socket's writer
//! through the socket's outbox. I/O objects made on one runtime may be polled from the other
//! (tokio's reactors are per runtime but serve any task), so a socket accepted by the API
//! runtime is written by the delivery runtime.
//!
//! The delivery runtime's threads may run at a lower operating-system priority
//! (`delivery.nice`): the two runtimes' threads share the same cores, and when both have work
//! the kernel then gives a core to the API's first, so a burst of notifications does not
//! stretch the requests that cause them. On Linux the nice value is per thread, so setting it
//! from the thread's own start hook touches that thread only.

use tokio::runtime::{Builder, Handle, Runtime};

use crate::error::{Error, Result};

/// The delivery runtime, shut down when dropped.
pub struct DeliveryRuntime {
    /// Taken by `drop`. Never dropped in place: `run` is async, and dropping a runtime inside
    /// another runtime's task panics, so `drop` shuts it down in the background instead.
    runtime: Option<Runtime>,
    handle: Handle,
}

impl DeliveryRuntime {
    /// Starts a runtime with `threads` workers (at least one), timers and I/O enabled, whose
    /// threads (workers and blocking ones) run at nice value `nice` or at the process's own,
    /// whichever is lower in priority.
    pub fn start(threads: usize, nice: i32) -> Result<DeliveryRuntime> {
        let runtime = Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .thread_name("baton-delivery")
            .on_thread_start(move || lower_priority(nice))
            .enable_all()
            .build()
            .map_err(|e| Error::internal("starting the delivery runtime failed", e))?;
        let handle = runtime.handle().clone();
        tracing::info!(threads = threads.max(1), nice, "delivery runtime started");
        Ok(DeliveryRuntime {
            runtime: Some(runtime),
            handle,
        })
    }

    /// Where to spawn delivery work. `Handle::enter` makes it the runtime of `tokio::spawn`
    /// for code that spawns its own tasks (the recorder, the supervised stages).
    pub fn handle(&self) -> &Handle {
        &self.handle
    }
}

/// Sets the calling thread's nice value to `nice` unless it is already higher (a lower
/// priority): Baton never raises a priority, which would need privileges. A failure is logged
/// and the thread runs on at its priority.
fn lower_priority(nice: i32) {
    if nice <= 0 {
        return;
    }
    // `None` is the calling thread on Linux, where the nice value is a thread's own.
    let outcome = rustix::process::getpriority_process(None).and_then(|current| {
        if current < nice {
            rustix::process::setpriority_process(None, nice)
        } else {
            Ok(())
        }
    });
    if let Err(error) = outcome {
        tracing::warn!(%error, nice, "lowering a delivery thread's priority failed");
    }
}

impl Drop for DeliveryRuntime {
    /// `run` drops the runtime after the pipeline has stopped and the store has closed, so
    /// nothing of the node's is left on it but idle connections of the channel clients.
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The runtime runs what is spawned on it, on its own threads, and can be dropped from
    /// inside another runtime's task (where `run` drops it) without a panic.
    #[tokio::test]
    async fn delivery_work_runs_on_its_own_threads_and_the_runtime_drops_inside_another() {
        let deliveries = DeliveryRuntime::start(1, 0).unwrap();
        let name = deliveries
            .handle()
            .spawn(async { std::thread::current().name().map(str::to_string) })
            .await
            .unwrap();
        assert_eq!(name.as_deref(), Some("baton-delivery"));
        let spawned_inside = {
            let _entered = deliveries.handle().enter();
            tokio::spawn(async { std::thread::current().name().map(str::to_string) })
        };
        assert_eq!(
            spawned_inside.await.unwrap().as_deref(),
            Some("baton-delivery")
        );
        drop(deliveries);
    }

    /// With `nice` set, the delivery threads run at that nice value while the caller's thread
    /// keeps its own; a nice value below the thread's own is never applied (no raise).
    #[tokio::test]
    async fn delivery_threads_run_at_the_configured_nice_value_and_the_caller_keeps_its_own() {
        let own = rustix::process::getpriority_process(None).unwrap();
        let wanted = (own + 3).min(19);
        let deliveries = DeliveryRuntime::start(1, wanted).unwrap();
        let theirs = deliveries
            .handle()
            .spawn(async { rustix::process::getpriority_process(None).unwrap() })
            .await
            .unwrap();
        assert_eq!(theirs, wanted);
        assert_eq!(rustix::process::getpriority_process(None).unwrap(), own);
        drop(deliveries);

        let gentler = DeliveryRuntime::start(1, 1).unwrap();
        let theirs = gentler
            .handle()
            .spawn(async { rustix::process::getpriority_process(None).unwrap() })
            .await
            .unwrap();
        assert_eq!(theirs, own.max(1));
        drop(gentler);
    }
}
