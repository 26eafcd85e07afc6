//! Who may call what: bearer tokens with roles, checked in front of every gRPC service
//! (health's `Check` excepted, for probes).
//!
//! Two ways to configure it:
//! - `CREDITS_AUTH_TOKEN`: one token that may call everything (the daemons send it to each
//!   other);
//! - `CREDITS_AUTH_TOKENS_FILE`: a file of `<role> <token>` lines (a line starting with
//!   `#` is a comment), each token limited to its role:
//!   - `gateway` — `CheckAccess`, usage (`RecordUsage`, `RecordUsageBatch`, `StreamUsage`)
//!     and holds: what an API gateway needs, and nothing that creates money;
//!   - `billing` — reads (`GetAccount`, `ListEntries`, holds, `GetUsageSummary`), accounts,
//!     alerts and grants (`GrantCredits`, R29), every
//!     payments RPC, recharge settings and attempts, portal sessions;
//!   - `internal` — everything, including `AddCredits` and balance thresholds: what the
//!     daemons use between themselves.
//!
//! Every token is at least 32 characters of printable ASCII, and a file must list one
//! (R28). With neither set, every call is allowed — and the daemons then refuse to listen
//! anywhere but loopback (local development). A missing or unknown token is
//! `UNAUTHENTICATED`; a known token outside its role is `PERMISSION_DENIED`. Reflection and
//! health's `Watch` are open to any valid token; health's `Check` (probes) to anyone.

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
        if path.starts_with("/grpc.reflection.") || path.starts_with("/grpc.health.v1.Health/") {
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
                            | "WatchAccess"
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
                        | "GrantCredits"
                        | "GetUsageSummary"
                ),
                "credits.payments.v1.PaymentsService"
                | "credits.recharge.v1.AutoRechargeService"
                | "credits.portal.v1.PortalService" => true,
                _ => false,
            },
        }
    }
}

/// The shortest token accepted (R28): 32 characters, e.g. `openssl rand -hex 16`.
pub const MIN_TOKEN_LEN: usize = 32;

/// A token is at least [`MIN_TOKEN_LEN`] characters of printable ASCII (no spaces): what
/// an `authorization` header can carry unchanged. The error never shows the token.
pub fn check_token(token: &str) -> Result<(), String> {
    if let Some(c) = token.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(format!(
            "a token may hold only printable ASCII without spaces (found U+{:04X})",
            c as u32
        ));
    }
    if token.len() < MIN_TOKEN_LEN {
        return Err(format!(
            "a token must be at least {MIN_TOKEN_LEN} characters (this one has {})",
            token.len()
        ));
    }
    Ok(())
}

/// The token table: `Bearer <token>` header value → role. Empty = no auth, which the
/// daemons allow only on loopback addresses ([`crate::config::require_auth_off_loopback`]).
#[derive(Clone, Default)]
pub struct Policy {
    tokens: HashMap<String, Role>,
}

/// Never the tokens: how many there are, per role.
impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let count = |r: Role| self.tokens.values().filter(|x| **x == r).count();
        f.debug_struct("Policy")
            .field("internal_tokens", &count(Role::Internal))
            .field("billing_tokens", &count(Role::Billing))
            .field("gateway_tokens", &count(Role::Gateway))
            .finish()
    }
}

/// The role of the caller of a request, put in its extensions by [`AuthService`] for the
/// handlers that decide by role (R28: `CONTRACT` accounts are for `internal` only). With
/// authentication off (loopback only) every caller is `internal`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CallerRole(pub Role);

/// The caller's role of a request that came through [`AuthService`]; the least one
/// (`gateway`) when none was recorded — a request that bypassed the layer gets nothing.
pub fn caller_role<T>(req: &Request<T>) -> Role {
    req.extensions()
        .get::<CallerRole>()
        .map_or(Role::Gateway, |r| r.0)
}

impl Policy {
    /// From the single all-powerful token and/or the token file's text. A file that names
    /// no token, a token under [`MIN_TOKEN_LEN`] characters or with anything but printable
    /// ASCII are refused: none of them may leave authentication off or weak by accident.
    pub fn new(token: Option<&str>, file_text: Option<&str>) -> Result<Policy, String> {
        let mut tokens = HashMap::new();
        if let Some(t) = token.filter(|t| !t.is_empty()) {
            check_token(t).map_err(|e| format!("CREDITS_AUTH_TOKEN: {e}"))?;
            tokens.insert(format!("Bearer {t}"), Role::Internal);
        }
        if let Some(text) = file_text {
            let mut listed = 0;
            for (n, line) in text.lines().enumerate() {
                let line = line.trim();
                // A comment is a whole line: a `#` inside a token is part of the token.
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let mut parts = line.split_whitespace();
                let (Some(role), Some(token), None) = (parts.next(), parts.next(), parts.next())
                else {
                    return Err(format!(
                        "token file line {}: expected `<role> <token>` (a comment goes on a line of its own, starting with #)",
                        n + 1
                    ));
                };
                let role: Role = role
                    .parse()
                    .map_err(|e| format!("token file line {}: {e}", n + 1))?;
                check_token(token).map_err(|e| format!("token file line {}: {e}", n + 1))?;
                if tokens.insert(format!("Bearer {token}"), role).is_some() {
                    return Err(format!("token file line {}: token listed twice", n + 1));
                }
                listed += 1;
            }
            if listed == 0 {
                return Err(
                    "the token file lists no token (`<role> <token>` lines): authentication would be off"
                        .to_owned(),
                );
            }
        }
        Ok(Policy { tokens })
    }

    /// Reads `CREDITS_AUTH_TOKENS_FILE` if given; errors name the setting.
    pub fn load(token: Option<&str>, file: Option<&std::path::Path>) -> anyhow::Result<Policy> {
        let text =
            match file {
                Some(f) => Some(std::fs::read_to_string(f).map_err(|e| {
                    anyhow::anyhow!("CREDITS_AUTH_TOKENS_FILE {}: {e}", f.display())
                })?),
                None => None,
            };
        Policy::new(token, text.as_deref()).map_err(|e| match file {
            Some(f) if e.starts_with("token file") || e.starts_with("the token file") => {
                anyhow::anyhow!("CREDITS_AUTH_TOKENS_FILE {}: {e}", f.display())
            }
            _ => anyhow::anyhow!("{e}"),
        })
    }

    pub fn is_open(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The role of a token (`<token>`, without `Bearer`), if it is one of ours.
    pub fn role_of(&self, token: &str) -> Option<Role> {
        self.role_of_header(&format!("Bearer {token}"))
    }

    /// The role of an `authorization` header value. Every known token is compared in full
    /// (constant time each), so neither which token matched nor how much of it did shows
    /// in the timing.
    fn role_of_header(&self, header: &str) -> Option<Role> {
        let mut role = None;
        for (expected, r) in &self.tokens {
            if constant_time_eq(header.as_bytes(), expected.as_bytes()) {
                role = Some(*r);
            }
        }
        role
    }

    /// Decides one call: the caller's role, or the status to answer with. Only health's
    /// `Check` (what probes call) needs no token; its `Watch`, a stream that stays open,
    /// is a call like any other.
    pub fn check(&self, path: &str, authorization: Option<&str>) -> Result<Role, Status> {
        if self.is_open() {
            return Ok(Role::Internal);
        }
        if path == "/grpc.health.v1.Health/Check" {
            return Ok(Role::Gateway);
        }
        let Some(got) = authorization else {
            return Err(Status::unauthenticated(
                "missing authorization: Bearer <token>",
            ));
        };
        match self.role_of_header(got) {
            None => Err(Status::unauthenticated("invalid bearer token")),
            Some(r) if r.allows(path) => Ok(r),
            Some(r) => Err(Status::permission_denied(format!(
                "the {} role may not call {path}",
                r.as_str()
            ))),
        }
    }
}

/// Compares without an early exit — not on the first differing byte, not on a length
/// mismatch — so the token cannot be guessed byte by byte, nor its length, from timing.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let n = a.len().max(b.len());
    let mut diff = u8::from(a.len() != b.len());
    for i in 0..n {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0xff);
        diff |= x ^ y;
    }
    std::hint::black_box(diff) == 0
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
            Ok(role) => {
                let mut req = req;
                req.extensions_mut().insert(CallerRole(role));
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
#[derive(Clone)]
pub struct AttachToken {
    header: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
}

/// Never the token.
impl std::fmt::Debug for AttachToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AttachToken")
            .field("token", &self.header.as_ref().map(|_| "***"))
            .finish()
    }
}

impl AttachToken {
    pub fn new(token: Option<&str>) -> Result<Self, tonic::metadata::errors::InvalidMetadataValue> {
        let header = match token.filter(|t| !t.is_empty()) {
            Some(t) => {
                let mut v: tonic::metadata::MetadataValue<tonic::metadata::Ascii> =
                    format!("Bearer {t}").parse()?;
                // Kept out of HTTP/2 header compression tables and debug output.
                v.set_sensitive(true);
                Some(v)
            }
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

    const GW: &str = "gw-token-0123456789abcdef0123456789";
    const BILL: &str = "bill-token-0123456789abcdef0123456789";
    const INT: &str = "int-token-0123456789abcdef0123456789";
    const ADMIN: &str = "admin-token-0123456789abcdef01234567";

    fn file() -> String {
        format!("# roles\ngateway {GW}\n  # the web app\nbilling  {BILL}\ninternal {INT}\n")
    }

    fn policy() -> Policy {
        Policy::new(Some(ADMIN), Some(&file())).unwrap()
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
        assert_eq!(refusal(GW, LEDGER, "RecordUsage"), None);
        assert_eq!(refusal(GW, LEDGER, "CheckAccess"), None);
        assert_eq!(refusal(GW, LEDGER, "WatchAccess"), None);
        let denied = Some(tonic::Code::PermissionDenied);
        assert_eq!(refusal(GW, LEDGER, "AddCredits"), denied);
        assert_eq!(refusal(GW, PAYMENTS, "Charge"), denied);
    }

    #[test]
    fn billing_reads_and_pays_but_sets_no_thresholds() {
        assert_eq!(refusal(BILL, PAYMENTS, "PurchaseCredits"), None);
        assert_eq!(refusal(BILL, RECHARGE, "SetAutoRecharge"), None);
        assert_eq!(refusal(BILL, LEDGER, "GetAccount"), None);
        // Every account's balance, streamed, is the gateway's (R31), not a billing page's.
        for denied in [
            "AddCredits",
            "SetBalanceThreshold",
            "RecordUsage",
            "WatchAccess",
        ] {
            assert_eq!(
                refusal(BILL, LEDGER, denied),
                Some(tonic::Code::PermissionDenied)
            );
        }
    }

    #[test]
    fn internal_and_the_single_token_may_do_everything() {
        for t in [INT, ADMIN] {
            assert_eq!(refusal(t, LEDGER, "AddCredits"), None);
        }
    }

    #[test]
    fn the_callers_role_is_what_its_token_says_and_internal_with_auth_off() {
        let p = policy();
        let path = "/credits.ledger.v1.LedgerService/CreateAccount";
        assert_eq!(
            p.check(path, Some(&format!("Bearer {BILL}"))).unwrap(),
            Role::Billing
        );
        assert_eq!(
            p.check(path, Some(&format!("Bearer {INT}"))).unwrap(),
            Role::Internal
        );
        assert_eq!(Policy::default().check(path, None).unwrap(), Role::Internal);
        assert_eq!(p.role_of(BILL), Some(Role::Billing));
        assert_eq!(p.role_of("not-a-token"), None);
    }

    #[test]
    fn unknown_or_missing_tokens_are_unauthenticated_health_check_is_open_watch_is_not() {
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
        assert_eq!(
            p.check("/grpc.health.v1.Health/Watch", None)
                .unwrap_err()
                .code(),
            tonic::Code::Unauthenticated
        );
        assert!(
            p.check(
                "/grpc.health.v1.Health/Watch",
                Some(&format!("Bearer {GW}"))
            )
            .is_ok()
        );
        assert!(Policy::default().check(path, None).is_ok());
    }

    #[test]
    fn bad_token_files_are_refused_with_the_line() {
        for bad in [
            "gateway".to_owned(),
            format!("root {GW}"),
            "gateway short-token".to_owned(),
            format!("gateway {GW}\nbilling {GW}"),
            format!("gateway {GW} # a comment after the token"),
            format!("gateway {GW}\u{7f}"),
            format!("gateway {GW}é"),
        ] {
            let e = Policy::new(None, Some(&bad)).unwrap_err();
            assert!(e.starts_with("token file line"), "{bad:?}: {e}");
            assert!(!e.contains(GW), "the error shows the token: {e}");
        }
    }

    #[test]
    fn a_token_file_without_a_token_refuses_instead_of_turning_auth_off() {
        for empty in ["", "# only a comment\n", "\n   \n# gateway x\n"] {
            let e = Policy::new(None, Some(empty)).unwrap_err();
            assert!(e.contains("lists no token"), "{empty:?}: {e}");
        }
    }

    #[test]
    fn a_hash_inside_a_token_is_part_of_the_token() {
        let token = "abc#def0123456789abcdef0123456789xyz";
        let p = Policy::new(None, Some(&format!("billing {token}\n"))).unwrap();
        assert_eq!(p.role_of(token), Some(Role::Billing));
        assert_eq!(p.role_of("abc"), None);
    }

    #[test]
    fn a_short_or_unprintable_single_token_is_refused_naming_the_setting() {
        for bad in [
            "s3cret",
            "0123456789abcdef0123456789abcde",
            "0123456789abcdef 0123456789abcdef",
        ] {
            let e = Policy::new(Some(bad), None).unwrap_err();
            assert!(e.starts_with("CREDITS_AUTH_TOKEN:"), "{bad:?}: {e}");
        }
        assert!(Policy::new(Some("0123456789abcdef0123456789abcdef"), None).is_ok());
        // Empty is unset (an unset variable in a compose file), not a token.
        assert!(Policy::new(Some(""), None).unwrap().is_open());
    }

    #[test]
    fn tokens_compare_in_full_whatever_their_lengths() {
        assert!(constant_time_eq(b"same-bytes", b"same-bytes"));
        assert!(!constant_time_eq(b"same-bytes", b"same-bytes-and-more"));
        assert!(!constant_time_eq(b"same-bytes-and-more", b"same-bytes"));
        assert!(!constant_time_eq(b"", b"x"));
        assert!(!constant_time_eq(b"x", b""));
        assert!(constant_time_eq(b"", b""));
        // A prefix padded with what the comparison pads with is still not equal.
        assert!(!constant_time_eq(b"ab", b"ab\xff"));
    }

    #[test]
    fn debug_output_never_shows_a_token() {
        let shown = format!("{:?} {:?}", policy(), AuthLayer::new(policy()));
        for t in [GW, BILL, INT, ADMIN] {
            assert!(!shown.contains(t), "{shown}");
        }
        let attach = format!("{:?}", AttachToken::new(Some(ADMIN)).unwrap());
        assert!(!attach.contains(ADMIN), "{attach}");
    }
}
