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
    /// Starts a runtime with `threads` workers (at least one), timers and I/O enabled.
    pub fn start(threads: usize) -> Result<DeliveryRuntime> {
        let runtime = Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .thread_name("baton-delivery")
            .enable_all()
            .build()
            .map_err(|e| Error::internal("starting the delivery runtime failed", e))?;
        let handle = runtime.handle().clone();
        tracing::info!(threads = threads.max(1), "delivery runtime started");
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
        let deliveries = DeliveryRuntime::start(1).unwrap();
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
}
