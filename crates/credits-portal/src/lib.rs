//! The portal daemon: the customer's billing settings page (R20).
//!
//! It owns no money. It calls the ledger, payments and recharge over gRPC through
//! `credits-client`, with a `billing`-role token, like any other client. Its small
//! database (`PORTAL_DATABASE_URL`) records which links were used and which page sessions
//! are live (R28: single-use links, sign-out, revocation, on every replica).
//! Layout: [`session`] (signed link tokens, cookies, CSRF — pure) → [`store`] (the
//! records) → [`Sessions`] (`CreatePortalSession`, `RevokePortalSessions`) ← [`grpc`]
//! (`PortalService`); [`web`] (the HTTP routes) → [`page`] (the HTML).

pub mod grpc;
pub mod page;
pub mod session;
pub mod store;
pub mod usage;
pub mod web;

use std::sync::Arc;

use chrono::{DateTime, Utc};
use credits_client::{AccountId, Client, ClientConfig, ClientError, Money};
use credits_common::config::Secret;
use credits_common::error::ServiceError;
use credits_proto::portal::v1::portal_service_server::PortalServiceServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::session::{Keys, Kind};
use crate::store::SessionStore;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Clone, Debug)]
pub struct Config {
    /// Where the services are; `client.token` is the portal's own (billing-role) token.
    pub client: ClientConfig,
    /// The base of the session URLs handed to customers (how the browser reaches the
    /// HTTP listener, e.g. `https://billing.example.com`).
    pub public_url: String,
    pub keys: Keys,
    /// Shown on the page; the payments service enforces it.
    pub min_purchase: Money,
    /// Guards `PortalService` like every daemon's gRPC (`CREDITS_AUTH_TOKEN`).
    pub auth_token: Option<Secret>,
    pub auth_tokens_file: Option<std::path::PathBuf>,
    /// R24: Stripe.js (`STRIPE_JS_URL`): when set, **Add a card** hands the card to
    /// Stripe.js and posts only the resulting payment method id; the page's CSP admits
    /// this script's origin. Unset: the card form posts card details (sandbox only).
    pub stripe_js_url: Option<String>,
    /// R28: the portal's own database (used links, live sessions); created if missing.
    pub database_url: credits_common::config::DatabaseUrl,
    /// R28: the page's timeouts and connection limit.
    pub http_limits: credits_common::http::HttpLimits,
    /// R28: requests per minute a page session may make (forms, pages), and link opens
    /// per minute from one address.
    pub rate_per_minute: u32,
    /// R28: TLS for the page (`PORTAL_TLS_CERT`, `PORTAL_TLS_KEY`); plain HTTP without.
    pub page_tls: Option<(std::path::PathBuf, std::path::PathBuf)>,
    /// gRPC TLS (`CREDITS_TLS_*`): `PortalService` served with it, and the portal's own
    /// calls to the services made with it.
    pub tls: credits_common::tls::Tls,
}

pub const DEFAULT_DATABASE_URL: &str = "postgres://localhost/credits_portal";
/// R28: a link opens a session within this long of being made, once.
pub const LINK_TTL_SECS: u32 = 900;
/// R28: requests per minute per page session (and link opens per address).
pub const DEFAULT_RATE_PER_MINUTE: u32 = 120;

/// Where the portal listens and what links it hands out, unless configured.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50054";
pub const DEFAULT_HTTP_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_METRICS: &str = "127.0.0.1:9154";
pub const DEFAULT_PUBLIC_URL: &str = "http://127.0.0.1:8080";

impl Config {
    pub fn new(client: ClientConfig, public_url: &str, keys: Keys) -> Config {
        Config {
            client,
            public_url: public_url.trim_end_matches('/').to_owned(),
            keys,
            min_purchase: Money::new(rust_decimal::Decimal::new(500, 2)),
            auth_token: None,
            auth_tokens_file: None,
            stripe_js_url: None,
            database_url: credits_common::config::DatabaseUrl::new(DEFAULT_DATABASE_URL),
            http_limits: credits_common::http::HttpLimits::default(),
            rate_per_minute: DEFAULT_RATE_PER_MINUTE,
            page_tls: None,
            tls: credits_common::tls::Tls::default(),
        }
    }
}

/// A created session, as `CreatePortalSession` answers it.
#[derive(Clone, Debug)]
pub struct NewSession {
    pub account: AccountId,
    pub url: String,
    pub expires_at: DateTime<Utc>,
}

/// `CreatePortalSession`: checks the request and that the ledger knows the account, then
/// signs a link.
pub struct Sessions {
    client: Client,
    keys: Keys,
    public_url: String,
    store: SessionStore,
}

/// A session's life when the request says 0, and the longest one may ask for.
pub const DEFAULT_TTL_SECS: u32 = 3600;
pub const MAX_TTL_SECS: u32 = 86_400;

impl Sessions {
    pub async fn create(
        &self,
        account_id: &str,
        ttl_seconds: u32,
    ) -> Result<NewSession, ServiceError> {
        let account = AccountId::parse(account_id)?;
        let ttl = match ttl_seconds {
            0 => DEFAULT_TTL_SECS,
            t if t > MAX_TTL_SECS => {
                return Err(ServiceError::invalid(format!(
                    "ttl_seconds: at most {MAX_TTL_SECS} (a day); got {t}"
                )));
            }
            t => t,
        };
        match self.client.ledger().get_account(&account).await {
            Ok(_) => {}
            Err(ClientError::NotFound { .. }) => {
                return Err(ServiceError::not_found(format!(
                    "account_id: no account {:?}",
                    account.as_str()
                )));
            }
            Err(e) if e.is_retryable() => {
                return Err(ServiceError::Unavailable(format!(
                    "ledger unavailable: {}",
                    e.message()
                )));
            }
            Err(e) => return Err(ServiceError::internal(format!("ledger: {e}"))),
        }
        let expires_at = Utc::now() + chrono::Duration::seconds(i64::from(ttl));
        // Whole seconds: the token carries a unix time, and the answer must match it.
        let expires_at = DateTime::from_timestamp(expires_at.timestamp(), 0).unwrap_or(expires_at);
        // R28: the link itself is good once, for at most 15 minutes; the session it opens
        // lasts the ttl.
        let link_expires_at = expires_at.min(
            DateTime::from_timestamp(Utc::now().timestamp() + i64::from(LINK_TTL_SECS), 0)
                .unwrap_or(expires_at),
        );
        let (token, link_id) = self.keys.sign_id(Kind::Link, &account, link_expires_at);
        self.store
            .new_link(&link_id, account.as_str(), link_expires_at, expires_at)
            .await?;
        tracing::info!(account = %account, ttl, "portal session created");
        Ok(NewSession {
            url: format!("{}/session?token={token}", self.public_url),
            account,
            expires_at,
        })
    }
}

/// R28: the portal calls the services with a `billing`-role token, never an `internal`
/// one — a portal compromised through its page could otherwise mint credits. `client` is
/// `PORTAL_CLIENT_TOKEN`; `all_powerful` is `CREDITS_AUTH_TOKEN`; `policy` is the token
/// file's table, when one is given, which must list `client` as `billing`.
pub fn check_client_token(
    client: Option<&str>,
    all_powerful: Option<&str>,
    policy: Option<&credits_common::auth::Policy>,
) -> anyhow::Result<()> {
    let client = client.filter(|t| !t.is_empty());
    let all_powerful = all_powerful.filter(|t| !t.is_empty());
    match (client, policy) {
        (Some(t), _) if Some(t) == all_powerful => anyhow::bail!(
            "PORTAL_CLIENT_TOKEN is CREDITS_AUTH_TOKEN, which may do everything (mint credits): give the portal a billing-role token (docs/security.md)"
        ),
        (Some(t), Some(p)) => match p.role_of(t) {
            Some(credits_common::auth::Role::Billing) => Ok(()),
            Some(r) => anyhow::bail!(
                "PORTAL_CLIENT_TOKEN has the {} role in CREDITS_AUTH_TOKENS_FILE: the portal needs a billing-role token (docs/security.md)",
                r.as_str()
            ),
            None => anyhow::bail!(
                "PORTAL_CLIENT_TOKEN is not in CREDITS_AUTH_TOKENS_FILE: list it there as `billing <token>` (docs/security.md)"
            ),
        },
        // The services need to know the portal's token as billing: only a token file can
        // say so, and the portal must read the same one to check it.
        (Some(_), None) if all_powerful.is_some() => anyhow::bail!(
            "PORTAL_CLIENT_TOKEN needs CREDITS_AUTH_TOKENS_FILE (the file the services read, listing it as `billing <token>`), so that its role can be checked (docs/security.md)"
        ),
        (Some(t), None) => credits_common::auth::check_token(t)
            .map_err(|e| anyhow::anyhow!("PORTAL_CLIENT_TOKEN: {e}")),
        // The services need a token, and the portal would have none.
        (None, _) if all_powerful.is_some() || policy.is_some() => anyhow::bail!(
            "PORTAL_CLIENT_TOKEN is not set: with authentication on, the portal needs its own billing-role token to call the services (docs/security.md)"
        ),
        (None, _) => Ok(()),
    }
}

impl Sessions {
    /// `RevokePortalSessions`: every live page session of the account ends at its next
    /// request, and its unused links are void. How many sessions were live.
    pub async fn revoke(&self, account_id: &str) -> Result<u64, ServiceError> {
        let account = AccountId::parse(account_id)?;
        let n = self.store.revoke_account(account.as_str()).await?;
        tracing::info!(account = %account, sessions = n, "portal sessions revoked");
        Ok(n)
    }
}

pub struct App {
    cfg: Config,
    client: Client,
    store: SessionStore,
}

impl App {
    /// Connects the services' client and the portal's database (created if missing,
    /// migrated; retried while PostgreSQL is down, until `shutdown`).
    pub async fn build(cfg: Config, shutdown: &CancellationToken) -> anyhow::Result<App> {
        let client = if cfg.tls.is_off() {
            Client::connect(cfg.client.clone())?
        } else {
            Client::connect_with_tls(cfg.client.clone(), &cfg.tls)?
        };
        let pool = credits_common::db::connect(cfg.database_url.expose(), 8, shutdown).await?;
        credits_common::db::migrate(&MIGRATOR, &pool, shutdown).await?;
        Ok(App {
            cfg,
            client,
            store: SessionStore::new(pool),
        })
    }

    /// Serves gRPC on `grpc` and the page on `http` until `shutdown`.
    pub async fn run(
        self,
        grpc: TcpListener,
        http: TcpListener,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let sessions = Arc::new(Sessions {
            client: self.client.clone(),
            keys: self.cfg.keys.clone(),
            public_url: self.cfg.public_url.clone(),
            store: self.store.clone(),
        });
        // Used links and ended sessions are forgotten a day after their end.
        let sweeper = {
            let (store, stop) = (self.store.clone(), shutdown.clone());
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        () = stop.cancelled() => break,
                        () = tokio::time::sleep(std::time::Duration::from_secs(600)) => {}
                    }
                    if let Err(e) = store.sweep().await {
                        tracing::warn!(error = %e, "portal sweep failed; will retry");
                    }
                }
            })
        };
        if self.cfg.public_url.starts_with("https://")
            && self.cfg.auth_token.is_none()
            && self.cfg.auth_tokens_file.is_none()
        {
            // Anyone reaching the gRPC port could open any account's billing page.
            anyhow::bail!(
                "PortalService would be open to anyone: set CREDITS_AUTH_TOKEN or CREDITS_AUTH_TOKENS_FILE (the public URL is https, so this is not local development)"
            );
        }
        let policy = credits_common::auth::Policy::load(
            self.cfg.auth_token.as_ref().map(Secret::expose),
            self.cfg.auth_tokens_file.as_deref(),
        )?;
        credits_common::config::require_auth_off_loopback(
            !policy.is_open(),
            &[
                ("PORTAL_LISTEN_ADDR", grpc.local_addr()?),
                ("PORTAL_HTTP_ADDR", http.local_addr()?),
            ],
        )?;
        let router = credits_common::grpc::service_router(
            credits_proto::FILE_DESCRIPTOR_SET,
            policy,
            &self.cfg.tls,
            PortalServiceServer::new(grpc::PortalGrpc::new(sessions)),
            credits_common::grpc::CALL_TIMEOUT,
        )
        .await?;
        let stripe_js = self
            .cfg
            .stripe_js_url
            .as_deref()
            .map(web::StripeJs::parse)
            .transpose()?;
        let web = Arc::new(web::Web {
            csp: web::csp(stripe_js.as_ref()),
            client: self.client.clone(),
            keys: self.cfg.keys.clone(),
            min_purchase: self.cfg.min_purchase,
            secure_cookie: self.cfg.public_url.starts_with("https://"),
            stripe_js,
            store: self.store.clone(),
            session_rate: credits_common::http::RateLimiter::new(self.cfg.rate_per_minute),
            link_rate: credits_common::http::RateLimiter::new(self.cfg.rate_per_minute),
        });
        let page_tls = match &self.cfg.page_tls {
            Some((cert, key)) => Some(credits_common::http::tls_acceptor(
                "PORTAL_TLS_CERT",
                cert,
                "PORTAL_TLS_KEY",
                key,
            )?),
            None => None,
        };
        tracing::info!(grpc = %grpc.local_addr()?, http = %http.local_addr()?, public_url = %self.cfg.public_url, "portal listening");
        let page = credits_common::http::serve(
            http,
            web::router(web),
            self.cfg.http_limits,
            page_tls,
            shutdown.clone(),
        );
        let served = tokio::try_join!(
            credits_common::grpc::serve(router, grpc, shutdown.clone()),
            page
        );
        shutdown.cancel();
        let _ = sweeper.await;
        self.store.pool().close().await;
        tracing::info!("portal stopped");
        served.map(|_| ())
    }
}

/// The keys from the configuration, or a random key for this process when none is set
/// (sessions then end with the process and work on this replica only).
pub fn keys_from(current: Option<&str>, previous: Option<&str>) -> anyhow::Result<Keys> {
    match current.filter(|k| !k.is_empty()) {
        Some(k) => Keys::new(
            k.as_bytes(),
            previous.filter(|p| !p.is_empty()).map(str::as_bytes),
        ),
        None => {
            tracing::warn!(
                "PORTAL_SIGNING_KEY is not set: using a random key; portal sessions end when this process does and work on this replica only"
            );
            Ok(Keys::random())
        }
    }
}
