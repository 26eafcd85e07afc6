//! Test harness shared by the integration suites: every test gets its own PostgreSQL
//! database and its own exchange, so tests run in parallel against the machine's real
//! PostgreSQL and RabbitMQ without seeing each other.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::VecDeque;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use serde_json::Value;
use sqlx::{Connection, PgConnection};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use credits_proto::ledger::v1::ledger_service_client::LedgerServiceClient;
use credits_proto::payments::v1::payments_service_client::PaymentsServiceClient;
use tonic::transport::Channel;

pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

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

pub async fn pg_connect(url: &str) -> PgConnection {
    PgConnection::connect(url)
        .await
        .expect("connect to test database")
}

/// A running in-process ledger on 127.0.0.1:0.
pub struct Ledger {
    pub addr: std::net::SocketAddr,
    pub database_url: String,
    pub exchange: String,
    pub connection_name: String,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<anyhow::Result<()>>,
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
}

impl Ledger {
    pub async fn start() -> Ledger {
        Self::start_with(LedgerOptions::default()).await
    }

    pub async fn start_with(opts: LedgerOptions) -> Ledger {
        credits_common::telemetry::init_for_tests();
        let database_url = opts
            .database_url
            .clone()
            .unwrap_or_else(|| fresh_database_url("ledger"));
        let exchange = opts
            .exchange
            .clone()
            .unwrap_or_else(|| unique("credits.events.test"));
        let connection_name = unique("credits-ledger-test");
        let mut cfg = credits_ledger::Config::new(&database_url, AMQP_URL);
        cfg.exchange = exchange.clone();
        cfg.auth_token = opts.auth_token;
        cfg.db_max_connections = 16;
        cfg.relay_poll = Duration::from_millis(200);
        cfg.amqp_connection_name = connection_name.clone();
        let shutdown = CancellationToken::new();
        let app = credits_ledger::App::build(cfg, &shutdown)
            .await
            .expect("build ledger");
        let listener = bind(opts.addr).await;
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(app.run(listener, shutdown.clone()));
        Ledger {
            addr,
            database_url,
            exchange,
            connection_name,
            shutdown,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn client(&self) -> LedgerServiceClient<Channel> {
        LedgerServiceClient::connect(self.url())
            .await
            .expect("connect to ledger")
    }

    pub async fn db(&self) -> PgConnection {
        pg_connect(&self.database_url).await
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.expect("join").expect("ledger ran cleanly");
    }

    /// Options that bring this ledger back on the same address, database and exchange.
    pub fn restart_options(&self) -> LedgerOptions {
        LedgerOptions {
            auth_token: None,
            database_url: Some(self.database_url.clone()),
            exchange: Some(self.exchange.clone()),
            addr: Some(self.addr),
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

/// A running in-process payments daemon.
pub struct Payments {
    pub addr: std::net::SocketAddr,
    pub database_url: String,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<anyhow::Result<()>>,
}

#[derive(Clone)]
pub struct PaymentsOptions {
    pub ledger_url: String,
    pub exchange: String,
    pub database_url: Option<String>,
    pub ach_settle: Duration,
    pub auth_token: Option<String>,
    pub sandbox_latency: Duration,
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
        }
    }
}

impl Payments {
    pub async fn start(opts: PaymentsOptions) -> Payments {
        credits_common::telemetry::init_for_tests();
        let database_url = opts
            .database_url
            .clone()
            .unwrap_or_else(|| fresh_database_url("payments"));
        let mut cfg = credits_payments::Config::new(&database_url, AMQP_URL, &opts.ledger_url);
        cfg.exchange = opts.exchange.clone();
        cfg.auth_token = opts.auth_token.clone();
        cfg.db_max_connections = 16;
        cfg.relay_poll = Duration::from_millis(200);
        cfg.recovery_every = Duration::from_millis(200);
        cfg.recovery_stale_after = Duration::from_millis(500);
        cfg.sandbox.ach_settle_delay = opts.ach_settle;
        cfg.sandbox.latency = opts.sandbox_latency;
        cfg.amqp_connection_name = unique("credits-payments-test");
        let shutdown = CancellationToken::new();
        let app = credits_payments::App::build(cfg, &shutdown)
            .await
            .expect("build payments");
        let listener = bind(None).await;
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(app.run(listener, shutdown.clone()));
        Payments {
            addr,
            database_url,
            shutdown,
            task,
        }
    }

    pub async fn client(&self) -> PaymentsServiceClient<Channel> {
        PaymentsServiceClient::connect(format!("http://{}", self.addr))
            .await
            .expect("connect to payments")
    }

    pub async fn db(&self) -> PgConnection {
        pg_connect(&self.database_url).await
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        self.task
            .await
            .expect("join")
            .expect("payments ran cleanly");
    }
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
        let conn = lapin::Connection::connect(AMQP_URL, lapin::ConnectionProperties::default())
            .await
            .expect("amqp");
        let ch = conn.create_channel().await.expect("channel");
        credits_common::amqp::declare_exchange(&ch, exchange)
            .await
            .expect("exchange");
        let queue = unique("tap");
        ch.queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("queue");
        ch.queue_bind(
            queue.as_str().into(),
            exchange.into(),
            routing_pattern.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
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
