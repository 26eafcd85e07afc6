//! Logging through `tracing-subscriber`: `RUST_LOG` filters, `LOG_FORMAT=json|text` picks
//! the format. Installing twice is harmless (tests call it from every test).

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Level;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::{EnvFilter, Layer, Registry, fmt, prelude::*};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Installs the global subscriber writing to stderr. `default_filter` applies when
/// `RUST_LOG` is unset. lapin's own line per message the broker returns as unroutable is
/// silenced (unless `RUST_LOG` names `lapin::returned_messages`): the outbox relay logs the
/// first return of each event itself and counts the rest (`credits_outbox_unroutable_total`),
/// where lapin would log every retry of every event.
///
/// When `OTEL_EXPORTER_OTLP_ENDPOINT` is set (an OTLP/gRPC collector, e.g.
/// `http://otel-collector:4317`), the trace spans of [`crate::trace`] are also
/// exported over OTLP/gRPC as `service` (`OTEL_SERVICE_NAME` wins when set), whatever
/// `RUST_LOG` says: the log filter applies to the log lines only.
pub fn init(format: LogFormat, default_filter: &str, service: &str) {
    let endpoint = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT")
        .ok()
        .filter(|e| !e.trim().is_empty());
    init_with_endpoint(format, default_filter, service, endpoint.as_deref());
}

/// [`init`] with the OTLP endpoint given rather than read from the environment.
pub fn init_with_endpoint(
    format: LogFormat,
    default_filter: &str,
    service: &str,
    otlp_endpoint: Option<&str>,
) {
    let mut filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    if !std::env::var("RUST_LOG").is_ok_and(|v| v.contains("lapin::returned_messages"))
        && let Ok(d) = "lapin::returned_messages=error".parse()
    {
        filter = filter.add_directive(d);
    }
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let log: Box<dyn Layer<Registry> + Send + Sync> = match format {
        LogFormat::Text => fmt::layer()
            .with_ansi(ansi)
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed(),
    };
    let mut layers = vec![log];
    let export = otlp_endpoint.and_then(|e| otlp_layer(service, e));
    let exporting = export.is_some();
    layers.extend(export);
    if tracing_subscriber::registry()
        .with(layers)
        .try_init()
        .is_ok()
        && exporting
    {
        crate::trace::set_exporting();
    }
}

static PROVIDER: std::sync::OnceLock<SdkTracerProvider> = std::sync::OnceLock::new();

/// The OpenTelemetry layer exporting [`crate::trace`]'s spans, when an endpoint is set.
fn otlp_layer(service: &str, endpoint: &str) -> Option<Box<dyn Layer<Registry> + Send + Sync>> {
    if PROVIDER.get().is_some() {
        return None; // installed once per process
    }
    // The builder reads OTEL_EXPORTER_OTLP_HEADERS and _TIMEOUT itself.
    let exporter = match opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
    {
        Ok(e) => e,
        Err(e) => {
            eprintln!("traces are not exported: {e}");
            return None;
        }
    };
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(service.to_owned());
    }
    // The SDK's sampler: parent-based, always on for new traces, unless
    // OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG say otherwise.
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build();
    let tracer = provider.tracer("credits");
    let _ = PROVIDER.set(provider);
    Some(
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_threads(false)
            .with_location(false)
            .with_tracked_inactivity(false)
            .with_filter(Targets::new().with_target(crate::trace::TARGET, Level::INFO))
            .boxed(),
    )
}

/// Exports the spans still buffered; call once before the process exits.
pub async fn flush() {
    if let Some(p) = PROVIDER.get() {
        let p = p.clone();
        let _ = tokio::task::spawn_blocking(move || p.force_flush()).await;
    }
}

/// For tests: quiet unless `TEST_LOG` is set, as in zero-to-production.
pub fn init_for_tests() {
    if std::env::var_os("TEST_LOG").is_some() {
        init(LogFormat::Text, "info", "credits-test");
    }
}
