//! Test harness shared by the integration suites: every test gets its own PostgreSQL
//! database and its own exchange, so tests run in parallel against the machine's real
//! PostgreSQL and RabbitMQ without seeing each other.

#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod api;
pub mod procs;
pub mod raw;
pub mod stripe;

use std::collections::VecDeque;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use serde_json::Value;
use sqlx::PgConnection;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use credits_proto::ledger::v1::ledger_service_client::LedgerServiceClient;
use credits_proto::payments::v1::payments_service_client::PaymentsServiceClient;
use credits_proto::recharge::v1::auto_recharge_service_client::AutoRechargeServiceClient;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Most test exchanges have no queue for most events: park them soon instead of holding
/// them for the production default.
pub const OUTBOX_PARK_AFTER: Duration = Duration::from_secs(2);

/// A URL no daemon serves: for a service a test does not start (the typed client's
/// channels are lazy, so nothing dials it unless called).
pub const NOBODY: &str = "http://127.0.0.1:9";

/// Base URL of the test PostgreSQL server (no database).
pub fn pg_base() -> String {
    std::env::var("TEST_PG_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_owned())
}

/// A short unique suffix for names.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", &Uuid::new_v4().simple().to_string()[..12])
}

/// A URL for a database that does not exist yet; the daemon creates it (as in production).
pub fn fresh_database_url(service: &str) -> String {
    format!("{}/{}", pg_base(), unique(&format!("credits_t_{service}")))
}

/// A connection to `url`'s database (on the writable host when it names several).
pub async fn pg_connect(url: &str) -> PgConnection {
    credits_common::db::connect_primary(url)
        .await
        .expect("connect to test database")
}

/// The settings every in-process daemon shares: its exchange, a small pool, a quick relay
/// that parks events nobody routes soon, and a findable AMQP connection name.
fn test_daemon(d: &mut credits_common::config::DaemonConfig, exchange: &str, connection: &str) {
    d.exchange = exchange.to_owned();
    d.db_max_connections = 16;
    d.relay_poll = Duration::from_millis(200);
    d.outbox_park_after = OUTBOX_PARK_AFTER;
    d.amqp_connection_name = connection.to_owned();
}

/// What the harness needs of a daemon crate's `App`: build it from its config, then run it
/// on a listener until cancelled.
trait Daemon: Sized {
    type Config;
    const NAME: &'static str;
    fn build(
        cfg: Self::Config,
        shutdown: &CancellationToken,
    ) -> impl std::future::Future<Output = anyhow::Result<Self>>;
    fn run(
        self,
        listener: tokio::net::TcpListener,
        shutdown: CancellationToken,
    ) -> impl std::future::Future<Output = anyhow::Result<()>> + Send + 'static;
    /// A second (HTTP) listener the daemon bound at build, if any.
    fn http_addr(&self) -> Option<std::net::SocketAddr> {
        None
    }
}

macro_rules! daemon {
    ($krate:ident, $name:literal $(, $http:ident)?) => {
        impl Daemon for $krate::App {
            type Config = $krate::Config;
            const NAME: &'static str = $name;
            fn build(
                cfg: Self::Config,
                shutdown: &CancellationToken,
            ) -> impl std::future::Future<Output = anyhow::Result<Self>> {
                $krate::App::build(cfg, shutdown)
            }
            fn run(
                self,
                listener: tokio::net::TcpListener,
                shutdown: CancellationToken,
            ) -> impl std::future::Future<Output = anyhow::Result<()>> + Send + 'static {
                $krate::App::run(self, listener, shutdown)
            }
            $(fn $http(&self) -> Option<std::net::SocketAddr> {
                $krate::App::$http(self)
            })?
        }
    };
}
daemon!(credits_ledger, "ledger");
daemon!(credits_payments, "payments", http_addr);
daemon!(credits_recharge, "recharge");

/// An in-process daemon serving as a task, with its own database.
pub struct Served {
    pub name: &'static str,
    pub addr: std::net::SocketAddr,
    pub database_url: String,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<anyhow::Result<()>>,
    /// The daemon's HTTP listener (payments' webhooks), if it has one.
    pub http_addr: Option<std::net::SocketAddr>,
    /// Its exchange's parking queue, deleted when it stops.
    parking_queue: String,
}

impl Served {
    /// Builds the daemon `D` and serves it on `addr` (127.0.0.1:0 when `None`).
    async fn launch<D: Daemon>(
        cfg: D::Config,
        addr: Option<std::net::SocketAddr>,
        database_url: String,
        exchange: &str,
    ) -> Served {
        credits_common::telemetry::init_for_tests();
        let shutdown = CancellationToken::new();
        let app = D::build(cfg, &shutdown)
            .await
            .unwrap_or_else(|e| panic!("build {}: {e:#}", D::NAME));
        let listener = bind(addr).await;
        Served {
            http_addr: app.http_addr(),
            name: D::NAME,
            addr: listener.local_addr().expect("addr"),
            database_url,
            task: tokio::spawn(app.run(listener, shutdown.clone())),
            shutdown,
            parking_queue: format!("{exchange}.unrouted"),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn db(&self) -> PgConnection {
        pg_connect(&self.database_url).await
    }

    /// Cancels the daemon; it must end cleanly. Its exchange's parking queue is deleted: a
    /// quorum queue holds broker file handles, and a test run leaving hundreds behind
    /// exhausts a default broker's, which then stops accepting connections. (A daemon still
    /// running on the exchange that parks an event meanwhile has it returned, keeps it in
    /// its outbox, reconnects and declares the queue again.)
    async fn stop(self) {
        self.shutdown.cancel();
        self.task
            .await
            .expect("join")
            .unwrap_or_else(|e| panic!("{} did not run cleanly: {e:#}", self.name));
        delete_queues(&self.parking_queue).await;
    }
}

/// The daemons are their [`Served`] task (address, database, task) and a little more.
macro_rules! served {
    ($daemon:ident) => {
        impl std::ops::Deref for $daemon {
            type Target = Served;
            fn deref(&self) -> &Served {
                &self.served
            }
        }
        impl $daemon {
            pub async fn stop(self) {
                self.served.stop().await;
            }
        }
    };
}
served!(Ledger);
served!(Payments);
served!(Recharge);

/// A running in-process ledger on 127.0.0.1:0.
pub struct Ledger {
    pub served: Served,
    pub exchange: String,
    pub connection_name: String,
}

#[derive(Default, Clone)]
pub struct LedgerOptions {
    pub auth_token: Option<String>,
    /// Reuse a database (to restart a ledger); a fresh one when `None`.
    pub database_url: Option<String>,
    /// Reuse an exchange (to share one with other daemons); a fresh one when `None`.
    pub exchange: Option<String>,
    /// Bind this address (to restart on the same port); 127.0.0.1:0 when `None`.
    pub addr: Option<std::net::SocketAddr>,
    /// A `CREDITS_AUTH_TOKENS_FILE` (scoped tokens).
    pub auth_tokens_file: Option<std::path::PathBuf>,
    /// R28: `StreamUsage` bounds (the default's when `None`).
    pub stream_limits: Option<credits_ledger::grpc::StreamLimits>,
    /// R29: `PURCHASED_CREDITS_EXPIRE_DAYS`.
    pub purchased_credits_expire_days: Option<u64>,
    /// R31: the access feed's settings (the defaults when `None`).
    pub feed: Option<credits_ledger::watch::FeedConfig>,
    /// `AMQP_URL` (the local broker when `None`).
    pub amqp_url: Option<String>,
}

impl Ledger {
    pub async fn start() -> Ledger {
        Self::start_with(LedgerOptions::default()).await
    }

    pub async fn start_with(opts: LedgerOptions) -> Ledger {
        let database_url = opts
            .database_url
            .unwrap_or_else(|| fresh_database_url("ledger"));
        let exchange = opts
            .exchange
            .unwrap_or_else(|| unique("credits.events.test"));
        let connection_name = unique("credits-ledger-test");
        let mut cfg = credits_ledger::Config::new(
            &database_url,
            opts.amqp_url.as_deref().unwrap_or(AMQP_URL),
        );
        test_daemon(&mut cfg.daemon, &exchange, &connection_name);
        cfg.daemon.auth_token = opts.auth_token.map(credits_common::config::Secret::new);
        cfg.daemon.auth_tokens_file = opts.auth_tokens_file;
        if let Some(l) = opts.stream_limits {
            cfg.stream_limits = l;
        }
        cfg.purchased_credits_expire_days = opts.purchased_credits_expire_days;
        if let Some(f) = opts.feed {
            cfg.feed = f;
        }
        let served =
            Served::launch::<credits_ledger::App>(cfg, opts.addr, database_url, &exchange).await;
        Ledger {
            served,
            exchange,
            connection_name,
        }
    }

    /// A fresh ledger, its typed client, and a prepaid account `id` that bought `amount`
    /// (key "buy").
    pub async fn with_prepaid(id: &str, amount: &str) -> (Ledger, api::Api) {
        let ledger = Ledger::start().await;
        let c = ledger.api();
        c.prepaid(id, amount).await;
        (ledger, c)
    }

    /// A fresh ledger, its typed client, and an account `id` with nothing on it.
    pub async fn with_account(id: &str, mode: api::BillingMode) -> (Ledger, api::Api) {
        let ledger = Ledger::start().await;
        let c = ledger.api();
        c.create_account(id, mode).await;
        (ledger, c)
    }

    /// [`Ledger::with_prepaid`], with a tap on `pattern` bound before the account exists
    /// (so it sees the activation too).
    pub async fn tapped_with_prepaid(
        pattern: &str,
        id: &str,
        amount: &str,
    ) -> (Ledger, EventTap, api::Api) {
        let ledger = Ledger::start().await;
        let tap = EventTap::bind(&ledger.exchange, pattern).await;
        let c = ledger.api();
        c.prepaid(id, amount).await;
        (ledger, tap, c)
    }

    /// The typed client, for the ledger alone (payments and recharge unreachable).
    pub fn api(&self) -> api::Api {
        api::Api::connect(&self.url(), NOBODY, NOBODY, None)
    }

    /// The raw prost client, for requests the typed client would refuse to send.
    pub async fn client(&self) -> LedgerServiceClient<Channel> {
        LedgerServiceClient::new(channel(&self.url()).await)
    }

    /// How many events wait in the ledger's outbox.
    pub async fn outbox_len(&self) -> i64 {
        let mut db = self.db().await;
        sqlx::query_scalar("SELECT count(*) FROM outbox")
            .fetch_one(&mut db)
            .await
            .expect("count the outbox")
    }

    /// A second replica on this ledger's database and exchange, on a port of its own.
    pub async fn another_replica(&self) -> Ledger {
        Ledger::start_with(LedgerOptions {
            addr: None,
            ..self.restart_options()
        })
        .await
    }

    /// Options that bring this ledger back on the same address, database and exchange.
    pub fn restart_options(&self) -> LedgerOptions {
        LedgerOptions {
            auth_token: None,
            database_url: Some(self.database_url.clone()),
            exchange: Some(self.exchange.clone()),
            addr: Some(self.served.addr),
            auth_tokens_file: None,
            stream_limits: None,
            purchased_credits_expire_days: None,
            feed: None,
            amqp_url: None,
        }
    }
}

async fn bind(addr: Option<std::net::SocketAddr>) -> tokio::net::TcpListener {
    let addr = addr.unwrap_or_else(|| "127.0.0.1:0".parse().unwrap());
    // A just-closed port can take a moment to be free again.
    for _ in 0..50 {
        if let Ok(l) = tokio::net::TcpListener::bind(addr).await {
            return l;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("cannot bind {addr}");
}

/// A connected channel to a daemon, for the raw prost clients and the services the typed
/// client does not cover (health, reflection).
pub async fn channel(url: &str) -> Channel {
    tonic::transport::Endpoint::from_shared(url.to_owned())
        .unwrap_or_else(|e| panic!("url {url}: {e}"))
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"))
}

/// What a gRPC server's health service says of `service`; `None` when it does not answer.
pub async fn health_status(url: &str, service: &str) -> Option<ServingStatus> {
    let ch = tonic::transport::Endpoint::from_shared(url.to_owned())
        .ok()?
        .connect()
        .await
        .ok()?;
    let request = HealthCheckRequest {
        service: service.to_owned(),
    };
    let status = HealthClient::new(ch).check(request).await.ok()?;
    ServingStatus::try_from(status.into_inner().status).ok()
}

/// A running in-process payments daemon.
pub struct Payments {
    pub served: Served,
}

#[derive(Clone)]
pub struct PaymentsOptions {
    pub ledger_url: String,
    pub exchange: String,
    pub database_url: Option<String>,
    pub ach_settle: Duration,
    pub auth_token: Option<String>,
    pub sandbox_latency: Duration,
    /// Charge through Stripe (the emulator's URL and keys) instead of the sandbox.
    pub stripe: Option<credits_payments::stripe::StripeConfig>,
    /// R28: the gRPC call deadline (the default's when `None`).
    pub call_timeout: Option<Duration>,
}

impl PaymentsOptions {
    pub fn for_ledger(ledger: &Ledger) -> Self {
        Self {
            ledger_url: ledger.url(),
            exchange: ledger.exchange.clone(),
            database_url: None,
            ach_settle: Duration::from_millis(1500),
            auth_token: None,
            sandbox_latency: Duration::ZERO,
            stripe: None,
            call_timeout: None,
        }
    }
}

impl Payments {
    pub async fn start(opts: PaymentsOptions) -> Payments {
        let database_url = opts
            .database_url
            .unwrap_or_else(|| fresh_database_url("payments"));
        let mut cfg = credits_payments::Config::new(&database_url, AMQP_URL, &opts.ledger_url);
        let connection = unique("credits-payments-test");
        test_daemon(&mut cfg.daemon, &opts.exchange, &connection);
        cfg.daemon.auth_token = opts.auth_token.map(credits_common::config::Secret::new);
        cfg.recovery_every = Duration::from_millis(200);
        cfg.recovery_stale_after = Duration::from_millis(500);
        cfg.processor = match opts.stripe {
            Some(s) => credits_payments::ProcessorChoice::Stripe(s),
            None => credits_payments::ProcessorChoice::Sandbox(
                credits_payments::processor::SandboxConfig {
                    ach_settle_delay: opts.ach_settle,
                    latency: opts.sandbox_latency,
                    ..Default::default()
                },
            ),
        };
        cfg.http_listen = "127.0.0.1:0".parse().expect("addr");
        if let Some(t) = opts.call_timeout {
            cfg.daemon.call_timeout = t;
        }
        let served =
            Served::launch::<credits_payments::App>(cfg, None, database_url, &opts.exchange).await;
        Payments { served }
    }

    /// The raw prost client, for requests the typed client would refuse to send.
    pub async fn client(&self) -> PaymentsServiceClient<Channel> {
        PaymentsServiceClient::new(channel(&self.url()).await)
    }
}

/// A running in-process recharge worker (one replica).
pub struct Recharge {
    pub served: Served,
}

#[derive(Clone)]
pub struct RechargeOptions {
    pub ledger_url: String,
    pub payments_url: String,
    pub exchange: String,
    pub queue: String,
    pub database_url: String,
    pub stop_after_charge: bool,
    pub skip_recheck_after_success: bool,
    /// R19's "now", shared by every replica started with these options: a test moves it
    /// forward to turn the month.
    pub clock: credits_recharge::domain::Clock,
}

impl Recharge {
    pub async fn start(opts: RechargeOptions) -> Recharge {
        let mut cfg = credits_recharge::Config::new(
            &opts.database_url,
            AMQP_URL,
            &opts.ledger_url,
            &opts.payments_url,
        );
        let connection = unique("credits-recharge-test");
        test_daemon(&mut cfg.daemon, &opts.exchange, &connection);
        cfg.queue = opts.queue;
        cfg.worker.lease = Duration::from_secs(1);
        cfg.worker.retry_after_failure = Duration::from_millis(300);
        cfg.worker.backoff_base = Duration::from_millis(100);
        cfg.worker.backoff_max = Duration::from_secs(2);
        cfg.worker.sweep_every = Duration::from_millis(200);
        cfg.worker.reconcile_every = Duration::from_millis(500);
        cfg.worker.clock = opts.clock;
        cfg.faults.stop_after_charge = opts.stop_after_charge;
        cfg.faults.skip_recheck_after_success = opts.skip_recheck_after_success;
        let served =
            Served::launch::<credits_recharge::App>(cfg, None, opts.database_url, &opts.exchange)
                .await;
        Recharge { served }
    }

    /// The raw prost client, for requests the typed client would refuse to send.
    pub async fn client(&self) -> AutoRechargeServiceClient<Channel> {
        AutoRechargeServiceClient::new(channel(&self.url()).await)
    }
}

/// The three daemons wired together, with `replicas` recharge workers sharing one database
/// and one queue, as in production.
pub struct System {
    pub ledger: Ledger,
    pub payments: Payments,
    pub recharge: Vec<Recharge>,
    pub recharge_opts: RechargeOptions,
}

impl System {
    pub async fn start(replicas: usize) -> System {
        Self::start_with(replicas, Duration::ZERO, false).await
    }

    /// With a slow sandbox processor and, optionally, no immediate R9 re-check.
    pub async fn start_with(
        replicas: usize,
        processor_latency: Duration,
        skip_recheck_after_success: bool,
    ) -> System {
        Self::start_full(replicas, skip_recheck_after_success, |o| {
            o.sandbox_latency = processor_latency
        })
        .await
    }

    /// Charging through Stripe (the emulator's configuration), one recharge replica.
    pub async fn start_stripe(stripe: credits_payments::stripe::StripeConfig) -> System {
        Self::start_full(1, false, |o| o.stripe = Some(stripe)).await
    }

    async fn start_full(
        replicas: usize,
        skip_recheck_after_success: bool,
        payments_options: impl FnOnce(&mut PaymentsOptions),
    ) -> System {
        let ledger = Ledger::start().await;
        let mut opts = PaymentsOptions::for_ledger(&ledger);
        payments_options(&mut opts);
        let payments = Payments::start(opts).await;
        let recharge_opts = RechargeOptions {
            ledger_url: ledger.url(),
            payments_url: payments.url(),
            exchange: ledger.exchange.clone(),
            queue: unique("credits.recharge.test"),
            database_url: fresh_database_url("recharge"),
            stop_after_charge: false,
            skip_recheck_after_success,
            clock: Default::default(),
        };
        let mut recharge = Vec::new();
        for _ in 0..replicas {
            recharge.push(Recharge::start(recharge_opts.clone()).await);
        }
        System {
            ledger,
            payments,
            recharge,
            recharge_opts,
        }
    }

    /// `replicas` recharge workers and the typed client.
    pub async fn connected(replicas: usize) -> (System, api::Api) {
        let sys = System::start(replicas).await;
        let c = sys.api();
        (sys, c)
    }

    /// One recharge replica, the typed client, and a tap on `pattern` bound before anything
    /// happens.
    pub async fn tapped(pattern: &str) -> (System, EventTap, api::Api) {
        let (sys, c) = System::connected(1).await;
        let tap = EventTap::bind(&sys.ledger.exchange, pattern).await;
        (sys, tap, c)
    }

    /// `replicas` recharge workers, the typed client, and `id` funded as [`api::Api::funded`]
    /// does ($25 bought with a Visa, auto-recharge below 10 up to 50).
    pub async fn with_funded(replicas: usize, id: &str) -> (System, api::Api) {
        let (sys, c) = System::connected(replicas).await;
        c.funded(id).await;
        (sys, c)
    }

    /// The typed client of the ledger, payments and the first recharge replica (if any).
    pub fn api(&self) -> api::Api {
        let recharge = self.recharge.first().map(|r| r.url());
        api::Api::connect(
            &self.ledger.url(),
            &self.payments.url(),
            recharge.as_deref().unwrap_or(NOBODY),
            None,
        )
    }

    pub async fn recharge_db(&self) -> PgConnection {
        pg_connect(&self.recharge_opts.database_url).await
    }

    pub async fn stop(self) {
        for r in self.recharge {
            r.stop().await;
        }
        self.payments.stop().await;
        self.ledger.stop().await;
        delete_queues(&self.recharge_opts.queue).await;
    }
}

/// Removes a test's durable queues (quorum queues outlive their consumers).
pub async fn delete_queues(queue: &str) {
    let Ok(conn) = amqp_connect().await else {
        return;
    };
    if let Ok(ch) = conn.create_channel().await {
        for q in [queue.to_owned(), format!("{queue}.dlq")] {
            let _ = ch
                .queue_delete(
                    q.as_str().into(),
                    lapin::options::QueueDeleteOptions::default(),
                )
                .await;
        }
    }
    let _ = conn.close(0, "test done".into()).await;
}

/// How long the test broker may take to open a connection. A broker out of file handles
/// accepts the TCP connection and never answers the AMQP handshake: without a bound, every
/// test touching it would hang instead of failing.
const AMQP_CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// A connection to the test broker, or why there is none within [`AMQP_CONNECT_TIMEOUT`].
async fn amqp_connect() -> Result<lapin::Connection, String> {
    let connect = lapin::Connection::connect(AMQP_URL, lapin::ConnectionProperties::default());
    match tokio::time::timeout(AMQP_CONNECT_TIMEOUT, connect).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(format!("RabbitMQ at {AMQP_URL}: {e}")),
        Err(_) => Err(format!(
            "RabbitMQ at {AMQP_URL} did not open a connection within {AMQP_CONNECT_TIMEOUT:?}; \
             a broker out of file handles does this (`rabbitmqctl eval 'file_handle_cache:info().'`: \
             total_used above total_limit), e.g. after many quorum queues were left behind"
        )),
    }
}

/// A connection to the test broker and a channel on it.
async fn amqp_channel() -> (lapin::Connection, lapin::Channel) {
    let conn = amqp_connect().await.unwrap_or_else(|e| panic!("{e}"));
    let ch = conn.create_channel().await.expect("channel");
    (conn, ch)
}

/// Publishes a raw message to an exchange, as another service (or a bug) would.
pub async fn publish_raw(exchange: &str, routing_key: &str, body: &[u8]) {
    let (conn, ch) = amqp_channel().await;
    ch.confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    ch.basic_publish(
        exchange.into(),
        routing_key.into(),
        lapin::options::BasicPublishOptions::default(),
        body,
        lapin::BasicProperties::default().with_delivery_mode(2),
    )
    .await
    .expect("publish")
    .await
    .expect("confirm");
    let _ = conn.close(0, "done".into()).await;
}

/// Waits up to `wait` until `queue` holds no ready message (its depth is 0).
pub async fn wait_queue_empty(queue: &str, wait: Duration, what: &str) {
    eventually(wait, what, || async {
        (queue_depth(queue).await == 0).then_some(())
    })
    .await
}

/// How many messages wait in a queue (declared passively: it must exist).
pub async fn queue_depth(queue: &str) -> u32 {
    try_queue_depth(queue).await.expect("queue exists")
}

/// How many messages wait in `queue`; `None` while it does not exist.
pub async fn try_queue_depth(queue: &str) -> Option<u32> {
    let (conn, ch) = amqp_channel().await;
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let declared = ch.queue_declare(queue.into(), passive, FieldTable::default());
    let n = declared.await.ok().map(|q| q.message_count());
    let _ = conn.close(0, "done".into()).await;
    n
}

/// Declares a classic durable queue, as a release before quorum parking queues did.
pub async fn declare_classic_queue(queue: &str) {
    let (conn, ch) = amqp_channel().await;
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare(queue.into(), durable, FieldTable::default())
        .await
        .expect("declare a classic queue");
    let _ = conn.close(0, "done".into()).await;
}

/// A queue's type (`classic`, `quorum`), as the broker lists it.
pub async fn queue_type(queue: &str) -> String {
    let out = tokio::process::Command::new("rabbitmqctl")
        .args(["-q", "list_queues", "name", "type", "--no-table-headers"])
        .output()
        .await
        .expect("rabbitmqctl list_queues");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            (f.next() == Some(queue)).then(|| f.next().unwrap_or_default().to_owned())
        })
        .unwrap_or_else(|| panic!("queue {queue} not listed"))
}

/// One raw HTTP/1.0 GET of `path` (with a cookie, if any) from `addr` (host:port, or an
/// http:// URL): the whole response, head and body.
pub async fn http_get(addr: &str, path: &str, cookie: Option<&str>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = addr.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let cookie = cookie
        .map(|c| format!("Cookie: {c}\r\n"))
        .unwrap_or_default();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n{cookie}\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

/// Polls `check` until it returns `Some`, or panics after `wait`.
pub async fn eventually<T, F, Fut>(wait: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {wait:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A queue bound to a test exchange that collects every event published there.
pub struct EventTap {
    consumer: lapin::Consumer,
    _conn: lapin::Connection,
    buffered: VecDeque<Value>,
}

impl EventTap {
    pub async fn bind(exchange: &str, routing_pattern: &str) -> EventTap {
        let (conn, ch) = amqp_channel().await;
        let queue = unique("tap");
        credits_common::amqp::declare_private_queue(
            &ch,
            exchange,
            &queue,
            routing_pattern,
            FieldTable::default(),
        )
        .await
        .expect("tap queue");
        let consumer = ch
            .basic_consume(
                queue.as_str().into(),
                "tap".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume");
        EventTap {
            consumer,
            _conn: conn,
            buffered: VecDeque::new(),
        }
    }

    async fn pull(&mut self, wait: Duration) -> Option<Value> {
        if let Some(v) = self.buffered.pop_front() {
            return Some(v);
        }
        let delivery = tokio::time::timeout(wait, self.consumer.next())
            .await
            .ok()??
            .ok()?;
        delivery.ack(BasicAckOptions::default()).await.ok()?;
        let mut body: Value = serde_json::from_slice(&delivery.data).expect("event is JSON");
        // Keep the AMQP properties next to the body so tests can check them too.
        body["_amqp"] = serde_json::json!({
            "message_id": delivery.properties.message_id().as_ref().map(|s| s.to_string()),
            "type": delivery.properties.kind().as_ref().map(|s| s.to_string()),
            "content_type": delivery.properties.content_type().as_ref().map(|s| s.to_string()),
            "delivery_mode": delivery.properties.delivery_mode(),
            "traceparent": credits_common::amqp::traceparent_of(&delivery.properties)
                .map(|t| t.header()),
            // The body as it arrived, for tests that parse it with the contract's type.
            "body": String::from_utf8_lossy(&delivery.data),
        });
        Some(body)
    }

    /// The next event with this type, waiting up to `wait`.
    pub async fn next_of(&mut self, kind: &str, wait: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut skipped = VecDeque::new();
        let found = loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.pull(left).await {
                Some(v) if v["type"] == kind => break Some(v),
                Some(v) => skipped.push_back(v),
                None => break None,
            }
        };
        skipped.extend(self.buffered.drain(..));
        self.buffered = skipped;
        found
    }

    /// The next event with this type, which must arrive within `wait`.
    pub async fn expect(&mut self, kind: &str, wait: Duration) -> Value {
        self.next_of(kind, wait)
            .await
            .unwrap_or_else(|| panic!("no {kind} event within {wait:?}"))
    }

    /// One string field (`"type"`, `"id"`, …) of every event that arrives within `wait`.
    pub async fn drain_field(&mut self, wait: Duration, field: &str) -> Vec<String> {
        let events = self.drain(wait).await;
        let text = |e: &Value| e[field].as_str().map(str::to_owned);
        events
            .iter()
            .map(|e| text(e).unwrap_or_else(|| panic!("event without a {field}: {e}")))
            .collect()
    }

    /// Asserts that no event arrives within `wait`.
    pub async fn expect_none(&mut self, wait: Duration, why: &str) {
        let events = self.drain(wait).await;
        assert!(events.is_empty(), "{why}: {events:#?}");
    }

    /// Every event that arrives within `wait`.
    pub async fn drain(&mut self, wait: Duration) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut out = Vec::new();
        while let Some(v) = self
            .pull(deadline.saturating_duration_since(tokio::time::Instant::now()))
            .await
        {
            out.push(v);
        }
        out
    }
}

/// Closes the broker-side AMQP connection(s) whose client name contains `name`, like an
/// operator or a network fault would. Returns how many it closed.
pub async fn kill_amqp_connections(name: &str) -> usize {
    let out = tokio::process::Command::new("rabbitmqctl")
        .args(["-q", "list_connections", "pid", "client_properties"])
        .output()
        .await
        .expect("run rabbitmqctl");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut closed = 0;
    for line in text.lines().filter(|l| l.contains(name)) {
        let Some(pid) = line.split_whitespace().next() else {
            continue;
        };
        let status = tokio::process::Command::new("rabbitmqctl")
            .args([
                "-q",
                "close_connection",
                pid,
                "test: simulated connection drop",
            ])
            .status()
            .await
            .expect("run rabbitmqctl");
        if status.success() {
            closed += 1;
        }
    }
    closed
}
