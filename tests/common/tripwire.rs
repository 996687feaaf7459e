//! Every panic is a bug: a tripwire that fails the test whose server panicked.
//!
//! A panic inside the server rarely fails a test by itself. axum drops the connection (or a
//! catch-panic layer answers 500, which a test of bad input may even expect), the delivery
//! scheduler catches a panicking attempt and retries it, and a background task that dies is
//! only noticed when something waits on it. So `arm` (called whenever a test server starts)
//! chains a panic hook that records every panic raised outside the test's own code, and
//! `TestServer` calls `check` when it stops or is dropped, which fails the test if anything
//! was recorded. The hook runs before any unwinding, so a panic that the server (or the test)
//! catches afterwards is recorded all the same: no test can bypass the tripwire by expecting
//! an error.
//!
//! The test's own code is the test body: it runs on the thread that started the server, and
//! outside every tokio task (`#[tokio::test]` polls it with `block_on`). Everything else is
//! the server's: its tasks (which share the test's thread on the current-thread runtime and
//! are told apart by their task id), the runtime's worker and blocking threads, and any thread
//! the server spawns. A helper task that a test spawns (a webhook receiver, a load generator)
//! counts as the server's too, since a panic there is just as easily lost.
//!
//! Servers that tests start as child processes (`tests/common/cluster.rs`) report panics on
//! their stderr, with the default hook's `thread '…' panicked at FILE:LINE:COL:` line;
//! `watch_stderr` forwards that stream and records each such line, and dropping the cluster
//! checks. A child that panics just as the test ends may be read too late to count.
//!
//! The record is per process. Under `cargo nextest` (the documented runner) every test has
//! its own process; under plain `cargo test` a panic in one test's server may be reported by
//! another test that checks first, which still fails the run.

use std::collections::HashSet;
use std::panic::PanicHookInfo;
use std::sync::{Mutex, MutexGuard, Once, PoisonError};
use std::thread::ThreadId;

/// One panic raised outside a test's own code, as the hook saw it.
#[derive(Debug, Clone)]
pub struct ServerPanic {
    /// The thread's name, or its id when it has none.
    pub thread: String,
    /// `file:line:column` of the panic.
    pub location: String,
    pub message: String,
}

impl std::fmt::Display for ServerPanic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "thread '{}' panicked at {}: {}",
            self.thread, self.location, self.message
        )
    }
}

/// Panics recorded and not yet checked.
static RECORDED: Mutex<Vec<ServerPanic>> = Mutex::new(Vec::new());
/// Threads that run test bodies: those that started a server.
static TEST_THREADS: Mutex<Option<HashSet<ThreadId>>> = Mutex::new(None);
static INSTALL: Once = Once::new();

/// A lock that a panic elsewhere cannot make unusable: the hook must keep recording after the
/// first panic, and the data behind these locks stays consistent whatever panicked.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Installs the hook (once per process) and marks the calling thread as one that runs a test
/// body, so that the test's own failed assertions are left to the test harness.
pub fn arm() {
    lock(&TEST_THREADS)
        .get_or_insert_with(HashSet::new)
        .insert(std::thread::current().id());
    INSTALL.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !raised_by_test_code() {
                lock(&RECORDED).push(describe(info));
            }
            // The default hook (or whatever was installed before) still prints the message
            // and, with RUST_BACKTRACE, the backtrace.
            previous(info);
        }));
    });
}

/// Whether the panic being raised comes from a test body rather than the server.
fn raised_by_test_code() -> bool {
    let on_test_thread = lock(&TEST_THREADS)
        .as_ref()
        .is_some_and(|threads| threads.contains(&std::thread::current().id()));
    on_test_thread && tokio::task::try_id().is_none()
}

fn describe(info: &PanicHookInfo<'_>) -> ServerPanic {
    let current = std::thread::current();
    let payload = info.payload();
    let message = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(a panic payload that is not a string)".to_string());
    ServerPanic {
        thread: current
            .name()
            .map_or_else(|| format!("{:?}", current.id()), str::to_string),
        location: info
            .location()
            .map_or_else(|| "an unknown location".to_string(), ToString::to_string),
        message,
    }
}

/// Forwards a child process's stderr to this process's stderr line by line, recording every
/// panic the child reports there. `process` names the child in the record.
pub fn watch_stderr<R>(process: &str, stderr: R) -> tokio::task::JoinHandle<()>
where
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
{
    use tokio::io::AsyncBufReadExt;
    let process = process.to_string();
    tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            eprintln!("{line}");
            if let Some(panic) = reported_panic(&process, &line) {
                lock(&RECORDED).push(panic);
            }
        }
    })
}

/// Reads the first line the default panic hook prints: `thread 'NAME' panicked at LOCATION:`
/// (the message follows on the next line, which the report leaves to the forwarded output).
fn reported_panic(process: &str, line: &str) -> Option<ServerPanic> {
    let rest = line.strip_prefix("thread '")?;
    let (thread, rest) = rest.split_once('\'')?;
    let location = rest.strip_prefix(" panicked at ")?;
    Some(ServerPanic {
        thread: format!("{process}: {thread}"),
        location: location.trim_end_matches(':').to_string(),
        message: "see the output above".to_string(),
    })
}

/// Takes the panics recorded so far, leaving none: for tests of the tripwire itself.
pub fn take() -> Vec<ServerPanic> {
    std::mem::take(&mut *lock(&RECORDED))
}

/// Fails the test if the server panicked since the last check. While the test is already
/// failing (unwinding), it only prints them: a second panic would abort the process and lose
/// the first failure's message.
pub fn check(when: &str) {
    let panics = take();
    if panics.is_empty() {
        return;
    }
    let list: Vec<String> = panics.iter().map(|p| format!("  - {p}")).collect();
    let report = format!(
        "every panic is a bug, and the server panicked {} time(s) before {when}:\n{}",
        panics.len(),
        list.join("\n")
    );
    if std::thread::panicking() {
        eprintln!("{report}");
    } else {
        panic!("{report}");
    }
}
