//! The Stripe connector: a translation between our processor calls and Stripe's HTTP API
//! (form-encoded requests, JSON answers), and nothing else — the rules stay in the service.
//!
//! - One `reqwest` client (rustls), a pinned `Stripe-Version`, the base URL a setting, so
//!   Stripe and the emulator the tests use (`localstripe`) differ only by configuration.
//! - Every POST carries an `Idempotency-Key` that is ours (the charge id, the refund id,
//!   `customer:<account>`), the same on every retry. Network errors, 5xx and 429 are
//!   retried with backoff; other 4xx never are.
//! - Models hold only the fields we read, each optional where Stripe may omit it.
//! - Webhook signatures (`Stripe-Signature: t=…,v1=…`) are checked by [`verify_signature`]:
//!   HMAC-SHA256 of `t.body`, any `v1` may match, compared in constant time, at most
//!   [`SIGNATURE_TOLERANCE_SECS`] old.

use std::time::Duration;

use credits_common::Money;
use credits_common::config::Secret;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde_json::Value;
use sha2::Sha256;

use crate::processor::{
    AttachedMethod, ChargeInput, ProcessorCharge, ProcessorError, ProcessorRefund, ProcessorStatus,
    RefundState, SetupIntent,
};

/// The API version every request asks for: the shapes below were written against it.
pub const STRIPE_VERSION: &str = "2024-06-20";
pub const DEFAULT_API_BASE: &str = "https://api.stripe.com";
pub const DEFAULT_JS_URL: &str = "https://js.stripe.com/v3/";
/// A webhook older than this is refused (replay protection), as Stripe's libraries do.
pub const SIGNATURE_TOLERANCE_SECS: i64 = 300;
/// Tries of one request on a network error, 5xx or 429 (the first included).
const MAX_TRIES: u32 = 4;
const BACKOFF_BASE: Duration = Duration::from_millis(200);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, Debug)]
pub struct StripeConfig {
    pub secret_key: Secret,
    pub publishable_key: String,
    pub webhook_secret: Secret,
    pub api_base: String,
}

pub struct Stripe {
    http: reqwest::Client,
    cfg: StripeConfig,
}

// ---- models: only what we read --------------------------------------------------------

#[derive(Debug, Deserialize)]
struct Customer {
    id: String,
}

#[derive(Debug, Default, Deserialize)]
struct Card {
    brand: Option<String>,
    last4: Option<String>,
    exp_month: Option<u32>,
    exp_year: Option<u32>,
}

#[derive(Debug, Deserialize)]
struct PaymentMethodObj {
    id: String,
    #[serde(rename = "type")]
    kind: Option<String>,
    card: Option<Card>,
    /// An id, or the expanded object.
    customer: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct SetupIntentObj {
    client_secret: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct LastError {
    code: Option<String>,
    decline_code: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct PaymentIntentObj {
    pub id: String,
    pub status: Option<String>,
    client_secret: Option<String>,
    last_payment_error: Option<LastError>,
    #[serde(default)]
    pub metadata: std::collections::HashMap<String, String>,
    /// An id or an object (`latest_charge`), as Stripe sends it.
    latest_charge: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct List<T> {
    #[serde(default = "Vec::new")]
    data: Vec<T>,
}

#[derive(Debug, Deserialize)]
struct RefundObj {
    id: String,
    amount: Option<i64>,
    status: Option<String>,
    #[serde(default)]
    metadata: std::collections::HashMap<String, String>,
}

#[derive(Debug, Deserialize)]
struct ChargeObj {
    payment_intent: Option<Value>,
    refunds: Option<List<RefundObj>>,
}

#[derive(Debug, Deserialize)]
struct ErrorBody {
    error: Option<ErrorObj>,
}

#[derive(Debug, Default, Deserialize)]
struct ErrorObj {
    #[serde(rename = "type")]
    kind: Option<String>,
    code: Option<String>,
    decline_code: Option<String>,
    message: Option<String>,
    payment_intent: Option<PaymentIntentObj>,
}

/// What an answer other than 2xx was.
enum Failure {
    /// 402 (a card error) or another 4xx: final for this request.
    Refused { status: u16, error: Box<ErrorObj> },
    /// Network, 5xx, 429 after every try.
    Transient(String),
}

fn id_of(v: &Option<Value>) -> Option<String> {
    match v {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Object(o)) => o.get("id").and_then(Value::as_str).map(str::to_owned),
        _ => None,
    }
}

/// Whole cents as Stripe's integer amount (R1: a charge is whole cents).
fn cents(amount: Money) -> Result<i64, ProcessorError> {
    let c = amount.as_decimal() * rust_decimal::Decimal::ONE_HUNDRED;
    if !c.fract().is_zero() {
        return Err(ProcessorError::Other(format!(
            "amount {amount} is not whole cents"
        )));
    }
    i64::try_from(c).map_err(|_| ProcessorError::Other(format!("amount {amount} is too large")))
}

pub fn money_from_cents(c: i64) -> Money {
    Money::new(rust_decimal::Decimal::new(c, 2))
}

/// Our failure code for a declined payment: Stripe's `decline_code` where it names one of
/// ours, else its `code`, else `card_declined` (R25's table).
pub fn failure_code(code: Option<&str>, decline_code: Option<&str>) -> String {
    const OURS: [&str; 5] = [
        "card_declined",
        "insufficient_funds",
        "expired_card",
        "authentication_required",
        "processing_error",
    ];
    for c in [decline_code, code].into_iter().flatten() {
        if OURS.contains(&c) && c != "card_declined" {
            return c.to_owned();
        }
    }
    "card_declined".to_owned()
}

/// A PaymentIntent's state as our charge status.
pub fn status_of(pi: &PaymentIntentObj) -> ProcessorStatus {
    match pi.status.as_deref() {
        Some("succeeded") => ProcessorStatus::Succeeded,
        Some("processing") => ProcessorStatus::Pending,
        Some("requires_action") | Some("requires_confirmation") => {
            ProcessorStatus::RequiresAction {
                client_secret: pi.client_secret.clone().unwrap_or_default(),
            }
        }
        Some("requires_payment_method") => {
            let e = pi.last_payment_error.as_ref();
            let code = failure_code(
                e.and_then(|e| e.code.as_deref()),
                e.and_then(|e| e.decline_code.as_deref()),
            );
            if code == "authentication_required" {
                // Off-session, Stripe says the bank wants the customer: the intent can
                // still be confirmed on-session with its client secret.
                ProcessorStatus::RequiresAction {
                    client_secret: pi.client_secret.clone().unwrap_or_default(),
                }
            } else {
                ProcessorStatus::Failed(code)
            }
        }
        Some("canceled") => ProcessorStatus::Failed("canceled".to_owned()),
        _ => ProcessorStatus::Pending,
    }
}

fn charge_of(pi: &PaymentIntentObj) -> ProcessorCharge {
    ProcessorCharge {
        processor_charge_id: pi.id.clone(),
        status: status_of(pi),
    }
}

impl Stripe {
    pub fn new(cfg: StripeConfig) -> Result<Self, ProcessorError> {
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| ProcessorError::Other(format!("http client: {e}")))?;
        Ok(Stripe { http, cfg })
    }

    pub fn publishable_key(&self) -> &str {
        &self.cfg.publishable_key
    }

    pub fn webhook_secret(&self) -> &Secret {
        &self.cfg.webhook_secret
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.cfg.api_base.trim_end_matches('/'))
    }

    /// One API call, retried with the same idempotency key on network errors, 5xx and 429.
    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        form: &[(&str, String)],
        idempotency_key: Option<&str>,
    ) -> Result<T, Failure> {
        let mut last = String::new();
        for attempt in 0..MAX_TRIES {
            if attempt > 0 {
                tokio::time::sleep(BACKOFF_BASE * 2u32.pow(attempt - 1)).await;
            }
            let mut req = self
                .http
                .request(method.clone(), self.url(path))
                .basic_auth(self.cfg.secret_key.expose(), Some(""))
                .header("Stripe-Version", STRIPE_VERSION);
            if let Some(k) = idempotency_key {
                req = req.header("Idempotency-Key", k);
            }
            if method == reqwest::Method::GET {
                req = req.query(form);
            } else {
                req = req.form(form);
            }
            let resp = match req.send().await {
                Ok(r) => r,
                Err(e) => {
                    last = format!("network: {e}");
                    continue;
                }
            };
            let status = resp.status();
            let body = match resp.bytes().await {
                Ok(b) => b,
                Err(e) => {
                    last = format!("network: {e}");
                    continue;
                }
            };
            if status.is_success() {
                return serde_json::from_slice(&body)
                    .map_err(|e| Failure::Transient(format!("unreadable answer to {path}: {e}")));
            }
            if worth_retrying(status.as_u16()) {
                last = format!("HTTP {status}");
                continue;
            }
            let error = serde_json::from_slice::<ErrorBody>(&body)
                .ok()
                .and_then(|b| b.error)
                .unwrap_or_default();
            return Err(Failure::Refused {
                status: status.as_u16(),
                error: Box::new(error),
            });
        }
        Err(Failure::Transient(last))
    }

    async fn post<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        form: &[(&str, String)],
        key: Option<&str>,
    ) -> Result<T, ProcessorError> {
        self.call(reqwest::Method::POST, path, form, key)
            .await
            .map_err(plain)
    }

    async fn get<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<T, ProcessorError> {
        self.call(reqwest::Method::GET, path, query, None)
            .await
            .map_err(plain)
    }

    pub async fn create_customer(&self, account_id: &str) -> Result<String, ProcessorError> {
        let c: Customer = self
            .post(
                "/v1/customers",
                &[("metadata[account_id]", account_id.to_owned())],
                Some(&format!("customer:{account_id}")),
            )
            .await?;
        Ok(c.id)
    }

    /// R24: the payment method the browser made, attached to this account's customer. One
    /// attached to another customer is refused (a token of someone else's card).
    pub async fn attach_method(
        &self,
        customer: &str,
        token: &str,
    ) -> Result<AttachedMethod, ProcessorError> {
        let path = format!(
            "/v1/payment_methods/{}",
            path_segment("processor_token", token)?
        );
        let pm: PaymentMethodObj = self.get(&path, &[]).await.map_err(|e| match e {
            ProcessorError::Rejected(_) => ProcessorError::Rejected(format!(
                "processor_token: the processor knows no payment method {token:?}"
            )),
            e => e,
        })?;
        if pm.kind.as_deref() != Some("card") {
            return Err(ProcessorError::Rejected(
                "processor_token: only cards can be added this way".into(),
            ));
        }
        match id_of(&pm.customer) {
            Some(c) if c == customer => {}
            Some(_) => {
                return Err(ProcessorError::Rejected(
                    "processor_token: this payment method belongs to another customer".into(),
                ));
            }
            None => {
                let _: PaymentMethodObj = self
                    .post(
                        &format!("{path}/attach"),
                        &[("customer", customer.to_owned())],
                        Some(&format!("attach:{}:{customer}", pm.id)),
                    )
                    .await?;
            }
        }
        let card = pm.card.unwrap_or_default();
        Ok(AttachedMethod {
            token: pm.id,
            brand: card.brand.unwrap_or_default(),
            last4: card.last4.unwrap_or_default(),
            exp_month: card.exp_month,
            exp_year: card.exp_year,
        })
    }

    pub async fn create_setup_intent(&self, customer: &str) -> Result<SetupIntent, ProcessorError> {
        let si: SetupIntentObj = self
            .post(
                "/v1/setup_intents",
                &[
                    ("customer", customer.to_owned()),
                    ("usage", "off_session".to_owned()),
                    ("payment_method_types[]", "card".to_owned()),
                ],
                None,
            )
            .await?;
        Ok(SetupIntent {
            client_secret: si.client_secret.ok_or_else(|| {
                ProcessorError::Other("setup intent without client_secret".into())
            })?,
            publishable_key: self.cfg.publishable_key.clone(),
        })
    }

    /// R25: one off-session PaymentIntent, confirmed at once, keyed by our charge id.
    pub async fn charge(&self, c: &ChargeInput<'_>) -> Result<ProcessorCharge, ProcessorError> {
        // A method added under another processor (the sandbox) has no customer here.
        let customer = c.customer.ok_or_else(|| {
            ProcessorError::Rejected(
                "the payment method was not added through Stripe (no customer)".into(),
            )
        })?;
        let form = [
            ("amount", cents(c.amount)?.to_string()),
            ("currency", "usd".to_owned()),
            ("customer", customer.to_owned()),
            ("payment_method", c.token.to_owned()),
            ("off_session", "true".to_owned()),
            ("confirm", "true".to_owned()),
            ("metadata[charge_id]", c.idempotency_key.to_owned()),
            ("metadata[account_id]", c.account_id.to_owned()),
        ];
        match self
            .call::<PaymentIntentObj>(
                reqwest::Method::POST,
                "/v1/payment_intents",
                &form,
                Some(c.idempotency_key),
            )
            .await
        {
            Ok(pi) => Ok(charge_of(&pi)),
            // A card error: the intent it made comes with it.
            Err(Failure::Refused { status: 402, error }) => {
                let code = failure_code(error.code.as_deref(), error.decline_code.as_deref());
                let id = error
                    .payment_intent
                    .as_ref()
                    .map(|p| p.id.clone())
                    .unwrap_or_default();
                let status = match (&error.payment_intent, code.as_str()) {
                    (Some(pi), "authentication_required") => ProcessorStatus::RequiresAction {
                        client_secret: pi.client_secret.clone().unwrap_or_default(),
                    },
                    _ => ProcessorStatus::Failed(code),
                };
                Ok(ProcessorCharge {
                    processor_charge_id: id,
                    status,
                })
            }
            Err(f) => Err(plain(f)),
        }
    }

    /// The PaymentIntent as Stripe has it now.
    pub async fn retrieve(&self, id: &str) -> Result<ProcessorCharge, ProcessorError> {
        Ok(charge_of(&self.payment_intent(id).await?))
    }

    pub async fn payment_intent(&self, id: &str) -> Result<PaymentIntentObj, ProcessorError> {
        self.get(
            &format!("/v1/payment_intents/{}", path_segment("id", id)?),
            &[],
        )
        .await
    }

    /// The intent made under our charge id, if any: the customer's intents, by metadata.
    pub async fn find_by_key(
        &self,
        c: &ChargeInput<'_>,
    ) -> Result<Option<ProcessorCharge>, ProcessorError> {
        let Some(customer) = c.customer else {
            return Ok(None);
        };
        let list: List<PaymentIntentObj> = self
            .get(
                "/v1/payment_intents",
                &[
                    ("customer", customer.to_owned()),
                    ("limit", "100".to_owned()),
                ],
            )
            .await?;
        Ok(list
            .data
            .iter()
            .find(|pi| pi.metadata.get("charge_id").map(String::as_str) == Some(c.idempotency_key))
            .map(charge_of))
    }

    /// R27: refunds part of a PaymentIntent, keyed by our refund id (also in metadata, so
    /// the webhook for it is known as ours even before this call answers).
    pub async fn refund(
        &self,
        processor_charge_id: &str,
        amount: Money,
        refund_id: &str,
    ) -> Result<ProcessorRefund, ProcessorError> {
        let r: RefundObj = self
            .post(
                "/v1/refunds",
                &[
                    ("payment_intent", processor_charge_id.to_owned()),
                    ("amount", cents(amount)?.to_string()),
                    ("metadata[refund_id]", refund_id.to_owned()),
                ],
                Some(refund_id),
            )
            .await?;
        Ok(refund_of(r))
    }

    /// The refund made under our refund id, if Stripe made one (asked before a refusal is
    /// taken as final).
    pub async fn find_refund(
        &self,
        processor_charge_id: &str,
        refund_id: &str,
    ) -> Result<Option<ProcessorRefund>, ProcessorError> {
        let list: List<RefundObj> = self
            .get(
                "/v1/refunds",
                &[
                    (
                        "payment_intent",
                        path_segment("id", processor_charge_id)?.to_owned(),
                    ),
                    ("limit", "100".to_owned()),
                ],
            )
            .await?;
        Ok(list
            .data
            .into_iter()
            .map(refund_of)
            .find(|r| r.our_refund_id.as_deref() == Some(refund_id)))
    }

    /// The refunds of the charge (`ch_…`) and the intent it belongs to.
    pub async fn charge_refunds(
        &self,
        charge: &str,
    ) -> Result<(Option<String>, Vec<ProcessorRefund>), ProcessorError> {
        let c: ChargeObj = self
            .get(
                &format!("/v1/charges/{}", path_segment("charge", charge)?),
                &[],
            )
            .await?;
        let mut refunds: Vec<ProcessorRefund> = c
            .refunds
            .map(|l| l.data.into_iter().map(refund_of).collect())
            .unwrap_or_default();
        let intent = id_of(&c.payment_intent);
        if refunds.is_empty()
            && let Some(pi) = &intent
        {
            // Newer API versions leave `refunds` out of the charge: list them.
            let list: List<RefundObj> = self
                .get(
                    "/v1/refunds",
                    &[("payment_intent", pi.clone()), ("limit", "100".to_owned())],
                )
                .await?;
            refunds = list.data.into_iter().map(refund_of).collect();
        }
        Ok((intent, refunds))
    }

    /// A dispute as Stripe has it now; `None` when Stripe does not know it.
    pub async fn dispute(&self, id: &str) -> Result<Option<Value>, ProcessorError> {
        match self
            .call::<Value>(
                reqwest::Method::GET,
                &format!("/v1/disputes/{}", path_segment("dispute", id)?),
                &[],
                None,
            )
            .await
        {
            Ok(v) => Ok(Some(v)),
            Err(Failure::Refused { status: 404, .. }) => Ok(None),
            Err(f) => Err(plain(f)),
        }
    }

    /// The intent a charge (`ch_…`) belongs to.
    pub async fn intent_of_charge(&self, charge: &str) -> Result<Option<String>, ProcessorError> {
        let c: ChargeObj = self
            .get(
                &format!("/v1/charges/{}", path_segment("charge", charge)?),
                &[],
            )
            .await?;
        Ok(id_of(&c.payment_intent))
    }

    pub fn latest_charge_of(pi: &PaymentIntentObj) -> Option<String> {
        id_of(&pi.latest_charge)
    }
}

fn refund_of(r: RefundObj) -> ProcessorRefund {
    let state = match r.status.as_deref() {
        Some("succeeded") => RefundState::Succeeded,
        Some("failed") | Some("canceled") => RefundState::Failed,
        _ => RefundState::Pending,
    };
    ProcessorRefund {
        processor_refund_id: r.id,
        amount: r.amount.map(money_from_cents),
        state,
        our_refund_id: r.metadata.get("refund_id").cloned(),
    }
}

/// Ids go into URL paths: only Stripe's id alphabet.
fn path_segment<'a>(field: &str, id: &'a str) -> Result<&'a str, ProcessorError> {
    if id.is_empty()
        || id.len() > 255
        || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        return Err(ProcessorError::Rejected(format!(
            "{field}: not a processor id (letters, digits and _)"
        )));
    }
    Ok(id)
}

/// Answers worth asking again with the same idempotency key: 5xx, 429 (rate limited) and
/// 409 (Stripe's `idempotency_key_in_use`: another request with our key is still in
/// flight — its outcome is not known, and must never be taken as a refusal).
fn worth_retrying(status: u16) -> bool {
    status >= 500 || status == 429 || status == 409
}

fn plain(f: Failure) -> ProcessorError {
    match f {
        Failure::Transient(m) => ProcessorError::Transient(m),
        // Our own key or account is wrong: a configuration fault, not the caller's input.
        Failure::Refused {
            status: status @ (401 | 403),
            error,
        } => ProcessorError::Other(format!(
            "the processor refused our credentials (HTTP {status}): {}",
            error.message.unwrap_or_default()
        )),
        Failure::Refused { status, error } => {
            let words = error
                .message
                .or(error.code)
                .unwrap_or_else(|| format!("HTTP {status}"));
            let kind = error.kind.unwrap_or_default();
            ProcessorError::Rejected(format!("the processor refused: {words} ({kind} {status})"))
        }
    }
}

/// Why a webhook's signature was not accepted.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("no Stripe-Signature header, or one without t= and v1=")]
    Malformed,
    #[error("signed {0} s away from now (at most {SIGNATURE_TOLERANCE_SECS} s)")]
    Stale(i64),
    #[error("no v1 signature matches")]
    Mismatch,
}

/// R26: `header` is `t=<unix>,v1=<hex>[,v1=<hex>…]` (other schemes ignored); accepted when
/// any `v1` is HMAC-SHA256(secret, "<t>.<body>") and `t` is within the tolerance of `now`.
/// The comparison is the HMAC's own constant-time verification.
pub fn verify_signature(
    secret: &[u8],
    header: &str,
    body: &[u8],
    now: i64,
) -> Result<(), SignatureError> {
    let mut t: Option<i64> = None;
    let mut sigs: Vec<Vec<u8>> = Vec::new();
    for part in header.split(',') {
        let Some((k, v)) = part.trim().split_once('=') else {
            continue;
        };
        match k {
            "t" => t = v.parse().ok(),
            "v1" => {
                if let Some(bytes) = hex_decode(v) {
                    sigs.push(bytes);
                }
            }
            _ => {}
        }
    }
    let Some(t) = t else {
        return Err(SignatureError::Malformed);
    };
    if sigs.is_empty() {
        return Err(SignatureError::Malformed);
    }
    if (now - t).abs() > SIGNATURE_TOLERANCE_SECS {
        return Err(SignatureError::Stale(now - t));
    }
    for sig in &sigs {
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
            return Err(SignatureError::Mismatch);
        };
        mac.update(t.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        if mac.verify_slice(sig).is_ok() {
            return Ok(());
        }
    }
    Err(SignatureError::Mismatch)
}

/// The `Stripe-Signature` header Stripe would send for `body` at `t` (tests, `credits`
/// tools that replay events).
pub fn sign(secret: &[u8], t: i64, body: &[u8]) -> String {
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("t={t},v1={hex}")
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || s.len() > 128 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"whsec_test";

    #[test]
    fn a_signature_verifies_and_anything_else_is_refused() {
        let body = br#"{"id":"evt_1"}"#;
        let now = 1_800_000_000;
        let good = sign(SECRET, now, body);
        assert_eq!(verify_signature(SECRET, &good, body, now), Ok(()));
        // Any v1 may match (Stripe sends one per active secret while rolling them).
        let two = format!(
            "{},v1={}",
            good.replace("v1=", "v1=00"),
            &good[good.find("v1=").unwrap() + 3..]
        );
        assert_eq!(verify_signature(SECRET, &two, body, now), Ok(()));
        assert_eq!(
            verify_signature(SECRET, &good, br#"{"id":"evt_2"}"#, now),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify_signature(b"whsec_other", &good, body, now),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify_signature(SECRET, &good, body, now + 301),
            Err(SignatureError::Stale(301))
        );
        assert!(verify_signature(SECRET, &good, body, now + 300).is_ok());
        for bad in ["", "t=1", "v1=ab", "t=x,v1=ab", "garbage"] {
            assert_eq!(
                verify_signature(SECRET, bad, body, now),
                Err(SignatureError::Malformed),
                "{bad}"
            );
        }
        // A v0 (test-mode scheme) is not a v1.
        let v0 = good.replace("v1=", "v0=");
        assert_eq!(
            verify_signature(SECRET, &v0, body, now),
            Err(SignatureError::Malformed)
        );
    }

    #[test]
    fn declines_map_to_our_failure_codes() {
        assert_eq!(
            failure_code(Some("card_declined"), Some("insufficient_funds")),
            "insufficient_funds"
        );
        assert_eq!(failure_code(Some("expired_card"), None), "expired_card");
        assert_eq!(
            failure_code(Some("card_declined"), Some("generic_decline")),
            "card_declined"
        );
        assert_eq!(
            failure_code(Some("authentication_required"), None),
            "authentication_required"
        );
        assert_eq!(
            failure_code(Some("card_declined"), Some("authentication_required")),
            "authentication_required"
        );
        assert_eq!(
            failure_code(Some("processing_error"), None),
            "processing_error"
        );
        assert_eq!(failure_code(None, None), "card_declined");
        assert_eq!(
            failure_code(Some("lost_card"), Some("stolen_card")),
            "card_declined"
        );
    }

    #[test]
    fn amounts_are_sent_as_whole_cents() {
        assert_eq!(
            cents(Money::parse_positive("a", "40.01").unwrap()).unwrap(),
            4001
        );
        assert_eq!(
            cents(Money::parse_positive("a", "5").unwrap()).unwrap(),
            500
        );
        assert!(cents(Money::parse_positive("a", "0.001").unwrap()).is_err());
        assert_eq!(money_from_cents(4001).to_wire(), "40.01");
    }

    #[test]
    fn only_answers_of_unknown_outcome_are_retried() {
        for s in [409, 429, 500, 502, 503] {
            assert!(worth_retrying(s), "{s}");
        }
        for s in [400, 401, 402, 403, 404] {
            assert!(!worth_retrying(s), "{s}");
        }
        let creds = plain(Failure::Refused {
            status: 401,
            error: Box::default(),
        });
        assert!(matches!(creds, ProcessorError::Other(_)), "{creds:?}");
        let bad = plain(Failure::Refused {
            status: 400,
            error: Box::default(),
        });
        assert!(matches!(bad, ProcessorError::Rejected(_)), "{bad:?}");
    }

    #[test]
    fn ids_in_paths_are_only_stripe_ids() {
        assert!(path_segment("id", "pi_123ABC").is_ok());
        for bad in ["", "../v1/customers", "pi_1?x=1", "pi 1", "pi_1/refunds"] {
            assert!(path_segment("id", bad).is_err(), "{bad}");
        }
    }
}
