//! What every credits daemon needs, and nothing else: the money type (R1), configuration
//! pieces, telemetry, graceful shutdown, the Prometheus endpoint, database start-up, the
//! bearer-token check, and the transactional outbox relay with its AMQP publisher.

pub mod amqp;
pub mod auth;
pub mod config;
pub mod db;
pub mod error;
pub mod events;
pub mod grpc;
pub mod http;
pub mod ids;
pub mod money;
pub mod outbox;
pub mod rpc_metrics;
pub mod shutdown;
pub mod telemetry;
pub mod tls;
pub mod trace;

pub use money::{Money, MoneyError};
