//! The HTTP accept loop: our own, on hyper-util's auto builder (HTTP/1.1 with keep-alive and
//! upgrades, and HTTP/2 with prior knowledge), because `axum::serve` has no deadlines and no
//! connection caps, and a few thousand silent sockets would otherwise exhaust the node.
//!
//! - **Global cap** (`limits.max_connections`): at the cap the loop stops accepting; new
//!   connections wait in the kernel's backlog until one closes. Nothing is read from them, so
//!   waiting costs this process nothing, and a client that retries finds a slot as soon as one
//!   frees up.
//! - **Per-client cap** (`limits.max_connections_per_client`): a connection from an address
//!   that already holds that many is answered at once with a 429 OperationOutcome (best effort:
//!   one non-blocking write) and closed. IPv6 clients are counted per /64, the block one host
//!   or one network usually gets, so that changing addresses inside it does not escape the cap.
//! - **Deadlines** (`limits.header_read_timeout_seconds`, `limits.idle_timeout_seconds`): a
//!   connection must send its first request head, and later each head it starts, within the
//!   header-read timeout; a connection with no request in progress and no head under way is
//!   closed after the idle timeout. A request in progress (from its head to its response) is
//!   never cut by either. hyper's own `header_read_timeout` is not used: it also runs while a
//!   keep-alive connection waits between requests, which would make the idle timeout
//!   unreachable.
//!
//! A connection's slot in both caps travels with its socket: after a websocket upgrade the
//! HTTP connection ends and its deadlines with it, but the socket still counts until the
//! websocket closes. Websockets have their own bind deadline and pings
//! (`api::websocket`).
//!
//! Shutdown: the loop stops accepting and closes the listener, every connection is asked to
//! finish (an idle HTTP/1.1 connection closes at once, one with a request in progress after
//! its response, HTTP/2 gets GOAWAY), and whatever is still running when the grace period ends
//! is cut off.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::http::{Request, Version};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::Service;

use crate::config::LimitsConfig;
use crate::error::IssueCode;

/// The connection limits of `[limits]`, as the accept loop uses them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Open connections for the node; 0: no cap.
    pub max_connections: usize,
    /// Open connections per client address (per /64 for IPv6); 0: no cap.
    pub max_connections_per_client: usize,
    pub deadlines: Deadlines,
}

impl ConnectionLimits {
    pub fn from_config(limits: &LimitsConfig) -> ConnectionLimits {
        ConnectionLimits {
            max_connections: limits.max_connections,
            max_connections_per_client: limits.max_connections_per_client,
            deadlines: Deadlines {
                header_read: Duration::from_secs(limits.header_read_timeout_seconds),
                idle: Duration::from_secs(limits.idle_timeout_seconds),
            },
        }
    }
}

/// How long a connection may take to send a request head, and stay idle between requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadlines {
    pub header_read: Duration,
    pub idle: Duration,
}

/// Serves `app` on `listener` until `shutdown` is cancelled, then drains: in-flight requests
/// get `grace` to finish before their connections are cut.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    grace: Duration,
    shutdown: CancellationToken,
) {
    let shared = Arc::new(ConnectionContext {
        app,
        deadlines: limits.deadlines,
        builder: auto::Builder::new(TokioExecutor::new()),
        shutdown: shutdown.clone(),
        cut: CancellationToken::new(),
    });
    let connections = TaskTracker::new();
    let mut gate = Gate::new(limits);
    // Counters that alerts watch exist from the start, at 0, rather than after the first event.
    metrics::counter!("baton_connections_refused_total", "reason" => "per_client").increment(0);
    for reason in ["header_timeout", "idle_timeout"] {
        metrics::counter!("baton_connections_closed_total", "reason" => reason).increment(0);
    }
    metrics::counter!("baton_connections_deferred_total").increment(0);
    metrics::gauge!("baton_connections_open").set(0.0);

    loop {
        let Some(global) = gate.global_slot(&shutdown).await else {
            break;
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                // Out of file descriptors, most likely: accepting again at once would spin.
                tracing::error!(error = %e, "accepting a connection failed; retrying in a second");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    () = shutdown.cancelled() => break,
                }
            }
        };
        let Some(admission) = gate.admit(peer, global) else {
            refuse_per_client(&stream);
            continue;
        };
        connections.spawn(serve_connection(stream, peer, admission, shared.clone()));
    }
    // A closed listener refuses new connections outright instead of queueing them unanswered.
    drop(listener);
    connections.close();
    if tokio::time::timeout(grace, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            grace_seconds = grace.as_secs(),
            "requests still running at the shutdown deadline were cut off"
        );
        shared.cut.cancel();
        connections.wait().await;
    }
}

/// What every connection task shares.
struct ConnectionContext {
    app: Router,
    deadlines: Deadlines,
    builder: auto::Builder<TokioExecutor>,
    /// Cancelled when shutdown begins: each connection finishes what it is doing and closes.
    shutdown: CancellationToken,
    /// Cancelled when the grace period is over: connections still open are dropped.
    cut: CancellationToken,
}

/// Serves one connection until it closes, times out, or is cut at shutdown.
async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    admission: Admission,
    shared: Arc<ConnectionContext>,
) {
    let activity = Arc::new(Activity::new(Instant::now()));
    let io = TokioIo::new(WatchedStream {
        inner: stream,
        activity: activity.clone(),
        _admission: admission,
    });
    let app = shared.app.clone();
    let service_activity = activity.clone();
    let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
        // Handlers may ask for the peer with `ConnectInfo<SocketAddr>`, as under `axum::serve`.
        request.extensions_mut().insert(ConnectInfo(peer));
        if request.version() == Version::HTTP_2 {
            service_activity.multiplexed.store(true, Ordering::Relaxed);
        }
        let in_flight = InFlight::begin(service_activity.clone());
        let mut app = app.clone();
        async move {
            let response = app.call(request).await;
            drop(in_flight);
            response
        }
    });
    let connection = shared.builder.serve_connection_with_upgrades(io, service);
    let mut connection = std::pin::pin!(connection);

    let deadlines = shared.deadlines;
    let first_look = verdict(activity.snapshot(), Duration::ZERO, deadlines);
    let watchdog = tokio::time::sleep_until(match first_look {
        Verdict::RecheckAt(at) => later(activity.started, at),
        Verdict::CloseSlowHead | Verdict::CloseIdle => activity.started,
    });
    let mut watchdog = std::pin::pin!(watchdog);
    let mut finishing = false;
    loop {
        tokio::select! {
            // The connection first: it is what is polled on every socket event.
            biased;
            served = connection.as_mut() => {
                if let Err(e) = served {
                    tracing::debug!(peer = %peer, error = %e, "connection ended with an error");
                }
                return;
            }
            () = watchdog.as_mut() => {
                let now = Instant::now();
                match verdict(activity.snapshot(), now.saturating_duration_since(activity.started), deadlines) {
                    Verdict::RecheckAt(at) => watchdog.as_mut().reset(later(activity.started, at)),
                    Verdict::CloseSlowHead => {
                        metrics::counter!("baton_connections_closed_total", "reason" => "header_timeout").increment(1);
                        tracing::debug!(peer = %peer, "closing a connection that did not send a request head in time");
                        return;
                    }
                    Verdict::CloseIdle if finishing => {
                        // Asked to close once already and still idle: the peer holds it open.
                        return;
                    }
                    Verdict::CloseIdle => {
                        metrics::counter!("baton_connections_closed_total", "reason" => "idle_timeout").increment(1);
                        // Graceful: should a request have just begun, it is still answered.
                        connection.as_mut().graceful_shutdown();
                        finishing = true;
                        watchdog.as_mut().reset(later(now, deadlines.header_read));
                    }
                }
            }
            () = shared.shutdown.cancelled(), if !finishing => {
                connection.as_mut().graceful_shutdown();
                finishing = true;
            }
            () = shared.cut.cancelled() => return,
        }
    }
}

/// Marks a request in progress from its head until its handler has answered (or was dropped).
struct InFlight(Arc<Activity>);

impl InFlight {
    fn begin(activity: Arc<Activity>) -> InFlight {
        activity.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(activity)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let activity = &self.0;
        if activity.in_flight.fetch_sub(1, Ordering::Relaxed) == 1 {
            activity
                .idle_since
                .store(activity.millis(Instant::now()), Ordering::Relaxed);
            activity.head_since.store(NO_HEAD, Ordering::Relaxed);
        }
    }
}

/// No request head is under way.
const NO_HEAD: u64 = u64::MAX;

/// What a connection is doing, as far as its deadlines care; written by the socket (reads)
/// and the service (requests), read by the connection's watchdog. Times are milliseconds since
/// `started`.
struct Activity {
    started: Instant,
    /// Requests whose handlers have not answered yet.
    in_flight: AtomicUsize,
    /// When the last request in progress finished (0: the connection is new).
    idle_since: AtomicU64,
    /// When the first byte of the next request head arrived, or `NO_HEAD`. A new connection
    /// starts with a head under way, so one that sends nothing meets the header-read deadline.
    head_since: AtomicU64,
    /// HTTP/2 peers send frames (PING, SETTINGS, WINDOW_UPDATE) between requests: for them
    /// bytes do not start a head, and only the idle deadline applies between requests.
    multiplexed: AtomicBool,
}

impl Activity {
    fn new(started: Instant) -> Activity {
        Activity {
            started,
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            head_since: AtomicU64::new(0),
            multiplexed: AtomicBool::new(false),
        }
    }

    fn millis(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.started).as_millis())
            .unwrap_or(u64::MAX - 1)
    }

    /// Bytes arrived: on an idle HTTP/1 connection they begin the next request head.
    fn on_read(&self) {
        if self.in_flight.load(Ordering::Relaxed) == 0
            && self.head_since.load(Ordering::Relaxed) == NO_HEAD
            && !self.multiplexed.load(Ordering::Relaxed)
        {
            let now = self.millis(Instant::now());
            let _ = self.head_since.compare_exchange(
                NO_HEAD,
                now,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
    }

    fn snapshot(&self) -> Snapshot {
        let head = self.head_since.load(Ordering::Relaxed);
        Snapshot {
            in_flight: self.in_flight.load(Ordering::Relaxed),
            idle_since: Duration::from_millis(self.idle_since.load(Ordering::Relaxed)),
            head_since: (head != NO_HEAD).then(|| Duration::from_millis(head)),
        }
    }
}

/// A connection's activity at one moment, times since the connection was accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Snapshot {
    in_flight: usize,
    idle_since: Duration,
    head_since: Option<Duration>,
}

/// What the watchdog does when it wakes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// Nothing is due; look again at this time since the connection was accepted.
    RecheckAt(Duration),
    /// A request head took longer than the header-read timeout (or never came).
    CloseSlowHead,
    /// No request has been in progress for the idle timeout.
    CloseIdle,
}

/// The deadline rule, a pure function of the connection's activity and the time `now` (since
/// the connection was accepted). The watchdog only has to wake at the times it returns: the
/// deadline of the current state, or sooner, since a change of state (a request beginning or
/// ending, a head beginning) leads to a deadline at least the shorter timeout after it.
fn verdict(snapshot: Snapshot, now: Duration, deadlines: Deadlines) -> Verdict {
    let next_change = now.saturating_add(deadlines.header_read.min(deadlines.idle));
    if snapshot.in_flight > 0 {
        // Requests in progress have no deadline here.
        return Verdict::RecheckAt(next_change);
    }
    let deadline = match snapshot.head_since {
        Some(since) => since.saturating_add(deadlines.header_read),
        None => snapshot.idle_since.saturating_add(deadlines.idle),
    };
    if now < deadline {
        return Verdict::RecheckAt(deadline.min(next_change));
    }
    match snapshot.head_since {
        Some(_) => Verdict::CloseSlowHead,
        None => Verdict::CloseIdle,
    }
}

/// `from + offset`, or a time too far away to matter when a configured timeout is absurdly
/// long (an overflow must not panic).
fn later(from: Instant, offset: Duration) -> Instant {
    from.checked_add(offset)
        .unwrap_or_else(|| from + Duration::from_secs(100 * 365 * 24 * 3600))
}

/// The socket, telling the connection's `Activity` when bytes arrive, and holding the
/// connection's slots in the caps for as long as it lives (through a websocket upgrade too).
struct WatchedStream {
    inner: TcpStream,
    activity: Arc<Activity>,
    _admission: Admission,
}

impl AsyncRead for WatchedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.on_read();
        }
        polled
    }
}

impl AsyncWrite for WatchedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Decides which connections may open: the global cap (by not accepting) and the per-client
/// cap (by refusing).
struct Gate {
    max_connections: usize,
    global: Option<Arc<Semaphore>>,
    per_client: usize,
    clients: Arc<ClientTable>,
    open: metrics::Gauge,
    deferred: metrics::Counter,
    /// When the cap was last reported in the log, so an attack does not flood it.
    last_warned: Option<Instant>,
}

impl Gate {
    fn new(limits: ConnectionLimits) -> Gate {
        Gate {
            max_connections: limits.max_connections,
            global: (limits.max_connections > 0)
                .then(|| Arc::new(Semaphore::new(limits.max_connections))),
            per_client: limits.max_connections_per_client,
            clients: Arc::default(),
            open: metrics::gauge!("baton_connections_open"),
            deferred: metrics::counter!("baton_connections_deferred_total"),
            last_warned: None,
        }
    }

    /// Waits for a free slot under the global cap. `None` when shutdown began meanwhile.
    async fn global_slot(
        &mut self,
        shutdown: &CancellationToken,
    ) -> Option<Option<OwnedSemaphorePermit>> {
        let Some(global) = &self.global else {
            return Some(None);
        };
        if let Ok(permit) = global.clone().try_acquire_owned() {
            return Some(Some(permit));
        }
        self.deferred.increment(1);
        let now = Instant::now();
        if self
            .last_warned
            .is_none_or(|at| now.duration_since(at) >= Duration::from_secs(60))
        {
            self.last_warned = Some(now);
            tracing::warn!(
                max_connections = self.max_connections,
                "limits.max_connections connections are open: new ones wait in the backlog"
            );
        }
        tokio::select! {
            permit = global.clone().acquire_owned() => permit.ok().map(Some),
            () = shutdown.cancelled() => None,
        }
    }

    /// Takes the client's slot; `None` when that client already holds its share.
    fn admit(
        &mut self,
        peer: SocketAddr,
        global: Option<OwnedSemaphorePermit>,
    ) -> Option<Admission> {
        let client = if self.per_client > 0 {
            let key = client_key(peer.ip());
            if !self.clients.take(key, self.per_client) {
                metrics::counter!("baton_connections_refused_total", "reason" => "per_client")
                    .increment(1);
                tracing::debug!(client = %key, "refusing a connection over limits.max_connections_per_client");
                return None;
            }
            Some(ClientSlot {
                table: self.clients.clone(),
                key,
            })
        } else {
            None
        };
        self.open.increment(1.0);
        Some(Admission {
            _global: global,
            _client: client,
            open: self.open.clone(),
        })
    }
}

/// A connection's slots under both caps, released when its socket closes.
struct Admission {
    _global: Option<OwnedSemaphorePermit>,
    _client: Option<ClientSlot>,
    open: metrics::Gauge,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.open.decrement(1.0);
    }
}

/// Open connections per client; a client with none has no entry, so the table only holds
/// clients that are connected.
#[derive(Default)]
struct ClientTable {
    open: Mutex<HashMap<IpAddr, usize>>,
}

impl ClientTable {
    fn take(&self, key: IpAddr, cap: usize) -> bool {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let count = open.entry(key).or_insert(0);
        if *count >= cap {
            return false;
        }
        *count += 1;
        true
    }

    fn release(&self, key: IpAddr) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = open.get_mut(&key) {
            *count -= 1;
            if *count == 0 {
                open.remove(&key);
            }
        }
    }
}

struct ClientSlot {
    table: Arc<ClientTable>,
    key: IpAddr,
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.table.release(self.key);
    }
}

/// The address a client is counted under: IPv4 as it is (IPv4-mapped IPv6 included), IPv6 by
/// its /64.
fn client_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(bits))
        }
    }
}

/// Answers a connection over the per-client cap with a 429 and closes it. One non-blocking
/// write on a fresh socket: it either fits in the send buffer or the client just sees the close.
fn refuse_per_client(stream: &TcpStream) {
    let _ = stream.try_write(per_client_refusal());
}

fn per_client_refusal() -> &'static [u8] {
    static RESPONSE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    RESPONSE.get_or_init(|| {
        let body = crate::error::operation_outcome(
            "error",
            IssueCode::Throttled,
            "too many open connections from this client address (limits.max_connections_per_client); close some and retry",
            None,
        )
        .to_string();
        format!(
            "HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/fhir+json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    })
}

/// Errors about one connection, after which accepting again at once is right (as in
/// `axum::serve`).
fn is_connection_error(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEADLINES: Deadlines = Deadlines {
        header_read: Duration::from_secs(10),
        idle: Duration::from_secs(120),
    };

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn deadlines() {
        let snapshot = |in_flight, idle_since, head_since: Option<u64>| Snapshot {
            in_flight,
            idle_since: secs(idle_since),
            head_since: head_since.map(secs),
        };
        let cases = [
            // A new connection must send its first head within the header-read timeout.
            (
                "new, silent",
                snapshot(0, 0, Some(0)),
                5,
                Verdict::RecheckAt(secs(10)),
            ),
            (
                "new, silent past the deadline",
                snapshot(0, 0, Some(0)),
                10,
                Verdict::CloseSlowHead,
            ),
            // A request in progress is never cut; the watchdog looks again later.
            (
                "request running",
                snapshot(1, 0, None),
                500,
                Verdict::RecheckAt(secs(510)),
            ),
            (
                "request running, head stamp left",
                snapshot(2, 0, Some(0)),
                30,
                Verdict::RecheckAt(secs(40)),
            ),
            // Between requests, the idle timeout counts from the end of the last one; the
            // watchdog still looks every header-read timeout, in case a head begins.
            (
                "idle",
                snapshot(0, 50, None),
                100,
                Verdict::RecheckAt(secs(110)),
            ),
            (
                "idle, deadline soon",
                snapshot(0, 50, None),
                165,
                Verdict::RecheckAt(secs(170)),
            ),
            (
                "idle past the deadline",
                snapshot(0, 50, None),
                170,
                Verdict::CloseIdle,
            ),
            // A head begun after an idle spell has the header-read timeout from its first byte.
            (
                "head under way",
                snapshot(0, 50, Some(160)),
                165,
                Verdict::RecheckAt(secs(170)),
            ),
            (
                "head too slow",
                snapshot(0, 50, Some(160)),
                171,
                Verdict::CloseSlowHead,
            ),
        ];
        // With an idle timeout shorter than the header-read timeout, a head still pending must
        // not keep the watchdog asleep past the idle deadline of a request that ends meanwhile.
        let short_idle = Deadlines {
            header_read: secs(600),
            idle: secs(1),
        };
        assert_eq!(
            verdict(snapshot(0, 0, Some(0)), Duration::ZERO, short_idle),
            Verdict::RecheckAt(secs(1))
        );
        // Absurdly long timeouts saturate instead of overflowing.
        let endless = Deadlines {
            header_read: Duration::MAX,
            idle: Duration::MAX,
        };
        assert_eq!(
            verdict(snapshot(0, 50, None), secs(60), endless),
            Verdict::RecheckAt(Duration::MAX)
        );
        let now = Instant::now();
        assert!(later(now, Duration::MAX) > now);
        for (name, snapshot, now, expected) in cases {
            assert_eq!(verdict(snapshot, secs(now), DEADLINES), expected, "{name}");
        }
    }

    #[test]
    fn activity_follows_requests_and_reads() {
        let started = Instant::now();
        let activity = Arc::new(Activity::new(started));
        assert_eq!(
            activity.snapshot().head_since,
            Some(Duration::ZERO),
            "awaiting the first head"
        );
        let request = InFlight::begin(activity.clone());
        assert_eq!(activity.snapshot().in_flight, 1);
        activity.on_read();
        drop(request);
        let idle = activity.snapshot();
        assert_eq!(
            (idle.in_flight, idle.head_since),
            (0, None),
            "idle after the answer"
        );
        activity.on_read();
        assert!(
            activity.snapshot().head_since.is_some(),
            "bytes begin the next head"
        );

        let multiplexed = Arc::new(Activity::new(started));
        multiplexed.multiplexed.store(true, Ordering::Relaxed);
        drop(InFlight::begin(multiplexed.clone()));
        multiplexed.on_read();
        assert_eq!(
            multiplexed.snapshot().head_since,
            None,
            "HTTP/2 frames are not heads"
        );
    }

    #[test]
    fn clients_are_counted_by_address_and_ipv6_by_64() {
        let cases = [
            ("192.0.2.7", "192.0.2.7"),
            ("::ffff:192.0.2.7", "192.0.2.7"),
            ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::"),
            ("2001:db8:1:2:ffff::1", "2001:db8:1:2::"),
            ("::1", "::"),
        ];
        for (ip, key) in cases {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(client_key(ip), key.parse::<IpAddr>().unwrap(), "{ip}");
        }
    }

    #[test]
    fn client_slots_are_capped_and_released() {
        let table = Arc::new(ClientTable::default());
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        assert!(table.take(a, 2));
        assert!(table.take(a, 2));
        assert!(!table.take(a, 2), "a third from the same client is refused");
        assert!(table.take(b, 2), "another client is not affected");
        table.release(a);
        assert!(table.take(a, 2), "a released slot can be taken again");
        table.release(a);
        table.release(a);
        table.release(b);
        assert!(
            table.open.lock().unwrap().is_empty(),
            "clients without connections leave no entry"
        );
    }

    #[test]
    fn the_refusal_is_a_complete_response() {
        let text = String::from_utf8(per_client_refusal().to_vec()).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 429 "));
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let outcome: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(outcome["issue"][0]["code"], "throttled");
    }
}
