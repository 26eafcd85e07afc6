//! Per-RPC metrics and trace context for every gRPC server: a tower layer in front of the
//! auth layer, so refused calls are counted too. Each call runs in a trace span whose parent
//! is the caller's `traceparent` header (a new trace without one; see [`crate::trace`]).
//!
//! - `credits_grpc_requests_total{service, method, code}` — one per call, `code` the gRPC
//!   status name (`OK`, `INVALID_ARGUMENT`, …);
//! - `credits_grpc_request_duration_seconds{service, method}` — a histogram of the time to
//!   the response head: the whole call for a unary RPC, the time to open the stream for a
//!   streaming one.
//!
//! The code is read from the response head: an error is sent there ("trailers-only"),
//! a success's `OK` in the trailers, which a layer cannot wait for without holding the
//! body, so a call whose head carries no status counts as `OK` (a stream that fails after
//! it started counts as `OK` here; its items carry their own errors).
//!
//! Labels come only from the server's own methods (R28): a path that is not one of them
//! is counted under `service="unknown", method="unknown"`, and a call refused for its
//! credentials (`UNAUTHENTICATED`, `PERMISSION_DENIED`) under `service="refused",
//! method="refused"`, whatever path it named — so neither a scanner nor a caller without
//! a token can add a series.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use tracing::Instrument;

use crate::trace;

/// The layer; add it to a `tonic::transport::Server` builder.
#[derive(Clone, Debug)]
pub struct RpcMetricsLayer {
    /// Every `/package.Service/Method` the server has.
    known: Arc<HashSet<String>>,
}

impl RpcMetricsLayer {
    /// The methods of every service in the encoded descriptor sets (the daemon's own,
    /// health's, reflection's): the only label values.
    pub fn new(descriptor_sets: &[&[u8]]) -> anyhow::Result<Self> {
        use prost::Message;
        let mut known = HashSet::new();
        for set in descriptor_sets {
            let set = prost_types::FileDescriptorSet::decode(*set)
                .map_err(|e| anyhow::anyhow!("descriptor set: {e}"))?;
            for file in set.file {
                let package = file.package.unwrap_or_default();
                for service in file.service {
                    let name = service.name.unwrap_or_default();
                    let full = if package.is_empty() {
                        name
                    } else {
                        format!("{package}.{name}")
                    };
                    for m in service.method {
                        known.insert(format!("/{full}/{}", m.name.unwrap_or_default()));
                    }
                }
            }
        }
        for v in ["v1", "v1alpha"] {
            known.insert(format!(
                "/grpc.reflection.{v}.ServerReflection/ServerReflectionInfo"
            ));
        }
        Ok(Self {
            known: Arc::new(known),
        })
    }
}

impl<S> tower_layer::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;
    fn layer(&self, inner: S) -> RpcMetrics<S> {
        RpcMetrics {
            inner,
            known: self.known.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct RpcMetrics<S> {
    inner: S,
    known: Arc<HashSet<String>>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S, B, R> tower_service::Service<http::Request<B>> for RpcMetrics<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let (service, method) = if self.known.contains(req.uri().path()) {
            split_path(req.uri().path())
        } else {
            ("unknown".to_owned(), "unknown".to_owned())
        };
        let started = Instant::now();
        // Health checks (probes, every few seconds) are not traced.
        let answer: BoxFuture<_> = if service == "grpc.health.v1.Health" {
            Box::pin(self.inner.call(req))
        } else {
            let parent = trace::parent_from(req.headers().get(trace::HEADER).map(|v| v.as_bytes()));
            // The checked names (a scanner's paths are "unknown/unknown"), not the raw path.
            let (span, cx) = trace::span(&format!("{service}/{method}"), "server", parent);
            let answer = trace::sync_scope(cx, || span.in_scope(|| self.inner.call(req)));
            Box::pin(trace::scope(cx, answer.instrument(span)))
        };
        Box::pin(async move {
            let result = answer.await;
            let code = match &result {
                Ok(r) => status_name(r.headers().get("grpc-status").map(|v| v.as_bytes())),
                Err(_) => "UNKNOWN",
            };
            // A method the server does not have is not a label value; a caller refused
            // for its credentials names no method of ours either.
            let (service, method) = match code {
                "UNIMPLEMENTED" => ("unknown".to_owned(), "unknown".to_owned()),
                "UNAUTHENTICATED" | "PERMISSION_DENIED" => {
                    ("refused".to_owned(), "refused".to_owned())
                }
                _ => (service, method),
            };
            metrics::histogram!(
                "credits_grpc_request_duration_seconds",
                "service" => service.clone(),
                "method" => method.clone()
            )
            .record(started.elapsed().as_secs_f64());
            metrics::counter!(
                "credits_grpc_requests_total",
                "service" => service,
                "method" => method,
                "code" => code
            )
            .increment(1);
            result
        })
    }
}

/// `/credits.ledger.v1.LedgerService/RecordUsage` → (`credits.ledger.v1.LedgerService`,
/// `RecordUsage`); anything else → (`unknown`, `unknown`).
fn split_path(path: &str) -> (String, String) {
    let known = |s: &str| {
        !s.is_empty()
            && s.len() <= 96
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_')
    };
    match path.trim_start_matches('/').split_once('/') {
        Some((s, m)) if known(s) && known(m) => (s.to_owned(), m.to_owned()),
        _ => ("unknown".to_owned(), "unknown".to_owned()),
    }
}

/// The name of a `grpc-status` header value; no header is `OK` (see the module doc).
fn status_name(v: Option<&[u8]>) -> &'static str {
    let Some(v) = v else { return "OK" };
    let code = std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.parse::<i32>().ok())
        .unwrap_or(2);
    match tonic::Code::from_i32(code) {
        tonic::Code::Ok => "OK",
        tonic::Code::Cancelled => "CANCELLED",
        tonic::Code::Unknown => "UNKNOWN",
        tonic::Code::InvalidArgument => "INVALID_ARGUMENT",
        tonic::Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        tonic::Code::NotFound => "NOT_FOUND",
        tonic::Code::AlreadyExists => "ALREADY_EXISTS",
        tonic::Code::PermissionDenied => "PERMISSION_DENIED",
        tonic::Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        tonic::Code::FailedPrecondition => "FAILED_PRECONDITION",
        tonic::Code::Aborted => "ABORTED",
        tonic::Code::OutOfRange => "OUT_OF_RANGE",
        tonic::Code::Unimplemented => "UNIMPLEMENTED",
        tonic::Code::Internal => "INTERNAL",
        tonic::Code::Unavailable => "UNAVAILABLE",
        tonic::Code::DataLoss => "DATA_LOSS",
        tonic::Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn paths_name_service_and_method_or_unknown() {
        assert_eq!(
            split_path("/credits.ledger.v1.LedgerService/RecordUsage"),
            (
                "credits.ledger.v1.LedgerService".into(),
                "RecordUsage".into()
            )
        );
        for junk in ["/", "", "/a", "/a/b/c d", "/a/", "//b", "/a b/c"] {
            assert_eq!(
                split_path(junk),
                ("unknown".into(), "unknown".into()),
                "{junk:?}"
            );
        }
    }

    #[test]
    fn only_the_servers_own_methods_are_known() {
        let layer = RpcMetricsLayer::new(&[tonic_health::pb::FILE_DESCRIPTOR_SET]).unwrap();
        assert!(layer.known.contains("/grpc.health.v1.Health/Check"));
        assert!(layer.known.contains("/grpc.health.v1.Health/Watch"));
        assert!(
            layer
                .known
                .contains("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo")
        );
        assert!(!layer.known.contains("/grpc.health.v1.Health/Made_Up"));
        assert!(RpcMetricsLayer::new(&[b"\xff not a descriptor"]).is_err());
    }

    #[test]
    fn status_headers_name_their_code() {
        assert_eq!(status_name(None), "OK");
        assert_eq!(status_name(Some(b"0")), "OK");
        assert_eq!(status_name(Some(b"3")), "INVALID_ARGUMENT");
        assert_eq!(status_name(Some(b"16")), "UNAUTHENTICATED");
        assert_eq!(status_name(Some(b"junk")), "UNKNOWN");
    }
}
