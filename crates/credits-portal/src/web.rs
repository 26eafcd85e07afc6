//! The page's HTTP side: the session link, the page, and one POST per form.
//!
//! - `GET /session?token=…` trades a link token for the session cookie (`HttpOnly`,
//!   `SameSite=Strict`, `Secure` behind https) and redirects to `/billing`, so the token
//!   leaves the address bar (and, with `Referrer-Policy: no-referrer`, every referrer).
//!   R28: a link works once; opened while a session of another account is open, it asks
//!   first (`POST /session` with that session's CSRF token switches). `POST
//!   /billing/sign-out` ends the session; every request checks it is still live.
//! - `GET /billing` renders the account of the cookie; nothing in a URL or a form names
//!   the account, so a session cannot reach another one.
//! - Each `POST /billing/…` checks the session, then the CSRF token, before it calls a
//!   service; refused, it changes nothing. Success redirects (POST/redirect/GET) with a
//!   fixed notice; a service's refusal re-renders the page with the error in words next
//!   to the field it names.
//! - `GET /billing/history.csv` streams the account's whole journal as CSV (R30);
//!   `GET /billing/receipts/{charge_id}` is a printable receipt of one paid charge of the
//!   session's account.
//! - Every response carries a strict Content-Security-Policy (no script at all, styles
//!   and forms from this origin only, no framing) and `Cache-Control: no-store`.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::Utc;
use credits_client::{
    AutoRechargeChange, BankAccountDetails, CardDetails, ChargeStatus, Client, ClientError,
    Granularity, IdempotencyKey, Money, NewPaymentMethod, PaymentMethodType,
};

use crate::usage;

use crate::page::StripeCard;

use crate::page::{self, Form, Problem, View};
use crate::session::{Keys, Kind, Refused, Session};

pub const COOKIE: &str = "credits_portal";
pub const SECURE_COOKIE: &str = "__Host-credits_portal";
/// Rows per history table page.
const HISTORY_PAGE: u32 = 20;
const CSP: &str = "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; \
                   frame-ancestors 'none'; base-uri 'none'";
const SCRIPT: &str = include_str!("../assets/billing.js");

/// R24: where Stripe.js comes from, and the one origin the page admits for it.
#[derive(Clone, Debug)]
pub struct StripeJs {
    pub url: String,
    pub origin: String,
}

impl StripeJs {
    /// `STRIPE_JS_URL`: an http(s) URL; its origin is what the CSP admits.
    pub fn parse(url: &str) -> anyhow::Result<StripeJs> {
        let rest = url
            .strip_prefix("https://")
            .map(|r| ("https", r))
            .or_else(|| url.strip_prefix("http://").map(|r| ("http", r)));
        let Some((scheme, rest)) = rest else {
            anyhow::bail!("STRIPE_JS_URL: must be an http(s) URL, got {url:?}");
        };
        let host = rest.split('/').next().unwrap_or_default();
        if host.is_empty()
            || !host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
        {
            anyhow::bail!("STRIPE_JS_URL: no host in {url:?}");
        }
        Ok(StripeJs {
            url: url.to_owned(),
            origin: format!("{scheme}://{host}"),
        })
    }
}

/// The page's Content-Security-Policy: no script at all, or (R24) this origin's Stripe.js
/// and our own small script, nothing else. Stripe.js talks to its own origin (and, for
/// Stripe's real `js.stripe.com`, to Stripe's API and 3-D Secure frames, Stripe's
/// documented hosts).
pub fn csp(stripe: Option<&StripeJs>) -> String {
    let Some(s) = stripe else {
        return CSP.to_owned();
    };
    let (connect, frame) = if s.origin == "https://js.stripe.com" {
        (
            "https://js.stripe.com https://api.stripe.com",
            "https://js.stripe.com https://hooks.stripe.com",
        )
    } else {
        (s.origin.as_str(), s.origin.as_str())
    };
    format!(
        "default-src 'none'; script-src 'self' {o}; connect-src {connect}; frame-src {frame}; \
         style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        o = s.origin
    )
}
/// The longest a bank-account default waits for auto-recharge to be turned off.
const BANK_DEFAULT_SETTLE: std::time::Duration = std::time::Duration::from_secs(3);
const STYLESHEET: &str = include_str!("../assets/portal.css");

/// What the handlers share.
pub struct Web {
    pub client: Client,
    pub keys: Keys,
    pub min_purchase: Money,
    /// Mark the cookie `Secure` (the public URL is https).
    pub secure_cookie: bool,
    /// R24: cards through Stripe.js, when payments charges through Stripe.
    pub stripe_js: Option<StripeJs>,
    /// The Content-Security-Policy of every response ([`csp`]).
    pub csp: String,
    /// R28: used links, live sessions.
    pub store: crate::store::SessionStore,
    /// R28: requests per page session, and link opens per address.
    pub session_rate: credits_common::http::RateLimiter,
    pub link_rate: credits_common::http::RateLimiter,
}

impl Web {
    /// Behind https the cookie is `__Host-` prefixed: the browser then refuses one set by
    /// another host of the domain or for another path.
    fn cookie_name(&self) -> &'static str {
        if self.secure_cookie {
            SECURE_COOKIE
        } else {
            COOKIE
        }
    }

    /// A `Set-Cookie` value of ours: `HttpOnly`, `SameSite=Strict`, the whole site,
    /// `Secure` behind https; `max_age` 0 clears it.
    fn set_cookie(&self, name: &str, value: &str, max_age: i64) -> String {
        format!(
            "{name}={value}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Strict{}",
            if self.secure_cookie { "; Secure" } else { "" }
        )
    }

    /// The cookie of a link being opened (between its two hops).
    fn hop_cookie_name(&self) -> &'static str {
        if self.secure_cookie {
            "__Host-credits_portal_hop"
        } else {
            "credits_portal_hop"
        }
    }
}

pub fn router(web: Arc<Web>) -> Router {
    Router::new()
        .route("/session", get(open_session).post(switch_session))
        .route("/session/continue", get(continue_session))
        .route("/billing/sign-out", post(sign_out))
        .route("/billing", get(show))
        .route("/billing/history.csv", get(history_csv))
        .route("/billing/receipts/{charge_id}", get(receipt))
        .route("/billing/credits", post(add_credits))
        .route("/billing/methods/card", post(add_card))
        .route("/billing/methods/card-token", post(add_card_token))
        .route("/billing/charges/confirm", post(confirm_payment))
        .route("/assets/billing.js", get(script))
        .route("/billing/methods/bank", post(add_bank))
        .route("/billing/methods/default", post(make_default))
        .route("/billing/methods/remove", post(remove_method))
        .route("/billing/auto-recharge", post(save_auto_recharge))
        .route("/assets/portal.css", get(stylesheet))
        .route("/healthz", get(|| async { "ok" }))
        .fallback(|| async {
            html(
                StatusCode::NOT_FOUND,
                page::message_page("Not found", "There is no such page."),
            )
        })
        .layer(axum::middleware::map_response_with_state(
            web.clone(),
            secure_headers,
        ))
        .with_state(web)
}

async fn secure_headers(State(web): State<Arc<Web>>, mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_str(&web.csp).unwrap_or(HeaderValue::from_static(CSP)),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn html(status: StatusCode, body: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        body,
    )
        .into_response()
}

fn see_other(to: &str) -> Response {
    (StatusCode::SEE_OTHER, [(header::LOCATION, to.to_owned())]).into_response()
}

async fn script() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        SCRIPT,
    )
        .into_response()
}

async fn stylesheet() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        STYLESHEET,
    )
        .into_response()
}

fn refused(r: Refused) -> Response {
    html(
        StatusCode::FORBIDDEN,
        page::message_page("Billing settings", &r.to_string()),
    )
}

// ---- sessions ---------------------------------------------------------------------------

/// `GET /session?token=…`: the first hop. A customer arrives here from another site (the
/// platform's, a mail), so the session cookie (`SameSite=Strict`) is not sent and this
/// request cannot see whether a session is open. It checks the link's signature, sets a
/// short-lived hop cookie and moves on by itself to `/session/continue` — a request from
/// this site, which sees the session cookie and can ask before switching (R28). The link
/// is not used here.
async fn open_session(
    State(web): State<Arc<Web>>,
    peer: Option<axum::Extension<credits_common::http::PeerAddr>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let from = peer.map_or_else(|| "unknown".to_owned(), |p| p.0.key());
    if !web.link_rate.allow(&from) {
        return too_many();
    }
    let token = q.get("token").map(String::as_str).unwrap_or_default();
    if let Err(r) = web.keys.verify(Kind::Link, token, Utc::now()) {
        return refused(r);
    }
    let hop = uuid::Uuid::new_v4().simple().to_string();
    let next = format!(
        "/session/continue?token={}&hop={}",
        form_urlencoded::byte_serialize(token.as_bytes()).collect::<String>(),
        web.keys.tag("hop", &hop)
    );
    let mut r = html(StatusCode::OK, page::continue_page(&next));
    let set = web.set_cookie(web.hop_cookie_name(), &hop, 120);
    if let Ok(v) = HeaderValue::from_str(&set) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

/// `GET /session/continue`: the second hop, from this site (its hop cookie proves it: a
/// link made to point here directly from elsewhere has none). Another account's session
/// open → ask; the same account's → the page; none → the link is used and the session
/// opens.
async fn continue_session(
    State(web): State<Arc<Web>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let token = q.get("token").map(String::as_str).unwrap_or_default();
    let proof = q.get("hop").map(String::as_str).unwrap_or_default();
    let hop = cookies(&headers, web.hop_cookie_name());
    let from_here = matches!(&hop[..], [h] if web.keys.tag_ok("hop", h, proof));
    if !from_here {
        tracing::warn!("portal link continued without its hop (not from this site); refused");
        return html(
            StatusCode::FORBIDDEN,
            page::message_page(
                "Billing settings",
                "This billing link could not be opened here. Open it again from where you received it.",
            ),
        );
    }
    let link = match web.keys.verify(Kind::Link, token, Utc::now()) {
        Ok(s) => s,
        Err(r) => return refused(r),
    };
    let mut r = match session(&web, &headers).await {
        // R28: another account's session is open in this browser: ask, do not replace
        // it (a link of an attacker's account must not quietly take the customer's place).
        Ok(current) if current.account != link.account => html(
            StatusCode::OK,
            page::switch_page(
                current.account.as_str(),
                link.account.as_str(),
                token,
                &web.keys.csrf(&current),
            ),
        ),
        // Already open for this account (a reload, Back): the page, the link kept.
        Ok(_) => see_other("/billing"),
        Err(_) => open_link(&web, &link).await,
    };
    let clear = web.set_cookie(web.hop_cookie_name(), "", 0);
    if let Ok(v) = HeaderValue::from_str(&clear) {
        r.headers_mut().append(header::SET_COOKIE, v);
    }
    r
}

/// The values of the request's cookies called `name`.
fn cookies(headers: &HeaderMap, name: &str) -> Vec<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .filter(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
        .collect()
}

/// `POST /session`: the switch the customer confirmed — only with the open session's CSRF
/// token, so another site cannot post it.
async fn switch_session(State(web): State<Arc<Web>>, headers: HeaderMap, body: Bytes) -> Response {
    let sub = match submitted(&web, &headers, &body).await {
        Ok(s) => s,
        Err(d) => return d.into_response(),
    };
    let link = match web.keys.verify(Kind::Link, sub.get("token"), Utc::now()) {
        Ok(s) => s,
        Err(r) => return refused(r),
    };
    let opened = open_link(&web, &link).await;
    // The session it replaces ends only once the new one is open.
    if opened.headers().contains_key(header::SET_COOKIE)
        && let Err(e) = web.store.sign_out(&sub.session.id).await
    {
        tracing::warn!(error = %e, "the replaced portal session could not be signed out");
    }
    opened
}

/// Uses the link (once) and opens its session: the cookie, and a page that moves on.
async fn open_link(web: &Web, link: &Session) -> Response {
    // The cookie's id first: the link is used and the session opened in one transaction.
    let session_id = uuid::Uuid::new_v4().simple().to_string();
    let used = match web.store.use_link_and_open(&link.id, &session_id).await {
        Ok(u) => u,
        Err(e) => return store_unavailable(&e),
    };
    let Some((account, expires_at)) = used else {
        tracing::warn!(account = %link.account, "portal link refused: already used, revoked or expired");
        return refused(Refused::Used);
    };
    if account != link.account.as_str() {
        return refused(Refused::Invalid);
    }
    let cookie = web
        .keys
        .sign_with_id(Kind::Cookie, &link.account, expires_at, &session_id);
    // Rounded up: a session in its last second still gets a cookie for that second.
    let max_age = ((expires_at - Utc::now()).num_milliseconds().max(0) + 999) / 1000;
    let set = web.set_cookie(web.cookie_name(), &cookie, max_age);
    tracing::info!(account = %link.account, "portal session opened");
    // Not a redirect: a customer arriving from the platform's own site is a cross-site
    // navigation, and a redirect keeps it one, so the SameSite=Strict cookie would not be
    // sent to /billing. This page (no script: a meta refresh and a link) makes the next
    // request come from the portal itself, and leaves the token out of the address bar.
    let mut r = html(StatusCode::OK, page::continue_page("/billing"));
    if let Ok(v) = HeaderValue::from_str(&set) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

/// `POST /billing/sign-out`: the session ends here and on every replica; the cookie goes.
async fn sign_out(State(web): State<Arc<Web>>, headers: HeaderMap, body: Bytes) -> Response {
    let sub = match submitted(&web, &headers, &body).await {
        Ok(s) => s,
        Err(d) => return d.into_response(),
    };
    if let Err(e) = web.store.sign_out(&sub.session.id).await {
        return store_unavailable(&e);
    }
    tracing::info!(account = %sub.session.account, "portal session signed out");
    let mut r = html(
        StatusCode::OK,
        page::message_page(
            "Signed out",
            "You are signed out of your billing settings. Open a new link to come back.",
        ),
    );
    let clear = web.set_cookie(web.cookie_name(), "", 0);
    if let Ok(v) = HeaderValue::from_str(&clear) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

fn too_many() -> Response {
    let mut r = html(
        StatusCode::TOO_MANY_REQUESTS,
        page::message_page(
            "Billing settings",
            "Too many requests in a short time. Nothing was changed; wait a minute and try again.",
        ),
    );
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("60"));
    r
}

fn store_unavailable(e: &credits_common::error::ServiceError) -> Response {
    tracing::warn!(error = %e, "portal records unavailable");
    html(
        StatusCode::SERVICE_UNAVAILABLE,
        page::message_page(
            "Billing settings",
            "Billing settings are unavailable for a moment. Nothing was changed; try again shortly.",
        ),
    )
}

/// The session of the request's cookie, still live in the portal's records (R28: not
/// signed out, not revoked). Two cookies of that name (one planted by a sibling domain
/// beside ours) are refused, not guessed between.
async fn session(web: &Web, headers: &HeaderMap) -> Result<Session, Denied> {
    let found = cookies(headers, web.cookie_name());
    let [token] = &found[..] else {
        return Err(Denied::Session(Refused::Invalid));
    };
    let s = web
        .keys
        .verify(Kind::Cookie, token, Utc::now())
        .map_err(Denied::Session)?;
    if !web.session_rate.allow(&s.id) {
        tracing::warn!(account = %s.account, "portal session over its request budget");
        return Err(Denied::TooMany);
    }
    match web.store.session_live(&s.id).await {
        Ok(true) => Ok(s),
        Ok(false) => Err(Denied::Session(Refused::Ended)),
        Err(e) => Err(Denied::Unavailable(e.to_string())),
    }
}

/// Why a request was turned away before anything was looked at.
enum Denied {
    Session(Refused),
    Csrf,
    /// R28: over the session's request budget.
    TooMany,
    /// The portal's records cannot be read: nothing is allowed.
    Unavailable(String),
}

impl IntoResponse for Denied {
    fn into_response(self) -> Response {
        match self {
            Denied::Session(r) => refused(r),
            Denied::TooMany => too_many(),
            Denied::Unavailable(e) => {
                store_unavailable(&credits_common::error::ServiceError::Unavailable(e))
            }
            Denied::Csrf => html(
                StatusCode::FORBIDDEN,
                page::message_page(
                    "Billing settings",
                    "This form could not be accepted (its security token is missing or out of date). Nothing was changed; reload the page and try again.",
                ),
            ),
        }
    }
}

/// A submitted form: its fields, after the session and CSRF checks passed.
struct Submitted {
    session: Session,
    fields: HashMap<String, String>,
}

impl Submitted {
    fn get(&self, name: &str) -> &str {
        self.fields
            .get(name)
            .map(String::as_str)
            .unwrap_or_default()
    }

    fn checked(&self, name: &str) -> bool {
        self.fields.contains_key(name)
    }
}

/// The session, then the CSRF token: nothing else is looked at before both pass.
async fn submitted(web: &Web, headers: &HeaderMap, body: &Bytes) -> Result<Submitted, Denied> {
    let session = session(web, headers).await?;
    let mut fields = HashMap::new();
    for (k, v) in form_urlencoded::parse(body) {
        fields
            .entry(k.into_owned())
            .or_insert_with(|| v.into_owned());
    }
    let csrf = fields.get("csrf").map(String::as_str).unwrap_or_default();
    if !web.keys.csrf_ok(&session, csrf) {
        tracing::warn!(account = %session.account, "portal form without a valid CSRF token refused");
        return Err(Denied::Csrf);
    }
    Ok(Submitted { session, fields })
}

// ---- the page ---------------------------------------------------------------------------

/// Notices a redirect may name; anything else in `?notice=` is ignored.
fn notice(code: &str) -> Option<&'static str> {
    Some(match code {
        "credits-added" => "Credits added.",
        "credits-pending" => "Payment started: bank transfers are credited when they settle.",
        "card-added" => "Card added.",
        "payment-confirmed" => "Payment confirmed. Thank you.",
        "confirm-needed" => {
            "Your bank asks you to confirm this payment: use Confirm payment below."
        }
        "bank-added" => "Bank account added.",
        "default-changed" => "Default payment method changed.",
        "method-removed" => "Payment method removed.",
        "recharge-saved" => "Auto-recharge settings saved.",
        _ => return None,
    })
}

async fn show(
    State(web): State<Arc<Web>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let s = match session(&web, &headers).await {
        Ok(s) => s,
        Err(d) => return d.into_response(),
    };
    let pages = |k: &str| q.get(k).cloned().filter(|t| !t.is_empty());
    render(
        &web,
        &s,
        Paging {
            entries: pages("entries"),
            charges: pages("charges"),
            attempts: pages("attempts"),
        },
        q.get("notice").and_then(|n| notice(n)),
        None,
        HashMap::new(),
    )
    .await
}

#[derive(Default)]
struct Paging {
    entries: Option<String>,
    charges: Option<String>,
    attempts: Option<String>,
}

async fn render(
    web: &Web,
    s: &Session,
    paging: Paging,
    notice: Option<&'static str>,
    problem: Option<(Problem, StatusCode)>,
    kept: HashMap<&'static str, String>,
) -> Response {
    let c = &web.client;
    let acct = &s.account;
    let now = Utc::now();
    let (chart_from, chart_to) = usage::chart_range(now);
    let (avg_from, avg_to) = usage::average_range(now);
    // R30: the chart and the forecast are read beside the rest; without them (a ledger that
    // cannot answer them now) the page is shown with a note in their place.
    let usage_loaded = async {
        tokio::try_join!(
            c.ledger()
                .usage_summary(acct, chart_from, chart_to, Granularity::Day),
            c.ledger()
                .usage_summary(acct, avg_from, avg_to, Granularity::Day),
        )
    };
    let (usage_loaded, loaded) = tokio::join!(usage_loaded, async {
        tokio::try_join!(
            c.ledger().get_account(acct),
            c.payments().list_payment_methods(acct),
            c.recharge().get_auto_recharge(acct),
            c.ledger()
                .list_entries(acct, HISTORY_PAGE, paging.entries.as_deref()),
            c.payments()
                .list_charges(acct, HISTORY_PAGE, paging.charges.as_deref()),
            c.recharge()
                .list_recharge_attempts(acct, HISTORY_PAGE, paging.attempts.as_deref()),
        )
    });
    let usage = match usage_loaded {
        Ok((days, recent)) => Some(page::Usage {
            days,
            from: chart_from,
            last_7_days: recent
                .iter()
                .fold(Money::default(), |sum, p| sum + p.amount),
        }),
        Err(e) => {
            tracing::warn!(error = %e, "usage summary unavailable; page shown without it");
            None
        }
    };
    let (account, methods, recharge, entries, charges, attempts) = match loaded {
        Ok(v) => v,
        Err(e) => return unavailable(&e),
    };
    let (problem, status) = match problem {
        Some((p, status)) => (Some(p), status),
        None => (None, StatusCode::OK),
    };
    // A purchase whose outcome is unknown keeps its key, so submitting it again completes
    // or returns the same payment instead of making a second one.
    let purchase_key = kept
        .get("key")
        .cloned()
        .unwrap_or_else(|| format!("portal-{}", uuid::Uuid::now_v7()));
    // R24: a SetupIntent for this page's card form (Stripe's own pattern: one per page).
    let stripe = match &web.stripe_js {
        None => None,
        Some(js) => Some(match c.payments().create_setup_intent(acct).await {
            Ok(si) => Ok(StripeCard {
                js_url: js.url.clone(),
                client_secret: si.client_secret,
                publishable_key: si.publishable_key,
            }),
            Err(e) => {
                tracing::warn!(error = %e, "card entry unavailable: no SetupIntent");
                Err(())
            }
        }),
    };
    let view = View {
        now,
        usage,
        account,
        methods,
        recharge,
        entries,
        charges,
        attempts,
        min_purchase: web.min_purchase,
        csrf: web.keys.csrf(s),
        purchase_key,
        notice,
        problem,
        kept,
        stripe,
    };
    html(status, page::render(&view))
}

/// R30: the whole journal of the session's account as CSV, newest first, streamed a page
/// at a time (any length, bounded memory). A page that cannot be read ends the file early
/// with a last line saying so, rather than passing for the whole history.
async fn history_csv(State(web): State<Arc<Web>>, headers: HeaderMap) -> Response {
    let s = match session(&web, &headers).await {
        Ok(s) => s,
        Err(d) => return d.into_response(),
    };
    const PAGE: u32 = 500;
    let client = web.client.clone();
    let account = s.account.clone();
    let rows = |p: &credits_client::Page<credits_client::Entry>| {
        let mut chunk = String::new();
        for e in &p.items {
            chunk.push_str(&credits_client::csv::entry_row(e));
            chunk.push('\n');
        }
        chunk
    };
    // The first page before answering: a history that cannot be read is an error page,
    // not a file.
    let first = match client.ledger().list_entries(&account, PAGE, None).await {
        Ok(p) => p,
        Err(e) => return unavailable(&e),
    };
    let head = Bytes::from(format!(
        "{}\n{}",
        credits_client::csv::ENTRIES_HEADER,
        rows(&first)
    ));
    // The rest a page at a time; a page that cannot be read aborts the body, so the
    // browser reports the download failed rather than keeping part of it as the whole.
    let pages = futures_util::stream::unfold(first.next_page_token, move |token| {
        let (client, account) = (client.clone(), account.clone());
        async move {
            let token = token?;
            Some(
                match client
                    .ledger()
                    .list_entries(&account, PAGE, Some(&token))
                    .await
                {
                    Ok(p) => (Ok(Bytes::from(rows(&p))), p.next_page_token),
                    Err(e) => {
                        tracing::warn!(error = %e, "history download cut short");
                        (Err(std::io::Error::other(e.to_string())), None)
                    }
                },
            )
        }
    });
    let body = futures_util::StreamExt::chain(
        futures_util::stream::once(async move { Ok::<_, std::io::Error>(head) }),
        pages,
    );
    (
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_owned()),
            (
                header::CONTENT_DISPOSITION,
                format!(
                    "attachment; filename=\"credits-history-{}.csv\"",
                    s.account.as_str()
                ),
            ),
        ],
        axum::body::Body::from_stream(body),
    )
        .into_response()
}

/// A printable receipt for one paid (SUCCEEDED) charge of the session's account: payments
/// answers only the session's own charges, so another account's id is "no receipt".
async fn receipt(
    State(web): State<Arc<Web>>,
    headers: HeaderMap,
    Path(charge_id): Path<String>,
) -> Response {
    let s = match session(&web, &headers).await {
        Ok(s) => s,
        Err(d) => return d.into_response(),
    };
    let no_receipt = || {
        html(
            StatusCode::NOT_FOUND,
            page::message_page(
                "Receipt",
                "There is no receipt for this payment: it is not one of this account's paid charges.",
            ),
        )
    };
    if charge_id.is_empty()
        || charge_id.len() > 64
        || !charge_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return no_receipt();
    }
    let c = &web.client;
    let loaded = tokio::try_join!(
        c.payments().get_charge(&s.account, &charge_id),
        c.ledger().get_account(&s.account),
    );
    let (charge, account) = match loaded {
        Ok(v) => v,
        Err(ClientError::NotFound { .. } | ClientError::InvalidArgument { .. }) => {
            return no_receipt();
        }
        Err(e) => return unavailable(&e),
    };
    if charge.status != ChargeStatus::Succeeded {
        return no_receipt();
    }
    // The method's brand and last digits, when it is still on file.
    let method = c
        .payments()
        .list_payment_methods(&s.account)
        .await
        .ok()
        .and_then(|ms| {
            ms.into_iter()
                .find(|m| m.payment_method_id == charge.payment_method_id)
        });
    html(
        StatusCode::OK,
        page::receipt_page(&account, &charge, method.as_ref()),
    )
}

fn unavailable(e: &ClientError) -> Response {
    let (status, text) = match e {
        ClientError::NotFound { .. } => (
            StatusCode::NOT_FOUND,
            "This account no longer exists.".to_owned(),
        ),
        e if e.is_retryable() => (
            StatusCode::SERVICE_UNAVAILABLE,
            "Billing is unavailable right now. Please try again in a minute.".to_owned(),
        ),
        ClientError::InvalidArgument { .. } => (
            StatusCode::BAD_REQUEST,
            "That page of history does not exist; start again from the billing page.".to_owned(),
        ),
        _ => (
            StatusCode::BAD_GATEWAY,
            "Billing could not be shown because of a problem on our side. Please try again later."
                .to_owned(),
        ),
    };
    tracing::warn!(error = %e, "portal page could not be loaded");
    html(status, page::message_page("Billing settings", &text))
}

/// The field of `fields` a service's message names (`threshold: …`,
/// `card.number: …`), if any.
fn field_of(message: &str, fields: &[&'static str]) -> Option<&'static str> {
    let named = message.split_once(':').map(|(f, _)| f.trim())?;
    let last = named.rsplit('.').next().unwrap_or(named);
    // The processor names the card number `card_number`.
    let last = if last == "card_number" {
        "number"
    } else {
        last
    };
    fields.iter().copied().find(|f| *f == last)
}

/// Re-renders the page with a refusal next to its field, keeping what was typed in
/// `keep` (never card or bank account numbers).
async fn refuse(
    web: &Web,
    sub: &Submitted,
    form: Form,
    fields: &[&'static str],
    keep: &[&'static str],
    err: Refusal,
) -> Response {
    let unprocessable = StatusCode::UNPROCESSABLE_ENTITY;
    let mut keep_key = false;
    let (field, message, status) = match err {
        Refusal::Field(f, m) => (Some(f), m, unprocessable),
        Refusal::Form(m) => (None, m, unprocessable),
        Refusal::Unconfirmed(m) => {
            keep_key = true;
            (None, m, StatusCode::SERVICE_UNAVAILABLE)
        }
        Refusal::Service(e) if e.is_retryable() => {
            // Whether a sent-once change took effect is unknown; a purchase keeps its key.
            keep_key = true;
            (
                None,
                "Billing did not answer in time; nothing is known to have changed. Reload the page to check, then try again (a purchase submitted again is not charged twice).".to_owned(),
                StatusCode::SERVICE_UNAVAILABLE,
            )
        }
        Refusal::Service(e) => match e {
            // Answers about the request: shown in the service's words, at their field.
            ClientError::InvalidArgument { .. }
            | ClientError::NotFound { .. }
            | ClientError::AlreadyExists { .. }
            | ClientError::FailedPrecondition { .. } => (
                field_of(e.message(), fields),
                e.message().to_owned(),
                unprocessable,
            ),
            // Our own configuration or a fault: not the customer's to read.
            e => {
                tracing::error!(error = %e, "portal form failed");
                (
                    None,
                    "This could not be done because of a problem on our side. Please try again later.".to_owned(),
                    StatusCode::BAD_GATEWAY,
                )
            }
        },
    };
    let mut kept: HashMap<&'static str, String> = keep
        .iter()
        .filter(|k| sub.fields.contains_key(**k))
        .map(|k| (*k, sub.get(k).to_owned()))
        .collect();
    if keep_key && form == Form::Credits {
        kept.insert("key", sub.get("key").to_owned());
    }
    render(
        web,
        &sub.session,
        Paging::default(),
        None,
        Some((
            Problem {
                form,
                field,
                message,
            },
            status,
        )),
        kept,
    )
    .await
}

enum Refusal {
    Field(&'static str, String),
    Form(String),
    /// The outcome is not known yet (a card charge still in flight): say so, keep the key.
    Unconfirmed(String),
    Service(ClientError),
}

impl From<ClientError> for Refusal {
    fn from(e: ClientError) -> Self {
        Refusal::Service(e)
    }
}

fn money(field: &'static str, s: &str) -> Result<Money, Refusal> {
    Money::parse_positive(field, s.trim()).map_err(|e| Refusal::Field(field, e.to_string()))
}

/// Runs one form: the session and CSRF checks, then `act`; success redirects with the
/// notice it returns, a refusal re-renders the page.
macro_rules! form_handler {
    ($name:ident, $form:expr, fields = $fields:expr, keep = $keep:expr, $act:expr) => {
        async fn $name(State(web): State<Arc<Web>>, headers: HeaderMap, body: Bytes) -> Response {
            let sub = match submitted(&web, &headers, &body).await {
                Ok(s) => s,
                Err(d) => return d.into_response(),
            };
            match $act(&web, &sub).await {
                Ok(code) => see_other(&format!("/billing?notice={code}")),
                Err(e) => refuse(&web, &sub, $form, $fields, $keep, e).await,
            }
        }
    };
}

form_handler!(
    add_credits,
    Form::Credits,
    fields = &["amount"],
    keep = &["amount"],
    do_add_credits
);
form_handler!(
    add_card,
    Form::Card,
    fields = &["number", "exp_month", "exp_year", "cvc"],
    keep = &["exp_month", "exp_year"],
    do_add_card
);
form_handler!(
    add_card_token,
    Form::Card,
    fields = &["processor_token"],
    keep = &[],
    do_add_card_token
);
form_handler!(
    confirm_payment,
    Form::Charges,
    fields = &[],
    keep = &[],
    do_confirm_payment
);
form_handler!(
    add_bank,
    Form::Bank,
    fields = &["holder_name", "routing_number", "account_number"],
    keep = &["holder_name", "routing_number"],
    do_add_bank
);
form_handler!(
    make_default,
    Form::Methods,
    fields = &[],
    keep = &[],
    do_make_default
);
form_handler!(
    remove_method,
    Form::Methods,
    fields = &[],
    keep = &[],
    do_remove
);
form_handler!(
    save_auto_recharge,
    Form::AutoRecharge,
    fields = &["threshold", "target", "monthly_limit"],
    keep = &["enabled", "threshold", "target", "monthly_limit"],
    do_save_auto_recharge
);

async fn do_add_credits(web: &Web, sub: &Submitted) -> Result<&'static str, Refusal> {
    let amount = money("amount", sub.get("amount"))?;
    let key = IdempotencyKey::parse(sub.get("key")).map_err(|_| {
        Refusal::Form("This form is out of date; reload the page and try again.".into())
    })?;
    let acct = &sub.session.account;
    let methods = web.client.payments().list_payment_methods(acct).await?;
    if !methods.iter().any(|m| m.is_default) {
        return Err(Refusal::Form(
            "Add a payment method first: credits are bought with your default payment method."
                .into(),
        ));
    }
    let p = web
        .client
        .payments()
        .purchase_credits(acct, amount, None, &key)
        .await
        .map_err(|e| match e {
            // Any refusal of a purchase concerns its amount or the method paying it.
            ClientError::FailedPrecondition { message }
            | ClientError::InvalidArgument { message } => Refusal::Field("amount", message),
            // The kept key, sent again with another amount.
            ClientError::AlreadyExists { .. } => Refusal::Field(
                "amount",
                "This payment was already submitted with another amount; reload the page to start a new one.".into(),
            ),
            e => Refusal::Service(e),
        })?;
    match (p.charge.status, p.charge.payment_method_type) {
        (ChargeStatus::Succeeded, _) if p.entry.is_some() => Ok("credits-added"),
        // R25: the bank wants the customer; the page shows it with its Confirm button.
        (ChargeStatus::Failed, _) if p.charge.action_required => Ok("confirm-needed"),
        (ChargeStatus::Failed, _) => Err(Refusal::Field(
            "amount",
            format!(
                "Your payment was declined ({}). Nothing was charged; try another card or ask your bank.",
                p.charge.failure_code.as_deref().unwrap_or("declined")
            ),
        )),
        (_, PaymentMethodType::UsBankAccount) => Ok("credits-pending"),
        // A card charge (or its credit) not completed yet: the same key finishes it.
        _ => Err(Refusal::Unconfirmed(
            "We could not confirm this payment yet. Submit again to complete it: it will not be charged twice.".into(),
        )),
    }
}

fn whole(field: &'static str, s: &str) -> Result<u32, Refusal> {
    s.trim()
        .parse()
        .map_err(|_| Refusal::Field(field, format!("{field}: must be a whole number")))
}

async fn do_add_card(web: &Web, sub: &Submitted) -> Result<&'static str, Refusal> {
    let card = CardDetails {
        number: sub
            .get("number")
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect(),
        exp_month: whole("exp_month", sub.get("exp_month"))?,
        exp_year: whole("exp_year", sub.get("exp_year"))?,
        cvc: sub.get("cvc").trim().to_owned(),
    };
    add_method(web, sub, NewPaymentMethod::Card(card)).await?;
    Ok("card-added")
}

/// R24: the card went to Stripe.js; we receive only the payment method it made.
async fn do_add_card_token(web: &Web, sub: &Submitted) -> Result<&'static str, Refusal> {
    let token = sub.get("processor_token").trim();
    if token.is_empty() {
        return Err(Refusal::Form(
            "The card was not accepted by the card form; check it and try again.".into(),
        ));
    }
    add_method(web, sub, NewPaymentMethod::ProcessorToken(token.to_owned()))
        .await
        .map_err(|e| match e {
            ClientError::InvalidArgument { message }
            | ClientError::FailedPrecondition { message } => {
                Refusal::Form(format!("This card could not be added: {message}"))
            }
            e => Refusal::Service(e),
        })?;
    Ok("card-added")
}

/// R25: the customer confirmed a payment with their bank (Stripe.js); payments reads it
/// from the processor and credits it once.
async fn do_confirm_payment(web: &Web, sub: &Submitted) -> Result<&'static str, Refusal> {
    web.client
        .payments()
        .confirm_charge(&sub.session.account, sub.get("charge_id"))
        .await
        .map_err(|e| match e {
            ClientError::FailedPrecondition { message } => {
                Refusal::Form(format!("The payment is not confirmed yet: {message}"))
            }
            ClientError::NotFound { .. } | ClientError::InvalidArgument { .. } => {
                Refusal::Form("That payment is not on this account.".into())
            }
            e => Refusal::Service(e),
        })?;
    Ok("payment-confirmed")
}

/// Adds a method to the session's account, the default when the form says so.
async fn add_method(
    web: &Web,
    sub: &Submitted,
    method: NewPaymentMethod,
) -> Result<credits_client::PaymentMethod, ClientError> {
    web.client
        .payments()
        .add_payment_method(&sub.session.account, &method, sub.checked("make_default"))
        .await
}

async fn do_add_bank(web: &Web, sub: &Submitted) -> Result<&'static str, Refusal> {
    let bank = BankAccountDetails {
        routing_number: sub.get("routing_number").trim().to_owned(),
        account_number: sub.get("account_number").trim().to_owned(),
        holder_name: sub.get("holder_name").to_owned(),
    };
    let m = add_method(web, sub, NewPaymentMethod::UsBankAccount(bank)).await?;
    if m.is_default {
        settle_bank_default(web, &sub.session.account).await;
    }
    Ok("bank-added")
}

async fn do_make_default(web: &Web, sub: &Submitted) -> Result<&'static str, Refusal> {
    let m = web
        .client
        .payments()
        .set_default_payment_method(&sub.session.account, sub.get("payment_method_id"))
        .await
        .map_err(method_refusal)?;
    if m.method_type == PaymentMethodType::UsBankAccount {
        settle_bank_default(web, &sub.session.account).await;
    }
    Ok("default-changed")
}

async fn do_remove(web: &Web, sub: &Submitted) -> Result<&'static str, Refusal> {
    web.client
        .payments()
        .remove_payment_method(&sub.session.account, sub.get("payment_method_id"))
        .await
        .map_err(method_refusal)?;
    Ok("method-removed")
}

/// R10: a bank account as the default turns auto-recharge off, but the recharge service
/// learns of it from an event, a moment later. So that the page the customer is sent to
/// already says so (and why), wait a little for it; past that the page shows whatever the
/// service says then, and the next load shows the rest.
async fn settle_bank_default(web: &Web, account: &credits_client::AccountId) {
    let wait = async {
        loop {
            match web.client.recharge().get_auto_recharge(account).await {
                Ok(r) if r.enabled => {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await
                }
                _ => return,
            }
        }
    };
    let _ = tokio::time::timeout(BANK_DEFAULT_SETTLE, wait).await;
}

/// A method id is scoped to the session's account by the payments service: another
/// account's id is simply not found.
fn method_refusal(e: ClientError) -> Refusal {
    match e {
        ClientError::NotFound { .. } | ClientError::InvalidArgument { .. } => {
            Refusal::Form("That payment method is not on this account.".into())
        }
        e => Refusal::Service(e),
    }
}

async fn do_save_auto_recharge(web: &Web, sub: &Submitted) -> Result<&'static str, Refusal> {
    let change = if sub.checked("enabled") {
        let limit = sub.get("monthly_limit").trim();
        AutoRechargeChange::Enable {
            threshold: money("threshold", sub.get("threshold"))?,
            target: money("target", sub.get("target"))?,
            monthly_limit: if limit.is_empty() {
                None
            } else {
                Some(money("monthly_limit", limit)?)
            },
        }
    } else {
        AutoRechargeChange::Disable
    };
    web.client
        .recharge()
        .set_auto_recharge(&sub.session.account, change)
        .await?;
    Ok("recharge-saved")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_services_message_is_shown_at_the_field_it_names() {
        let f = &["number", "exp_month", "cvc"];
        assert_eq!(
            field_of("card.number: must be 12 to 19 digits", f),
            Some("number")
        );
        assert_eq!(field_of("card.cvc: must be 3 or 4 digits", f), Some("cvc"));
        assert_eq!(field_of("threshold: must be greater than zero", f), None);
        assert_eq!(field_of("no colon here", f), None);
        assert_eq!(
            field_of(
                "threshold: must be greater than zero",
                &["threshold", "target"]
            ),
            Some("threshold")
        );
    }

    #[test]
    fn only_known_notices_are_shown() {
        assert_eq!(notice("credits-added"), Some("Credits added."));
        assert_eq!(notice("<script>"), None);
    }
}
