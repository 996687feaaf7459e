//! `search_floor`: the CPU that SQLite alone spends on the work-list searches of issue 16, the
//! floor under the server's CPU per search (BENCHMARKS.md, issue 16, seventh sitting). It runs
//! the very statements the server runs (`search_sql::page_sql`, the page's window written in,
//! the capped count kept while it is over its cap, as `store::sqlite::counts` keeps it) on one
//! read-only connection with the search connections' settings, on this thread, over the
//! queries `baton-load search` asks (the same rotation of owners, queues, patients and days),
//! and prints the µs of CPU (user + system) per search of each query and of the mix. Each row's
//! columns are read as the server reads them (the stored JSON as a `String`, the sort values
//! as text); no HTTP, no JSON, no Bundle.
//!
//! ```sh
//! cargo run --release --example search_floor -- <database file> <tasks> [searches per query]
//! ```
//!
//! `FLOOR_DROP_EVERY=n` empties the connection's page cache every `n` searches (a write by
//! another connection into a scratch table, as an audit batch's commit does to a search
//! connection); 0 (the default) never. `FLOOR_CACHE_KIB` (32000) and `FLOOR_MMAP` (0) set the
//! connection's `cache_size` and `mmap_size`; `FLOOR_SKIP_COUNT=1` runs the pages only;
//! `FLOOR_SQL=1` prints each statement and its plan.

use std::collections::HashMap;
use std::time::Instant;

use rusqlite::{Connection, OpenFlags, params_from_iter};

use baton::fhir::search::{self, Handling, SearchLimits, TotalMode};
use baton::store::Counting;
use baton::store::search_sql::{PageSpec, Placeholder, page_sql, sort_value_count};

#[allow(dead_code)]
#[path = "../tools/src/bin/baton-load/search/data.rs"]
mod data;
#[allow(dead_code)]
#[path = "../tools/src/bin/baton-load/search/queries.rs"]
mod queries;

/// `api::task::search::ESTIMATE_LIMIT` and `store::sqlite::counts::REACH`.
const CAP: u64 = 1000;
const REACH: u64 = 2;

fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("read /proc/self/stat");
    // After the command's closing parenthesis: field 3 onwards; utime and stime are 14 and 15.
    let rest = &stat[stat.rfind(')').expect("a stat line") + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

/// One search as the server's store runs it: its page, then its count unless the page shows
/// it or a kept count over the cap still holds (no writes here, so a kept one always does).
fn search(conn: &Connection, text: &str, kept: &mut HashMap<(String, Vec<String>), u64>) -> usize {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(text).expect("a query string");
    let limits = SearchLimits {
        default_count: 50,
        max_count: 1000,
        default_total: TotalMode::Estimate,
    };
    let query = search::parse_query(
        &pairs,
        &limits,
        "http://127.0.0.1:8080/fhir",
        Handling::Lenient,
    )
    .expect("a work-list query");
    let counting = match query.total {
        TotalMode::None => Counting::Skip,
        TotalMode::Estimate => Counting::UpTo(CAP * REACH),
        TotalMode::Accurate => Counting::All,
    };
    let sql = page_sql(
        PageSpec {
            predicates: &query.predicates,
            sort: &query.sort,
            after: query.after.as_deref(),
            counting,
        },
        Placeholder::Question,
    )
    .expect("page statements");
    let rows_sql = sql
        .rows_with_window(query.count, query.offset)
        .expect("a window");
    let sort_values = sort_value_count(&query.sort);
    if std::env::var_os("FLOOR_SQL").is_some() {
        eprintln!(
            "{rows_sql}\n  binds {:?}\n{:?}\n  binds {:?}",
            sql.binds, sql.count, sql.count_binds
        );
        for (statement, binds) in [
            (Some(&rows_sql), &sql.binds),
            (sql.count.as_ref(), &sql.count_binds),
        ] {
            let Some(statement) = statement else { continue };
            let mut explain = conn
                .prepare(&format!("EXPLAIN QUERY PLAN {statement}"))
                .unwrap();
            let steps: Vec<String> = explain
                .query_map(params_from_iter(binds), |row| row.get(3))
                .unwrap()
                .collect::<rusqlite::Result<_>>()
                .unwrap();
            eprintln!("  plan {steps:?}");
        }
    }
    let mut statement = conn.prepare_cached(&rows_sql).expect("prepare the page");
    let mut rows = statement
        .query(params_from_iter(&sql.binds))
        .expect("run the page");
    let mut shown = 0;
    let mut bytes = 0;
    while let Some(row) = rows.next().expect("a row") {
        let id: String = row.get(0).unwrap();
        let _version: i64 = row.get(1).unwrap();
        let _updated: String = row.get(2).unwrap();
        let _deleted: i64 = row.get(3).unwrap();
        let resource: String = row.get(4).unwrap();
        for i in 0..sort_values {
            let _value: Option<String> = row.get(5 + i).unwrap();
        }
        bytes += id.len() + resource.len();
        shown += 1;
    }
    let page_shows_total = shown < query.count && query.offset == 0;
    let skip_count = std::env::var_os("FLOOR_SKIP_COUNT").is_some();
    if let Some(count) = sql.count.filter(|_| !page_shows_total && !skip_count) {
        let key = (count.clone(), sql.count_binds.clone());
        if let std::collections::hash_map::Entry::Vacant(entry) = kept.entry(key) {
            let counted: i64 = conn
                .prepare_cached(&count)
                .expect("prepare the count")
                .query_row(params_from_iter(&sql.count_binds), |row| row.get(0))
                .expect("count");
            if counted as u64 > CAP {
                entry.insert(counted as u64);
            }
        }
    }
    std::hint::black_box(bytes);
    shown
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(path), Some(tasks)) = (args.get(1), args.get(2).and_then(|n| n.parse().ok())) else {
        eprintln!("usage: search_floor <database file> <tasks> [searches per query]");
        std::process::exit(2);
    };
    let per_query: u64 = args.get(3).and_then(|n| n.parse().ok()).unwrap_or(2000);
    let drop_every: u64 = std::env::var("FLOOR_DROP_EVERY")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let shape = data::Shape {
        tasks,
        owners: 1000,
        patients: 20_000,
        rng_seed: 1,
        due_from: time::Date::from_calendar_date(2027, time::Month::January, 1).unwrap(),
        due_days: 365,
    };
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .expect("open the database");
    let env = |name: &str, default: i64| -> i64 {
        std::env::var(name)
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(default)
    };
    // The search connections' settings (`store::sqlite::point`), or others to compare.
    conn.pragma_update(
        None,
        "cache_size",
        env("FLOOR_CACHE_KIB", 32000).saturating_neg(),
    )
    .unwrap();
    conn.pragma_update(None, "mmap_size", env("FLOOR_MMAP", 0))
        .unwrap();
    conn.set_prepared_statement_cache_capacity(128);
    let writer = (drop_every > 0).then(|| {
        let writer = Connection::open(path).expect("open the database to write");
        writer
            .execute_batch("CREATE TABLE IF NOT EXISTS floor_scratch (n INTEGER)")
            .unwrap();
        writer
    });
    let mut kept = HashMap::new();
    let mut done = 0u64;
    let mut run = |kinds: &[queries::Kind], searches: u64| -> (f64, f64, usize) {
        let (cpu, wall) = (cpu_seconds(), Instant::now());
        let mut entries = 0;
        for n in 0..searches {
            let query = queries::nth(kinds, n, &shape);
            entries += search(&conn, &query.text, &mut kept);
            done += 1;
            if let Some(writer) = &writer
                && done.is_multiple_of(drop_every)
            {
                writer
                    .execute("INSERT INTO floor_scratch VALUES (?)", [done as i64])
                    .unwrap();
            }
        }
        let per = |s: f64| s * 1e6 / searches as f64;
        (
            per(cpu_seconds() - cpu),
            per(wall.elapsed().as_secs_f64()),
            entries / searches as usize,
        )
    };
    // A first pass over the mix warms the page cache and the prepared statements.
    run(&queries::WORK_LISTS, per_query);
    for kind in queries::WORK_LISTS {
        let (cpu, wall, entries) = run(&[kind], per_query);
        println!(
            "{:<14} cpu_us_per_search {cpu:7.1}  wall_us {wall:7.1}  entries {entries}",
            kind.name()
        );
    }
    let (cpu, wall, entries) = run(&queries::WORK_LISTS, per_query * 6);
    println!(
        "{:<14} cpu_us_per_search {cpu:7.1}  wall_us {wall:7.1}  entries {entries}",
        "mix"
    );
}
