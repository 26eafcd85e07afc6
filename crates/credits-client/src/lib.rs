//! The typed client of the credits services: the one way callers — the CLI, the bench,
//! tests, a portal — talk to ledger, payments and recharge (STYLE habit 12).
//!
//! - [`Client::connect`] opens lazy channels to the three daemons (nothing is dialled
//!   until the first call, so a client can be built while the services start) and
//!   attaches the bearer token to every call.
//! - [`Client::ledger`], [`Client::payments`] and [`Client::recharge`] are one small
//!   facade per service with one method per RPC of docs/api.md.
//! - In and out, everything is typed: amounts are [`Money`] (sent with `to_wire`, read
//!   with `Money::parse_*`), account ids [`AccountId`], idempotency keys
//!   [`IdempotencyKey`], enums ([`UsageCategory`], [`ChargeStatus`], …) are Rust enums
//!   spelled as in the contract, timestamps `chrono::DateTime<Utc>`. Wire types stay
//!   inside this crate ([`types`] converts them).
//! - Failures are a [`ClientError`] classified by cause; [`ClientError::code`] keeps the
//!   gRPC code.
//! - Calls that are safe to repeat — reads, and money-moving calls with an idempotency
//!   key — are retried with exponential backoff under the [`RetryPolicy`]; the others
//!   (adding, removing, defaulting a payment method, changing auto-recharge) are sent
//!   exactly once.
//!
//! ```no_run
//! use credits_client::{
//!     AccountId, BillingMode, Client, ClientConfig, IdempotencyKey, Money, UsageCategory,
//!     UsageRecord,
//! };
//!
//! # async fn run() -> anyhow::Result<()> {
//! let client = Client::connect(ClientConfig::local())?;
//! let acct = AccountId::parse("acme")?;
//! client.ledger().create_account(&acct, BillingMode::Prepaid, "Acme").await?;
//! let used = client
//!     .ledger()
//!     .record_usage(&UsageRecord {
//!         account_id: acct.clone(),
//!         category: UsageCategory::ApiRequests,
//!         amount: Money::parse_positive("amount", "0.000125")?,
//!         idempotency_key: IdempotencyKey::parse("req-42")?,
//!         description: String::new(),
//!     })
//!     .await?;
//! println!("balance {}, allowed {}", used.balance, used.allowed);
//! # Ok(())
//! # }
//! ```
//!
//! See `examples/usage.rs` for the whole story: connect, create an account, add a card,
//! buy credits, record usage, check access.

mod cache;
mod error;
mod ledger;
mod payments;
mod portal;
mod recharge;
mod recorder;
pub mod retry;
pub mod types;

use std::fmt;
use std::time::Duration;

use credits_common::auth::AttachToken;
use tonic::service::interceptor::InterceptedService;

pub mod csv;
pub use cache::{
    AccessCache, AccessCacheConfig, CacheStatus, CachedAccess, DisconnectedPolicy, OnReset,
    OnUpdate,
};
pub use credits_common::Money;
pub use credits_common::ids::{AccountId, IdempotencyKey};
pub use error::ClientError;
pub use ledger::Ledger;
pub use payments::Payments;
pub use portal::{DEFAULT_PORTAL_URL, Portal, PortalSession};
pub use recharge::Recharge;
pub use recorder::{RecorderConfig, UsageRecorder};
pub use retry::RetryPolicy;
/// The gRPC status code of a [`ClientError`], re-exported so callers need no tonic.
pub use tonic::Code;
pub use types::{
    Access, AccessCheck, AccessUpdate, Account, AttemptStatus, AutoRecharge, AutoRechargeChange,
    BalanceThreshold, BankAccountDetails, BillingMode, CardDetails, CardExpiry, Charge,
    ChargeStatus, CreditSource, CreditsAdded, CreditsToAdd, CreditsToGrant, DisabledReason, Entry,
    EntryKind, Grant, Granularity, Hold, HoldCaptured, HoldRequest, HoldStatus, NewPaymentMethod,
    Page, PaymentMethod, PaymentMethodType, Purchase, RechargeAttempt, UnknownName, UsageCategory,
    UsagePeriod, UsageRecord, UsageRecorded, WatchEvent,
};

/// How long a call may take before it fails with [`ClientError::DeadlineExceeded`],
/// unless [`ClientConfig::timeout`] says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long dialling a service may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The default address of each daemon (docs/api.md).
pub const DEFAULT_LEDGER_URL: &str = "http://127.0.0.1:50051";
pub const DEFAULT_PAYMENTS_URL: &str = "http://127.0.0.1:50052";
pub const DEFAULT_RECHARGE_URL: &str = "http://127.0.0.1:50053";

type AuthChannel = InterceptedService<tonic::transport::Channel, AttachToken>;

/// Where the services are and how to call them.
#[derive(Clone)]
pub struct ClientConfig {
    pub ledger_url: String,
    pub payments_url: String,
    pub recharge_url: String,
    /// Sent as `authorization: Bearer <token>` when set (README "Configuration").
    pub token: Option<String>,
    /// Per call (each attempt of a retried call has its own).
    pub timeout: Duration,
    pub retry: RetryPolicy,
}

impl ClientConfig {
    /// The daemons on their default local ports, no token, the default timeout and
    /// retry policy.
    pub fn local() -> Self {
        ClientConfig {
            ledger_url: DEFAULT_LEDGER_URL.to_owned(),
            payments_url: DEFAULT_PAYMENTS_URL.to_owned(),
            recharge_url: DEFAULT_RECHARGE_URL.to_owned(),
            token: None,
            timeout: DEFAULT_TIMEOUT,
            retry: RetryPolicy::default(),
        }
    }
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig::local()
    }
}

/// The token is a secret: `Debug` never shows it.
impl fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientConfig")
            .field("ledger_url", &self.ledger_url)
            .field("payments_url", &self.payments_url)
            .field("recharge_url", &self.recharge_url)
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("timeout", &self.timeout)
            .field("retry", &self.retry)
            .finish()
    }
}

/// Why a client could not be built. Displays exactly as the underlying error.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// A service URL that is not a URI.
    #[error(transparent)]
    Url(#[from] tonic::transport::Error),
    /// A token that cannot be sent as a header value.
    #[error(transparent)]
    Token(#[from] tonic::metadata::errors::InvalidMetadataValue),
    /// A TLS file that cannot be read, or a certificate without its key.
    #[error("{0}")]
    Tls(String),
}

/// A client of all three services. Cheap to clone; clones share the connections.
#[derive(Clone, Debug)]
pub struct Client {
    ledger: Ledger,
    payments: Payments,
    recharge: Recharge,
}

impl Client {
    /// Builds the three channels. Lazy: no service is dialled until its first call, so
    /// an unreachable service shows up as [`ClientError::Unavailable`] on a call.
    ///
    /// ```
    /// use credits_client::{Client, ClientConfig, RetryPolicy};
    ///
    /// let cfg = ClientConfig {
    ///     token: Some("s3cret".into()),
    ///     retry: RetryPolicy::none(),
    ///     ..ClientConfig::local()
    /// };
    /// assert!(!format!("{cfg:?}").contains("s3cret"));
    /// # let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    /// # let _guard = rt.enter();
    /// let client = Client::connect(cfg)?;
    /// # let _ = client;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn connect(cfg: ClientConfig) -> Result<Client, ConnectError> {
        Self::connect_with_tls(cfg, &credits_common::tls::Tls::default())
    }

    /// [`Client::connect`] over TLS: the services are verified against `tls.ca` (their
    /// URLs are `https://`), and `tls.cert`/`tls.key`, when set, are presented to services
    /// that require mutual TLS.
    pub fn connect_with_tls(
        cfg: ClientConfig,
        tls: &credits_common::tls::Tls,
    ) -> Result<Client, ConnectError> {
        let tls = tls
            .client()
            .map_err(|e| ConnectError::Tls(format!("{e:#}")))?;
        let token = cfg.token.as_deref();
        let ledger = channel(&cfg.ledger_url, token, cfg.timeout, tls.as_ref())?;
        let payments = channel(&cfg.payments_url, token, cfg.timeout, tls.as_ref())?;
        let recharge = channel(&cfg.recharge_url, token, cfg.timeout, tls.as_ref())?;
        Ok(Client {
            ledger: Ledger::new(ledger, cfg.retry),
            payments: Payments::new(payments, cfg.retry),
            recharge: Recharge::new(recharge, cfg.retry),
        })
    }

    /// Accounts, the journal, balances, access, thresholds.
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// Payment methods, charges, credit purchases.
    pub fn payments(&self) -> &Payments {
        &self.payments
    }

    /// Auto-recharge settings and attempts.
    pub fn recharge(&self) -> &Recharge {
        &self.recharge
    }
}

fn channel(
    url: &str,
    token: Option<&str>,
    timeout: Duration,
    tls: Option<&tonic::transport::ClientTlsConfig>,
) -> Result<AuthChannel, ConnectError> {
    let mut endpoint = tonic::transport::Endpoint::from_shared(url.to_owned())?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(timeout)
        .tcp_nodelay(true)
        // A connection whose peer vanished (a machine lost, a partition) is found within
        // seconds, not when the kernel gives up: what long streams (WatchAccess,
        // StreamUsage) need.
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls.clone())?;
    }
    let channel = endpoint.connect_lazy();
    Ok(InterceptedService::new(channel, AttachToken::new(token)?))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_bad_url_or_token_fails_at_connect() {
        let bad_url = ClientConfig {
            ledger_url: "not a url".into(),
            ..ClientConfig::local()
        };
        assert!(matches!(
            Client::connect(bad_url),
            Err(ConnectError::Url(_))
        ));
        let bad_token = ClientConfig {
            token: Some("line\nbreak".into()),
            ..ClientConfig::local()
        };
        assert!(matches!(
            Client::connect(bad_token),
            Err(ConnectError::Token(_))
        ));
    }

    #[tokio::test]
    async fn an_unreachable_service_is_unavailable() {
        // Port 1 on localhost: nothing listens there.
        let cfg = ClientConfig {
            ledger_url: "http://127.0.0.1:1".into(),
            retry: RetryPolicy::new(2, Duration::ZERO, Duration::ZERO),
            ..ClientConfig::local()
        };
        let c = Client::connect(cfg).unwrap();
        let e = c
            .ledger()
            .get_account(&AccountId::parse("acct").unwrap())
            .await
            .unwrap_err();
        assert!(e.is_retryable(), "{e:?}");
        assert_eq!(e.code(), tonic::Code::Unavailable);
    }
}
