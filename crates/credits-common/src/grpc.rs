//! The gRPC server scaffolding every daemon shares: per-RPC metrics, health (never behind auth), server
//! reflection (behind auth like every other RPC), and serving on an already-bound listener
//! until shutdown, so tests can bind port 0.

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Server;
use tonic::transport::server::{Router, TcpIncoming};
use tonic_health::server::HealthReporter;

use crate::auth::{AttachToken, AuthLayer, Policy};

/// A client channel to another credits service, carrying the bearer token.
pub type AuthChannel = InterceptedService<tonic::transport::Channel, AttachToken>;

/// Connects lazily, so a daemon starts (and retries) while its peers are down.
pub fn lazy_channel(url: &str, token: Option<&str>) -> anyhow::Result<AuthChannel> {
    lazy_channel_with(url, token, &crate::tls::Tls::default())
}

/// [`lazy_channel`] with TLS when `tls` has a CA (the URL is then `https://`).
pub fn lazy_channel_with(
    url: &str,
    token: Option<&str>,
    tls: &crate::tls::Tls,
) -> anyhow::Result<AuthChannel> {
    let mut endpoint = tonic::transport::Endpoint::from_shared(url.to_owned())?
        .connect_timeout(std::time::Duration::from_secs(2))
        .timeout(std::time::Duration::from_secs(10))
        .tcp_nodelay(true);
    if let Some(cfg) = tls.client()? {
        endpoint = endpoint.tls_config(cfg)?;
    }
    let channel = endpoint.connect_lazy();
    Ok(InterceptedService::new(channel, AttachToken::new(token)?))
}

/// A daemon's router: every request but health goes through the token [`Policy`].
/// Layers run outermost first: per-RPC metrics (so refusals are counted), then auth.
pub type AuthRouter = Router<
    tower_layer::Stack<
        AuthLayer,
        tower_layer::Stack<crate::rpc_metrics::RpcMetricsLayer, tower_layer::Identity>,
    >,
>;

/// R28: the default of the longest a call's handler may run (`GRPC_CALL_TIMEOUT_SECS`) (until its answer starts: a whole unary
/// call, the opening of a stream): past it the call ends `CANCELLED` ("Timeout expired").
/// Longer than a payments call may take with its processor retries (4 tries of 30 s).
pub const CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(180);
/// R28: calls one connection may have in its handlers at once; more wait their turn.
pub const CONCURRENCY_PER_CONNECTION: usize = 256;
/// R28: HTTP/2 streams one connection may hold open.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 1024;

/// A router holding health and reflection behind `policy`; the daemon adds its own
/// service(s).
pub fn base_router(
    descriptor_set: &'static [u8],
    policy: Policy,
    tls: &crate::tls::Tls,
    call_timeout: std::time::Duration,
) -> anyhow::Result<(AuthRouter, HealthReporter)> {
    let (reporter, health) = tonic_health::server::health_reporter();
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(descriptor_set)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    // Both versions: grpc_cli, the Python reflection client, older grpcurl and IDE plugins
    // speak only v1alpha.
    let mut server = Server::builder();
    if let Some(cfg) = tls.server()? {
        server = server.tls_config(cfg)?;
    }
    let router = server
        .tcp_nodelay(true)
        // R28: no call runs forever (a client's shorter `grpc-timeout` wins), and no one
        // connection takes every worker.
        .timeout(call_timeout)
        .concurrency_limit_per_connection(CONCURRENCY_PER_CONNECTION)
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(10)))
        .layer(crate::rpc_metrics::RpcMetricsLayer::new(&[
            descriptor_set,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
        ])?)
        .layer(AuthLayer::new(policy))
        .add_service(health)
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?);
    Ok((router, reporter))
}

/// What a daemon serves: a tonic-generated service (`…ServiceServer<Impl>`).
pub trait GrpcService:
    tower_service::Service<
        http::Request<tonic::body::Body>,
        Response = http::Response<tonic::body::Body>,
        Error = std::convert::Infallible,
        Future: Send + 'static,
    > + tonic::server::NamedService
    + Clone
    + Send
    + Sync
    + 'static
{
}

impl<S> GrpcService for S where
    S: tower_service::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
            Future: Send + 'static,
        > + tonic::server::NamedService
        + Clone
        + Send
        + Sync
        + 'static
{
}

/// A daemon's whole router: [`base_router`] behind `policy`, plus its `service`, which
/// health reports serving.
pub async fn service_router<S: GrpcService>(
    descriptor_set: &'static [u8],
    policy: Policy,
    tls: &crate::tls::Tls,
    service: S,
    call_timeout: std::time::Duration,
) -> anyhow::Result<AuthRouter> {
    let (router, health) = base_router(descriptor_set, policy, tls, call_timeout)?;
    health.set_serving::<S>().await;
    Ok(router.add_service(service))
}

/// Serves until `shutdown` is cancelled, then lets in-flight RPCs finish.
pub async fn serve(
    router: AuthRouter,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    router
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await?;
    Ok(())
}
