//! The due-date timer: finds open Tasks whose `restriction.period.end` has passed and reports
//! each once per due date as an `overdue` change event in the outbox, where the matcher
//! treats it like any change (topic `task-overdue`). The marker and the event commit together,
//! so a restart neither repeats nor loses one.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::fhir::ids::StoredInstant;
use crate::store::Store;

/// Most Tasks reported in one pass; the next pass follows at once when there were more.
const BATCH: usize = 500;

pub async fn run(store: Arc<dyn Store>, every: Duration, stop: CancellationToken) {
    loop {
        let now = time::OffsetDateTime::now_utc();
        let now_key = StoredInstant::at(now);
        let mut full = false;
        match store.overdue_tasks(&now_key, BATCH).await {
            Ok(due) => {
                full = due.len() == BATCH;
                for (task_id, due_at) in due {
                    match store.mark_overdue(&task_id, &due_at, &now_key).await {
                        Ok(true) => {
                            metrics::counter!("baton_tasks_overdue_total").increment(1);
                            tracing::info!(task.id = %task_id, due_at = %due_at, "task overdue");
                        }
                        Ok(false) => {}
                        Err(e) => {
                            tracing::warn!(error = %crate::error::error_chain(&e), "recording an overdue task failed")
                        }
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %crate::error::error_chain(&e), "looking for overdue tasks failed")
            }
        }
        // Sleep until the next known due date, but never longer than the check interval (a
        // new or changed Task may bring an earlier one).
        let wait = if full {
            Duration::ZERO
        } else {
            store
                .next_due(&now_key)
                .await
                .ok()
                .flatten()
                .and_then(|next| next.datetime())
                .and_then(|next| Duration::try_from(next - now).ok())
                .map_or(every, |until| until.min(every))
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = stop.cancelled() => return,
        }
    }
}
