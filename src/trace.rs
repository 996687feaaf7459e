//! The W3C trace context that follows a change from the request that made it to every
//! notification about it. Plain data and a task-local: no module of Baton's below it, so the
//! store (which keeps a trace with each change event) and the API (which starts one per
//! request) both use it.

use std::fmt::Write as _;
use std::future::Future;

/// A W3C trace context (`traceparent`): the trace a piece of work belongs to and the span
/// that did it. An incoming request's header is continued (a new span in the caller's
/// trace); without one, or with a malformed one, the request starts a trace of its own. The
/// change a write makes stores the request's context with its change event, and each
/// notification carrying that event sends a child of it on (`traceparent` header on rest-hook
/// POSTs, an AMQP header), so a receiver joins its logs to the write that caused them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    trace_id: [u8; 16],
    span_id: [u8; 8],
    sampled: bool,
}

impl TraceContext {
    /// Reads a `traceparent` header (version `00`, or a later version's first four fields as
    /// the specification asks); None if it is not one, or names the all-zero trace or span.
    pub fn parse(header: &str) -> Option<TraceContext> {
        let header = header.trim();
        let mut fields = header.split('-');
        let version = fields.next()?;
        let trace = fields.next()?;
        let span = fields.next()?;
        let flags = fields.next()?;
        let rest_allowed = version != "00";
        if version.len() != 2 || version == "ff" || (!rest_allowed && fields.next().is_some()) {
            return None;
        }
        hex_array::<1>(version)?;
        let trace_id = hex_array::<16>(trace)?;
        let span_id = hex_array::<8>(span)?;
        let [flags] = hex_array::<1>(flags)?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(TraceContext {
            trace_id,
            span_id,
            sampled: flags & 1 == 1,
        })
    }

    /// A new trace, for work nobody asked to continue.
    pub fn new_root() -> TraceContext {
        let mut trace_id: [u8; 16] = rand::random();
        // The all-zero trace id is invalid; one random bit is enough to avoid it.
        trace_id[15] |= 1;
        TraceContext {
            trace_id,
            span_id: new_span_id(),
            sampled: true,
        }
    }

    /// A new span in the same trace, for work done on behalf of this one.
    pub fn child(&self) -> TraceContext {
        TraceContext {
            span_id: new_span_id(),
            ..*self
        }
    }

    /// The trace id, span id and sampled flag, for exporting the span.
    pub fn parts(&self) -> ([u8; 16], [u8; 8], bool) {
        (self.trace_id, self.span_id, self.sampled)
    }

    /// The trace id as 32 lowercase hex digits, as logs and receivers show it.
    pub fn trace_id(&self) -> String {
        hex(&self.trace_id)
    }

    /// The `traceparent` header value naming this span as the parent.
    pub fn header(&self) -> String {
        format!(
            "00-{}-{}-{:02x}",
            hex(&self.trace_id),
            hex(&self.span_id),
            u8::from(self.sampled)
        )
    }
}

/// A random span id; the all-zero id is invalid, and is drawn again.
fn new_span_id() -> [u8; 8] {
    loop {
        let span: [u8; 8] = rand::random();
        if span != [0; 8] {
            return span;
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// `N` bytes from exactly `2N` lowercase hex digits.
fn hex_array<const N: usize>(text: &str) -> Option<[u8; N]> {
    let digits = text.as_bytes();
    if digits.len() != 2 * N {
        return None;
    }
    let value = |d: u8| match d {
        b'0'..=b'9' => Some(d - b'0'),
        b'a'..=b'f' => Some(d - b'a' + 10),
        _ => None,
    };
    let mut out = [0; N];
    for (i, pair) in digits.chunks(2).enumerate() {
        out[i] = value(pair[0])? << 4 | value(pair[1])?;
    }
    Some(out)
}

tokio::task_local! {
    /// The trace of the request (or other work) being served by this task.
    static CURRENT_TRACE: TraceContext;
}

/// The trace of the work this task is doing, if it runs inside one (`in_trace`).
pub fn current_trace() -> Option<TraceContext> {
    CURRENT_TRACE.try_with(|t| *t).ok()
}

/// Runs `work` inside `trace` (or outside any when None): `current_trace` answers it there.
/// Works under any executor, the SQLite writer's `block_on` included.
pub async fn in_trace<F: Future>(trace: Option<TraceContext>, work: F) -> F::Output {
    match trace {
        Some(trace) => CURRENT_TRACE.scope(trace, work).await,
        None => work.await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_headers_are_read_as_the_specification_says() {
        let valid = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let context = TraceContext::parse(valid).unwrap();
        assert_eq!(context.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(context.header(), valid);
        let unsampled =
            TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").unwrap();
        assert!(unsampled.header().ends_with("-00"));
        // A later version may add fields after the four it shares with version 00.
        assert!(
            TraceContext::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra")
                .is_some()
        );
        for invalid in [
            "",
            "00",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            "0x-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceContext::parse(invalid), None, "{invalid}");
        }
    }

    #[test]
    fn a_child_keeps_the_trace_and_takes_a_new_span() {
        let root = TraceContext::new_root();
        let child = root.child();
        assert_eq!(child.trace_id(), root.trace_id());
        assert_ne!(child.header(), root.header());
        assert_eq!(TraceContext::parse(&child.header()), Some(child));
    }

    #[tokio::test]
    async fn the_current_trace_is_the_one_the_work_runs_in() {
        assert_eq!(current_trace(), None);
        let trace = TraceContext::new_root();
        let seen = in_trace(Some(trace), async { current_trace() }).await;
        assert_eq!(seen, Some(trace));
        // The SQLite writer runs its jobs with `block_on` on a thread of its own.
        let seen = std::thread::spawn(move || {
            futures::executor::block_on(in_trace(Some(trace), async { current_trace() }))
        })
        .join()
        .unwrap();
        assert_eq!(seen, Some(trace));
    }
}
