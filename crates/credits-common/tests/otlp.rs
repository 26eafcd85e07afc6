//! Trace export over OTLP/gRPC, against a collector served by this test (the real OTLP
//! protocol over a real socket; its own process, because the subscriber is global).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use credits_common::telemetry::{self, LogFormat};
use credits_common::trace::{self, TraceContext};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};

#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<ExportTraceServiceRequest>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.lock().unwrap().push(req.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// (service.name, span name, trace id, parent span id, span id) of every exported span.
fn spans(c: &Collector) -> Vec<(String, String, String, String, String)> {
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let mut out = Vec::new();
    for req in c.0.lock().unwrap().iter() {
        for rs in &req.resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .and_then(|a| a.value.as_ref())
                .map(|v| format!("{:?}", v.value))
                .unwrap_or_default();
            for ss in &rs.scope_spans {
                for s in &ss.spans {
                    out.push((
                        service.clone(),
                        s.name.clone(),
                        hex(&s.trace_id),
                        hex(&s.parent_span_id),
                        hex(&s.span_id),
                    ));
                }
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_are_exported_in_the_callers_trace_when_an_endpoint_is_set() {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    telemetry::init_with_endpoint(
        LogFormat::Text,
        "warn",
        "credits-otlp-test",
        Some(&format!("http://{addr}")),
    );
    assert!(trace::exporting());

    let parent =
        TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
    let (span, cx) = trace::span("LedgerService/RecordUsage", "server", Some(parent));
    assert_eq!(cx.trace_id(), parent.trace_id());
    let child_of_span = trace::scope(cx, async {
        trace::span(
            "consume ledger.balance.threshold_crossed",
            "consumer",
            trace::current(),
        )
        .1
    })
    .await;
    drop(span);
    telemetry::flush().await;

    let mut got = Vec::new();
    for _ in 0..50 {
        got = spans(&collector);
        if got.len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let server = got
        .iter()
        .find(|s| s.1 == "LedgerService/RecordUsage")
        .unwrap_or_else(|| panic!("the server span was exported: {got:#?}"));
    assert!(server.0.contains("credits-otlp-test"), "{server:?}");
    assert_eq!(server.2, "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(server.3, "00f067aa0ba902b7", "a child of the caller's span");
    // The context propagated from inside the span is the span itself: what a callee sees
    // as its parent is an exported span, so the trace has no holes.
    assert_eq!(cx.header().split('-').nth(2), Some(server.4.as_str()));
    let consumer = got
        .iter()
        .find(|s| s.1.starts_with("consume "))
        .unwrap_or_else(|| panic!("the consumer span was exported: {got:#?}"));
    assert_eq!(consumer.2, server.2);
    assert_eq!(
        consumer.3, server.4,
        "the consumer's parent is the server span"
    );
    assert_eq!(child_of_span.trace_id(), parent.trace_id());
}
