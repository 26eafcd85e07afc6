//! One trace across the daemons and the broker (W3C Trace Context).
//!
//! Every gRPC call a daemon serves runs in a trace context: the caller's `traceparent`
//! header when it sent a valid one, else a new root. The context travels
//! - on every gRPC call a daemon makes (the `traceparent` header, [`crate::auth::AttachToken`]),
//! - into every outbox row written while serving (column `traceparent`), and from there into
//!   the AMQP message's `traceparent` header (the relay),
//! - into every event consumer, which handles the message in the producer's trace.
//!
//! So one trace runs from `RecordUsage` through the crossing event, the recharge decision,
//! the charge and the credit. The context is held in a task-local ([`current`]), so it
//! propagates whether or not spans are exported.
//!
//! Export: when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, [`crate::telemetry::init`] installs an
//! OpenTelemetry layer and every such scope is also a span exported over OTLP/gRPC, its ids
//! the ones propagated (a child of the caller's span). Unset, nothing is exported and the ids
//! are still propagated: a trace started by the gateway keeps its trace id end to end.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The header (gRPC metadata, AMQP header) and outbox column.
pub const HEADER: &str = "traceparent";

/// Spans with this target are the ones exported (see `telemetry::init`).
pub const TARGET: &str = "credits_trace";

/// A position in a trace: the trace, the span that is current, and whether it is sampled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TraceContext {
    trace_id: u128,
    span_id: u64,
    sampled: bool,
}

static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported (set once by `telemetry::init`).
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

pub(crate) fn set_exporting() {
    EXPORTING.store(true, Ordering::Relaxed);
}

fn random_nonzero<T: Default + PartialEq>(f: impl Fn(u128) -> T) -> T {
    loop {
        let v = f(rand::random::<u128>());
        if v != T::default() {
            return v;
        }
    }
}

impl TraceContext {
    /// A `traceparent` value (version 00, or a later version read as 00 as the W3C
    /// specification asks); `None` for anything malformed, all-zero ids, or version `ff`.
    pub fn parse(value: &str) -> Option<TraceContext> {
        let mut parts = value.split('-');
        let (version, trace, span, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let lower_hex = |s: &str, len: usize| {
            s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        };
        if !(lower_hex(version, 2)
            && lower_hex(trace, 32)
            && lower_hex(span, 16)
            && lower_hex(flags, 2))
            || version == "ff"
            || (version == "00" && parts.next().is_some())
        {
            return None;
        }
        let trace_id = u128::from_str_radix(trace, 16).ok()?;
        let span_id = u64::from_str_radix(span, 16).ok()?;
        let flags = u8::from_str_radix(flags, 16).ok()?;
        (trace_id != 0 && span_id != 0).then_some(TraceContext {
            trace_id,
            span_id,
            sampled: flags & 1 == 1,
        })
    }

    /// The `traceparent` value naming this context as the parent.
    pub fn header(&self) -> String {
        format!(
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id,
            self.span_id,
            u8::from(self.sampled)
        )
    }

    /// The trace id, 32 lowercase hex digits.
    pub fn trace_id(&self) -> String {
        format!("{:032x}", self.trace_id)
    }

    /// A new trace (sampled when spans are exported).
    pub fn root() -> TraceContext {
        TraceContext {
            trace_id: random_nonzero(|r| r),
            span_id: random_nonzero(|r| r as u64),
            sampled: exporting(),
        }
    }

    /// A new span in the same trace.
    pub fn child(&self) -> TraceContext {
        TraceContext {
            span_id: random_nonzero(|r| r as u64),
            ..*self
        }
    }

    fn otel(&self) -> opentelemetry::Context {
        let flags = if self.sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        opentelemetry::Context::new().with_remote_span_context(SpanContext::new(
            TraceId::from(self.trace_id),
            SpanId::from(self.span_id),
            flags,
            true,
            TraceState::default(),
        ))
    }
}

tokio::task_local! {
    static CURRENT: TraceContext;
}

/// The trace context of the running task, if it runs in one.
pub fn current() -> Option<TraceContext> {
    CURRENT.try_with(|c| *c).ok()
}

/// The current context's `traceparent`, for an outbox row or an outgoing call.
pub fn current_header() -> Option<String> {
    current().map(|c| c.header())
}

/// Runs `f` in `cx`.
pub fn scope<F: Future>(cx: TraceContext, f: F) -> impl Future<Output = F::Output> {
    CURRENT.scope(cx, f)
}

/// `f` in the context and the span current now (for a task spawned to finish a call's
/// work: its calls and events stay in the trace, its log lines name it).
pub fn carried<F: Future>(f: F) -> impl Future<Output = F::Output> {
    use tracing::Instrument;
    let cx = current();
    let f = f.instrument(tracing::Span::current());
    async move {
        match cx {
            Some(cx) => scope(cx, f).await,
            None => f.await,
        }
    }
}

/// Runs the synchronous `f` in `cx` (for the part of a call that runs before its future).
pub fn sync_scope<R>(cx: TraceContext, f: impl FnOnce() -> R) -> R {
    CURRENT.sync_scope(cx, f)
}

/// A span `name` (`kind`: "server", "consumer") under `parent` (a new trace when `None`),
/// and the context to run its work in: the span's own ids when spans are exported, else
/// a child of `parent`. The span carries the trace id, so log lines inside name it.
pub fn span(
    name: &str,
    kind: &'static str,
    parent: Option<TraceContext>,
) -> (tracing::Span, TraceContext) {
    // No implicit parent: the caller's context is `parent`, whatever span is entered.
    let span = tracing::info_span!(
        target: TARGET,
        parent: None,
        "span",
        otel.name = name,
        otel.kind = kind,
        trace_id = tracing::field::Empty
    );
    let mut cx = None;
    if exporting() {
        if let Some(p) = parent {
            let _ = span.set_parent(p.otel());
        }
        let otel = span.context();
        let sc = otel.span().span_context().clone();
        if sc.is_valid() {
            cx = Some(TraceContext {
                trace_id: u128::from_be_bytes(sc.trace_id().to_bytes()),
                span_id: u64::from_be_bytes(sc.span_id().to_bytes()),
                sampled: sc.is_sampled(),
            });
        }
    }
    let cx = cx.unwrap_or_else(|| parent.map_or_else(TraceContext::root, |p| p.child()));
    if !span.is_disabled() {
        span.record("trace_id", cx.trace_id());
    }
    (span, cx)
}

/// The parent named by a `traceparent` value, if it is a valid one.
pub fn parent_from(value: Option<&[u8]>) -> Option<TraceContext> {
    std::str::from_utf8(value?)
        .ok()
        .and_then(TraceContext::parse)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_and_junk_is_refused() {
        let h = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let cx = TraceContext::parse(h).unwrap();
        assert_eq!(cx.header(), h);
        assert_eq!(cx.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert!(cx.sampled);
        let child = cx.child();
        assert_eq!(child.trace_id(), cx.trace_id());
        assert_ne!(child.header(), cx.header());
        // A later version may carry more fields; read as version 00.
        assert!(
            TraceContext::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-x")
                .is_some()
        );
        for junk in [
            "",
            "00",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902bz-01",
            "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceContext::parse(junk), None, "{junk:?}");
        }
    }

    #[tokio::test]
    async fn a_scope_is_the_current_context_of_its_task_only() {
        let cx = TraceContext::root();
        assert_eq!(current(), None);
        scope(cx, async {
            assert_eq!(current(), Some(cx));
            let (_, child) = span("work", "internal", current());
            assert_eq!(child.trace_id(), cx.trace_id());
        })
        .await;
        assert_eq!(current(), None);
    }
}
