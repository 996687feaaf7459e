//! `seed_work_lists`: writes the work-list data set of `baton-load search` (issue 16) straight
//! into a SQLite database through Baton's own store (`SqliteStore::write`, the write pipeline
//! the API uses, so every Task gets its index rows, work-list columns, history and change
//! event), 512 writes in flight and grouped into the writer's transactions, with
//! `synchronous = normal`. It is the way to a million Tasks in minutes instead of the API's
//! quarter of an hour; afterwards `baton-load search --skip-seed` with the same shape flags
//! finds the data set. No server may run on the database meanwhile.
//!
//! ```sh
//! cargo run --release --example seed_work_lists -- <database file> <tasks> [rng seed] [base url]
//! ```

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use tokio::sync::Notify;

use baton::config::{StoreConfig, Synchronous};
use baton::store::sqlite::SqliteStore;
use baton::store::{Store, WriteRequest};
use baton::supervise::Health;

#[allow(dead_code)]
#[path = "../tools/src/bin/baton-load/search/data.rs"]
mod data;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(path), Some(tasks)) = (args.get(1), args.get(2).and_then(|n| n.parse().ok())) else {
        eprintln!("usage: seed_work_lists <database file> <tasks> [rng seed] [base url]");
        std::process::exit(2);
    };
    let rng_seed = args.get(3).and_then(|n| n.parse().ok()).unwrap_or(1);
    let base = args
        .get(4)
        .cloned()
        .unwrap_or_else(|| "http://127.0.0.1:8080/fhir".into());
    // The shape `baton-load search` assumes by default.
    let shape = data::Shape {
        tasks,
        owners: 1000,
        patients: 20_000,
        rng_seed,
        due_from: time::Date::from_calendar_date(2027, time::Month::January, 1).unwrap(),
        due_days: 365,
    };
    let config = StoreConfig {
        synchronous: Synchronous::Normal,
        max_queue: usize::MAX,
        max_fanout_lag: u64::MAX,
        ..StoreConfig::default()
    };
    let store = Arc::new(
        SqliteStore::open(
            &PathBuf::from(path),
            &base,
            &config,
            Arc::new(Notify::new()),
            Arc::new(Health::default()),
        )
        .await
        .expect("open the database"),
    );
    let started = Instant::now();
    let mut written = 0u64;
    let mut writes = futures::stream::iter(0..tasks)
        .map(|number| {
            let store = store.clone();
            let resource = shape.task(number);
            async move {
                store
                    .write(WriteRequest::Create {
                        id: None,
                        resource,
                        if_none_exist: None,
                    })
                    .await
            }
        })
        .buffer_unordered(512);
    while let Some(outcome) = writes.next().await {
        outcome.expect("a write failed");
        written += 1;
        if written.is_multiple_of(100_000) {
            eprintln!(
                "{written} Tasks in {:.1} s",
                started.elapsed().as_secs_f64()
            );
        }
    }
    drop(writes);
    store.close().await;
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "{written} Tasks in {seconds:.1} s, {:.0} Tasks/s",
        written as f64 / seconds
    );
}
