//! Who may call what: bearer tokens with roles, checked in front of every gRPC service but
//! health.
//!
//! Two ways to configure it:
//! - `CREDITS_AUTH_TOKEN`: one token that may call everything (the daemons send it to each
//!   other);
//! - `CREDITS_AUTH_TOKENS_FILE`: a file of `<role> <token>` lines (`#` starts a comment),
//!   each token limited to its role:
//!   - `gateway` — `CheckAccess`, usage (`RecordUsage`, `RecordUsageBatch`, `StreamUsage`)
//!     and holds: what an API gateway needs, and nothing that creates money;
//!   - `billing` — reads (`GetAccount`, `ListEntries`, holds), accounts and alerts, every
//!     payments RPC, recharge settings and attempts, portal sessions;
//!   - `internal` — everything, including `AddCredits` and balance thresholds: what the
//!     daemons use between themselves.
//!
//! With neither set, every call is allowed (local development). A missing or unknown token
//! is `UNAUTHENTICATED`; a known token outside its role is `PERMISSION_DENIED`. Reflection
//! is open to any valid token.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::{Request, Status};

/// What a token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Gateway,
    Billing,
    Internal,
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "gateway" => Ok(Role::Gateway),
            "billing" => Ok(Role::Billing),
            "internal" => Ok(Role::Internal),
            other => Err(format!(
                "unknown role {other:?} (gateway, billing or internal)"
            )),
        }
    }
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Gateway => "gateway",
            Role::Billing => "billing",
            Role::Internal => "internal",
        }
    }

    /// Whether this role may call the gRPC method at `path` (`/package.Service/Method`).
    pub fn allows(self, path: &str) -> bool {
        if path.starts_with("/grpc.reflection.") {
            return true;
        }
        let Some((service, method)) = path.trim_start_matches('/').split_once('/') else {
            return false;
        };
        match self {
            Role::Internal => true,
            Role::Gateway => {
                service == "credits.ledger.v1.LedgerService"
                    && matches!(
                        method,
                        "CheckAccess"
                            | "RecordUsage"
                            | "RecordUsageBatch"
                            | "StreamUsage"
                            | "CreateHold"
                            | "CaptureHold"
                            | "ReleaseHold"
                            | "GetHold"
                            | "ListHolds"
                    )
            }
            Role::Billing => match service {
                "credits.ledger.v1.LedgerService" => matches!(
                    method,
                    "CreateAccount"
                        | "GetAccount"
                        | "CheckAccess"
                        | "ListEntries"
                        | "GetHold"
                        | "ListHolds"
                        | "SetBalanceAlerts"
                ),
                "credits.payments.v1.PaymentsService"
                | "credits.recharge.v1.AutoRechargeService"
                | "credits.portal.v1.PortalService" => true,
                _ => false,
            },
        }
    }
}

/// The token table: `Bearer <token>` header value → role. Empty = no auth.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    tokens: HashMap<String, Role>,
}

impl Policy {
    /// From the single all-powerful token and/or the token file's text.
    pub fn new(token: Option<&str>, file_text: Option<&str>) -> Result<Policy, String> {
        let mut tokens = HashMap::new();
        if let Some(t) = token.filter(|t| !t.is_empty()) {
            tokens.insert(format!("Bearer {t}"), Role::Internal);
        }
        if let Some(text) = file_text {
            for (n, line) in text.lines().enumerate() {
                let line = line.split('#').next().unwrap_or("").trim();
                if line.is_empty() {
                    continue;
                }
                let mut parts = line.split_whitespace();
                let (Some(role), Some(token), None) = (parts.next(), parts.next(), parts.next())
                else {
                    return Err(format!(
                        "token file line {}: expected `<role> <token>`",
                        n + 1
                    ));
                };
                let role: Role = role
                    .parse()
                    .map_err(|e| format!("token file line {}: {e}", n + 1))?;
                if token.len() < 16 {
                    return Err(format!(
                        "token file line {}: a token must be at least 16 characters",
                        n + 1
                    ));
                }
                if tokens.insert(format!("Bearer {token}"), role).is_some() {
                    return Err(format!("token file line {}: token listed twice", n + 1));
                }
            }
        }
        Ok(Policy { tokens })
    }

    /// Reads `CREDITS_AUTH_TOKENS_FILE` if given.
    pub fn load(token: Option<&str>, file: Option<&std::path::Path>) -> anyhow::Result<Policy> {
        let text =
            match file {
                Some(f) => Some(std::fs::read_to_string(f).map_err(|e| {
                    anyhow::anyhow!("CREDITS_AUTH_TOKENS_FILE {}: {e}", f.display())
                })?),
                None => None,
            };
        Policy::new(token, text.as_deref()).map_err(|e| anyhow::anyhow!("{e}"))
    }

    pub fn is_open(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Decides one call: `Ok` or the status to answer with.
    pub fn check(&self, path: &str, authorization: Option<&str>) -> Result<(), Status> {
        if self.is_open() || path.starts_with("/grpc.health.v1.Health/") {
            return Ok(());
        }
        let Some(got) = authorization else {
            return Err(Status::unauthenticated(
                "missing authorization: Bearer <token>",
            ));
        };
        // Every known token is compared in full (constant time each), so neither which
        // token matched nor how much of it did shows in the timing.
        let mut role = None;
        for (expected, r) in &self.tokens {
            if constant_time_eq(got.as_bytes(), expected.as_bytes()) {
                role = Some(*r);
            }
        }
        match role {
            None => Err(Status::unauthenticated("invalid bearer token")),
            Some(r) if r.allows(path) => Ok(()),
            Some(r) => Err(Status::permission_denied(format!(
                "the {} role may not call {path}",
                r.as_str()
            ))),
        }
    }
}

/// Compares without an early exit, so the token cannot be guessed byte by byte from timing.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The tower layer that applies a [`Policy`] to every request of a gRPC server.
#[derive(Clone, Debug)]
pub struct AuthLayer {
    policy: Arc<Policy>,
}

impl AuthLayer {
    pub fn new(policy: Policy) -> Self {
        Self {
            policy: Arc::new(policy),
        }
    }
}

impl<S> tower_layer::Layer<S> for AuthLayer {
    type Service = AuthService<S>;
    fn layer(&self, inner: S) -> AuthService<S> {
        AuthService {
            inner,
            policy: self.policy.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct AuthService<S> {
    inner: S,
    policy: Arc<Policy>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S, B, R> tower_service::Service<http::Request<B>> for AuthService<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let authorization = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        match self.policy.check(req.uri().path(), authorization) {
            Ok(()) => {
                let answer = self.inner.call(req);
                Box::pin(async move { answer.await.map(undecodable_is_invalid) })
            }
            Err(status) => {
                let response = status.into_http();
                Box::pin(async move { Ok(response) })
            }
        }
    }
}

/// A request that is not a valid protobuf message — a string field that is not UTF-8, a
/// truncated body — is refused by the codec before any handler runs, as `INTERNAL`. For
/// the caller it is bad input like any other (docs/api.md "Errors", R21): answer `INVALID_ARGUMENT`.
fn undecodable_is_invalid<R>(mut response: http::Response<R>) -> http::Response<R> {
    let headers = response.headers_mut();
    let undecodable = headers.get("grpc-status").is_some_and(|s| s == "13")
        && headers
            .get("grpc-message")
            .and_then(|m| m.to_str().ok())
            .is_some_and(|m| {
                m.replace("%20", " ")
                    .starts_with("failed to decode Protobuf message")
            });
    if undecodable {
        headers.insert("grpc-status", http::HeaderValue::from_static("3"));
        headers.insert(
            "grpc-message",
            http::HeaderValue::from_static(
                "request: not a valid message (a text field that is not UTF-8, or a malformed body)",
            ),
        );
    }
    response
}

/// Adds the bearer token to outgoing requests of a client, when one is configured, and the
/// current trace context (`traceparent`), when the call is made in one.
#[derive(Clone, Debug)]
pub struct AttachToken {
    header: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
}

impl AttachToken {
    pub fn new(token: Option<&str>) -> Result<Self, tonic::metadata::errors::InvalidMetadataValue> {
        let header = match token.filter(|t| !t.is_empty()) {
            Some(t) => Some(format!("Bearer {t}").parse()?),
            None => None,
        };
        Ok(Self { header })
    }
}

impl tonic::service::Interceptor for AttachToken {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(h) = &self.header {
            req.metadata_mut().insert("authorization", h.clone());
        }
        // The caller's trace goes on with the call (crate::trace).
        if !req.metadata().contains_key(crate::trace::HEADER)
            && let Some(tp) = crate::trace::current_header().and_then(|v| v.parse().ok())
        {
            req.metadata_mut().insert(crate::trace::HEADER, tp);
        }
        Ok(req)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const FILE: &str = "# roles\ngateway gw-token-0123456789\nbilling  bill-token-0123456789  # web app\ninternal int-token-0123456789\n";

    fn policy() -> Policy {
        Policy::new(Some("admin-token"), Some(FILE)).unwrap()
    }

    /// What `policy()` answers `token` calling `method` of `service`: `None` when allowed,
    /// else the refusal's code.
    fn refusal(token: &str, service: &str, method: &str) -> Option<tonic::Code> {
        let path = format!("/credits.{service}/{method}");
        policy()
            .check(&path, Some(&format!("Bearer {token}")))
            .err()
            .map(|e| e.code())
    }

    const LEDGER: &str = "ledger.v1.LedgerService";
    const PAYMENTS: &str = "payments.v1.PaymentsService";
    const RECHARGE: &str = "recharge.v1.AutoRechargeService";

    #[test]
    fn the_gateway_token_cannot_mint_credits() {
        let gw = "gw-token-0123456789";
        assert_eq!(refusal(gw, LEDGER, "RecordUsage"), None);
        assert_eq!(refusal(gw, LEDGER, "CheckAccess"), None);
        let denied = Some(tonic::Code::PermissionDenied);
        assert_eq!(refusal(gw, LEDGER, "AddCredits"), denied);
        assert_eq!(refusal(gw, PAYMENTS, "Charge"), denied);
    }

    #[test]
    fn billing_reads_and_pays_but_sets_no_thresholds() {
        let b = "bill-token-0123456789";
        assert_eq!(refusal(b, PAYMENTS, "PurchaseCredits"), None);
        assert_eq!(refusal(b, RECHARGE, "SetAutoRecharge"), None);
        assert_eq!(refusal(b, LEDGER, "GetAccount"), None);
        for denied in ["AddCredits", "SetBalanceThreshold", "RecordUsage"] {
            assert_eq!(
                refusal(b, LEDGER, denied),
                Some(tonic::Code::PermissionDenied)
            );
        }
    }

    #[test]
    fn internal_and_the_single_token_may_do_everything() {
        for t in ["int-token-0123456789", "admin-token"] {
            assert_eq!(refusal(t, LEDGER, "AddCredits"), None);
        }
    }

    #[test]
    fn unknown_or_missing_tokens_are_unauthenticated_health_is_open() {
        let p = policy();
        let path = "/credits.ledger.v1.LedgerService/GetAccount";
        assert_eq!(
            p.check(path, None).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            p.check(path, Some("Bearer nope")).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert!(p.check("/grpc.health.v1.Health/Check", None).is_ok());
        assert!(Policy::default().check(path, None).is_ok());
    }

    #[test]
    fn bad_token_files_are_refused_with_the_line() {
        for bad in [
            "gateway",
            "root tok-0123456789abcdef",
            "gateway short",
            "gateway a-token-0123456789\nbilling a-token-0123456789",
        ] {
            let e = Policy::new(None, Some(bad)).unwrap_err();
            assert!(e.starts_with("token file line"), "{bad:?}: {e}");
        }
    }
}
