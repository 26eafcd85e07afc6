//! R26: the processor's webhooks.
//!
//! `POST /webhooks/stripe` (on `PAYMENTS_HTTP_ADDR`): the signature is checked on the raw
//! body ([`crate::stripe::verify_signature`]); a request that fails it gets 400 and
//! changes nothing. A verified event is recorded by its id (`processor_events`) and only
//! then answered 2xx; it is acted on right away and, if that could not finish (the ledger
//! down, the processor slow), by the recovery loop later. Events are hints: each one is
//! acted on from the object as the processor reports it *now* (re-read), and every effect
//! is keyed so that the same event twice, events in any order, and an event that arrives
//! before the API answer it belongs to all end in one effect:
//!
//! - `payment_intent.succeeded` / `.payment_failed` → the charge's transition (guarded, so
//!   once) and, for a purchase or a confirmed top-up, its one ledger credit (`purchase:`
//!   key / the top-up's own key);
//! - `charge.refunded` → each refund of the charge: ours (`metadata[refund_id]`) is marked
//!   done; one made in the dashboard is recorded and debited once (`refund:<re_…>`), even
//!   below zero (the money is gone);
//! - `charge.dispute.created` (any dispute event) → the disputed amount debited once
//!   (`dispute:<dp_…>`), even below zero, `payments.charge.disputed` (recharge turns
//!   auto-recharge off, `DISPUTED`); `charge.dispute.closed` won → credited back once
//!   (`dispute-won:<dp_…>`).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use credits_common::Money;
use credits_common::events::{ChargeDisputed, Event};
use credits_common::outbox;
use credits_proto::ledger::v1 as ledger_pb;
use serde_json::Value;

use crate::domain::*;
use crate::processor::RefundState;
use crate::service::{Payments, processor_error};
use crate::store::Store;
use crate::stripe::{Stripe, money_from_cents, verify_signature};

/// Stripe's events are a few kilobytes; anything far larger is not one.
pub const MAX_BODY: usize = 256 * 1024;
/// How long acting on an event may hold up its answer before it is left to recovery.
const ACT_INLINE: Duration = Duration::from_secs(10);

pub struct Webhooks {
    pub payments: Arc<Payments>,
    pub stripe: Arc<Stripe>,
    /// R28: requests that fail their signature, per minute and address.
    pub rate: credits_common::http::RateLimiter,
}

/// R28: webhook requests failing their signature one address may send per minute.
pub const WEBHOOK_RATE_PER_MINUTE: u32 = 60;

pub fn router(w: Arc<Webhooks>) -> Router {
    Router::new()
        .route("/webhooks/stripe", post(receive))
        .route("/healthz", axum::routing::get(|| async { "ok" }))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(w)
}

async fn receive(
    state: State<Arc<Webhooks>>,
    peer: Option<axum::Extension<credits_common::http::PeerAddr>>,
    headers: HeaderMap,
    body: Bytes,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let (status, text) = answer(state, peer, headers, body).await;
    let mut r = (status, text).into_response();
    if status == StatusCode::TOO_MANY_REQUESTS {
        r.headers_mut().insert(
            axum::http::header::RETRY_AFTER,
            axum::http::HeaderValue::from_static("60"),
        );
    }
    r
}

async fn answer(
    State(w): State<Arc<Webhooks>>,
    peer: Option<axum::Extension<credits_common::http::PeerAddr>>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    let header = headers
        .get("stripe-signature")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let now = chrono::Utc::now().timestamp();
    if let Err(e) = verify_signature(
        w.stripe.webhook_secret().expose().as_bytes(),
        header,
        &body,
        now,
    ) {
        metrics::counter!("credits_payments_webhooks_total", "outcome" => "bad_signature")
            .increment(1);
        // Only failed signatures spend an address's budget: behind a proxy every sender
        // shares one address, and Stripe's own deliveries must never be the ones refused.
        let from = peer.map_or_else(|| "unknown".to_owned(), |p| p.0.key());
        if !w.rate.allow(&from) {
            return (
                StatusCode::TOO_MANY_REQUESTS,
                "too many requests that failed their signature; wait a minute\n".into(),
            );
        }
        tracing::warn!(error = %e, "webhook refused: signature");
        return (StatusCode::BAD_REQUEST, format!("signature: {e}\n"));
    }
    let Ok(event) = serde_json::from_slice::<Value>(&body) else {
        return (StatusCode::BAD_REQUEST, "body: not JSON\n".into());
    };
    let (Some(id), Some(kind)) = (
        event.get("id").and_then(Value::as_str),
        event.get("type").and_then(Value::as_str),
    ) else {
        return (
            StatusCode::BAD_REQUEST,
            "body: an event has an id and a type\n".into(),
        );
    };
    if id.is_empty() || id.len() > 255 || kind.len() > 255 {
        return (
            StatusCode::BAD_REQUEST,
            "body: id or type out of range\n".into(),
        );
    }
    match w.payments.store.record_event(id, kind, &event).await {
        Ok(true) => {}
        Ok(false) => {
            // Seen before: recorded, acted on (or being acted on by recovery).
            metrics::counter!("credits_payments_webhooks_total", "outcome" => "duplicate")
                .increment(1);
            return (StatusCode::OK, "duplicate\n".into());
        }
        Err(e) => {
            tracing::warn!(error = %e, event_id = id, "webhook not recorded");
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                "not recorded; send it again\n".into(),
            );
        }
    }
    metrics::counter!("credits_payments_webhooks_total", "outcome" => "recorded").increment(1);
    // Recorded: from here on it will be acted on, now or by the recovery loop.
    let _ = tokio::time::timeout(ACT_INLINE, w.payments.act_on_event(id, kind, &event)).await;
    (StatusCode::OK, "ok\n".into())
}

fn object(event: &Value) -> &Value {
    &event["data"]["object"]
}

fn str_of<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str).filter(|s| !s.is_empty())
}

impl Payments {
    /// Acts on one recorded event and marks it done; a failure is kept for the recovery
    /// loop to try again.
    pub async fn act_on_event(&self, id: &str, kind: &str, event: &Value) {
        let outcome = self.apply_event(kind, event).await;
        let stored = match &outcome {
            Ok(()) => self.store.event_done(id).await,
            Err(e) => {
                metrics::counter!("credits_payments_processor_event_failures_total").increment(1);
                tracing::warn!(event_id = id, r#type = kind, error = %e, "processor event not acted on yet; will retry with backoff");
                self.store.event_failed(id, &e.to_string()).await
            }
        };
        if let Err(e) = stored {
            tracing::warn!(event_id = id, error = %e, "processor event state not stored");
        }
    }

    /// Events recorded but not acted on (a crash, an outage): acted on again.
    pub(crate) async fn process_pending_events(
        &self,
        stale_after: Duration,
    ) -> Result<usize, PaymentsError> {
        // Claimed for a minute at least: acting on one may take that long (a slow processor).
        let events = self
            .store
            .pending_events(stale_after.as_secs_f64().max(60.0))
            .await?;
        let n = events.len();
        for (id, kind, payload) in events {
            self.act_on_event(&id, &kind, &payload).await;
        }
        Ok(n)
    }

    async fn apply_event(&self, kind: &str, event: &Value) -> Result<(), PaymentsError> {
        let obj = object(event);
        match kind {
            "payment_intent.succeeded"
            | "payment_intent.payment_failed"
            | "payment_intent.processing"
            | "payment_intent.requires_action"
            | "payment_intent.canceled" => match str_of(obj, "id") {
                Some(pi) => self.intent_changed(pi).await,
                None => Ok(()),
            },
            "charge.refunded" | "charge.refund.updated" | "refund.created" | "refund.updated" => {
                let charge = if kind.starts_with("refund.") {
                    str_of(obj, "charge")
                } else {
                    str_of(obj, "id")
                };
                match charge {
                    Some(ch) => self.refunds_changed(ch).await,
                    None => Ok(()),
                }
            }
            k if k.starts_with("charge.dispute.") => self.dispute_changed(kind, obj).await,
            _ => Ok(()),
        }
    }

    fn stripe_reader(&self) -> Result<&Stripe, PaymentsError> {
        self.stripe
            .as_deref()
            .ok_or_else(|| PaymentsError::internal("processor events need the Stripe processor"))
    }

    /// The charge of a PaymentIntent, as Stripe reports the intent now.
    async fn intent_changed(&self, pi_id: &str) -> Result<(), PaymentsError> {
        let stripe = self.stripe_reader()?;
        let pi = stripe
            .payment_intent(pi_id)
            .await
            .map_err(processor_error)?;
        let charge = match (pi.metadata.get("account_id"), pi.metadata.get("charge_id")) {
            (Some(a), Some(c)) => self.store.charge_by_id(a, c).await?,
            _ => self.store.charge_by_processor_id(pi_id).await?,
        };
        let Some(charge) = charge else {
            // Not ours (another integration on the same Stripe account).
            tracing::info!(
                payment_intent = pi_id,
                "processor event for a payment we did not make; ignored"
            );
            return Ok(());
        };
        let pc = crate::processor::ProcessorCharge {
            processor_charge_id: pi.id.clone(),
            status: crate::stripe::status_of(&pi),
        };
        if charge.status == ChargeStatus::PROCESSING {
            // Our own call may still be waiting for its answer: the transition is guarded, so
            // whichever records first wins and the other reads it.
            tracing::info!(charge_id = %charge.charge_id, "processor event before the charge's own answer");
        }
        let charge = match charge.status {
            ChargeStatus::SUCCEEDED => charge,
            // A failed charge stays failed, unless it failed waiting for the customer: the
            // intent can still be confirmed on-session after a failed 3-D Secure.
            ChargeStatus::FAILED if charge.action_required_at.is_none() => charge,
            _ => self.record(&charge, &pc).await?,
        };
        if charge.status == ChargeStatus::SUCCEEDED
            && charge.credited_by_payments()
            && charge.ledger_entry_id.is_none()
        {
            self.credit_purchase(&charge).await?;
        }
        Ok(())
    }

    /// Our charge behind a PaymentIntent: by its recorded id, or — when the event came
    /// before our own call recorded it (a lost answer, a crash) — by the ids we put in the
    /// intent's metadata. Never "not ours" for a charge of ours.
    async fn charge_of_intent(
        &self,
        stripe: &Stripe,
        pi_id: &str,
    ) -> Result<Option<Charge>, PaymentsError> {
        if let Some(c) = self.store.charge_by_processor_id(pi_id).await? {
            return Ok(Some(c));
        }
        let pi = stripe
            .payment_intent(pi_id)
            .await
            .map_err(processor_error)?;
        match (pi.metadata.get("account_id"), pi.metadata.get("charge_id")) {
            (Some(a), Some(c)) => self.store.charge_by_id(a, c).await,
            _ => Ok(None),
        }
    }

    /// The refunds of a processor charge (`ch_…`), as Stripe reports them now.
    async fn refunds_changed(&self, ch: &str) -> Result<(), PaymentsError> {
        let stripe = self.stripe_reader()?;
        let (pi, refunds) = stripe.charge_refunds(ch).await.map_err(processor_error)?;
        let Some(pi) = pi else { return Ok(()) };
        let Some(charge) = self.charge_of_intent(stripe, &pi).await? else {
            tracing::info!(charge = ch, "refund of a payment we did not make; ignored");
            return Ok(());
        };
        for r in refunds {
            if r.state != RefundState::Succeeded && r.state != RefundState::Pending {
                continue;
            }
            if charge.purpose == Purpose::CHARGE {
                // A plain charge bought no credits: nothing to take back.
                continue;
            }
            if let Some(ours) = &r.our_refund_id {
                // Ours (we asked with metadata[refund_id]): its debit was posted before the
                // processor was asked. Never debited again as if made elsewhere.
                match self.store.refund_by_id(&charge.account_id, ours).await? {
                    Some(refund)
                        if refund.status == RefundStatus::PROCESSING
                            && refund.ledger_entry_id.is_some() =>
                    {
                        self.end_refund(
                            &refund,
                            RefundStatus::SUCCEEDED,
                            "",
                            Some(&r.processor_refund_id),
                        )
                        .await?;
                    }
                    Some(_) => {}
                    None => {
                        tracing::error!(refund_id = %ours, processor_refund_id = %r.processor_refund_id, "a refund carrying our id is not in our records; not debited")
                    }
                }
                continue;
            }
            self.outside_refund(&charge, &r).await?;
        }
        Ok(())
    }

    /// A refund made outside our API (the dashboard): recorded once, debited once.
    async fn outside_refund(
        &self,
        charge: &Charge,
        r: &crate::processor::ProcessorRefund,
    ) -> Result<(), PaymentsError> {
        let Some(amount) = r.amount else {
            return Ok(());
        };
        let refund = Refund {
            seq: 0,
            refund_id: r.processor_refund_id.clone(),
            account_id: charge.account_id.clone(),
            charge_id: charge.charge_id.clone(),
            amount,
            reason: "refunded at the processor".into(),
            idempotency_key: None,
            status: RefundStatus::PROCESSING,
            failure_code: String::new(),
            processor_refund_id: Some(r.processor_refund_id.clone()),
            ledger_entry_id: None,
            created_at: chrono::Utc::now(),
        };
        let mut tx = self.store.pool().begin().await?;
        Store::lock_charge(&mut tx, &charge.account_id, &charge.charge_id).await?;
        // The processor refunded it: it counts, whatever our own limits say.
        let refund = Store::insert_refund(&mut tx, &refund).await?;
        tx.commit().await?;
        let refund = match refund {
            Some(r) => r,
            None => match self
                .store
                .refund_by_id(&charge.account_id, &r.processor_refund_id)
                .await?
            {
                Some(existing) if existing.status == RefundStatus::PROCESSING => existing,
                _ => return Ok(()),
            },
        };
        let entry = self
            .debit(
                &refund.account_id,
                refund.amount,
                ledger_pb::DebitKind::Refund,
                &refund.charge_id,
                &format!("refund:{}", refund.refund_id),
                &format!(
                    "refund {} of charge {} made at the processor",
                    refund.refund_id, refund.charge_id
                ),
                false,
            )
            .await?;
        self.store
            .set_refund_entry(&refund.refund_id, &entry)
            .await?;
        self.end_refund(&refund, RefundStatus::SUCCEEDED, "", None)
            .await?;
        tracing::info!(charge_id = %charge.charge_id, refund_id = %refund.refund_id, amount = %refund.amount, "refund made at the processor debited");
        Ok(())
    }

    /// A dispute, as Stripe reports it now (the event's own object where Stripe cannot be
    /// asked). The debit and the credit back are keyed by the dispute, so the order the
    /// events come in does not matter: a `closed` seen first posts both.
    async fn dispute_changed(&self, kind: &str, obj: &Value) -> Result<(), PaymentsError> {
        let stripe = self.stripe_reader()?;
        let Some(dp) = str_of(obj, "id") else {
            return Ok(());
        };
        let now = stripe.dispute(dp).await.map_err(processor_error)?;
        let d = now.as_ref().unwrap_or(obj);
        let status = str_of(d, "status").unwrap_or("needs_response").to_owned();
        if status.starts_with("warning_") {
            // An inquiry: no money moved (and none will unless it becomes a dispute).
            return Ok(());
        }
        let pi = match str_of(d, "payment_intent") {
            Some(pi) => Some(pi.to_owned()),
            None => match str_of(d, "charge") {
                Some(ch) => stripe.intent_of_charge(ch).await.map_err(processor_error)?,
                None => None,
            },
        };
        let Some(pi) = pi else { return Ok(()) };
        let Some(charge) = self.charge_of_intent(stripe, &pi).await? else {
            tracing::info!(
                dispute = dp,
                "dispute of a payment we did not make; ignored"
            );
            return Ok(());
        };
        if charge.purpose == Purpose::CHARGE {
            tracing::info!(dispute = dp, charge_id = %charge.charge_id, "dispute of a charge that bought no credits; nothing to debit");
            return Ok(());
        }
        let Some(cents) = d.get("amount").and_then(Value::as_i64).filter(|c| *c > 0) else {
            return Ok(());
        };
        let amount = money_from_cents(cents);
        self.dispute_debit(&charge, dp, amount, &status).await?;
        if status == "won" {
            self.dispute_won(&charge, dp).await?;
        } else {
            self.store.set_dispute_status(dp, &status).await?;
        }
        tracing::info!(dispute = dp, r#type = kind, status = %status, charge_id = %charge.charge_id, "dispute applied");
        Ok(())
    }

    /// Records the dispute once (its amount capped, under the charge's row lock, at what
    /// refunds and other disputes left) and posts its one debit.
    async fn dispute_debit(
        &self,
        charge: &Charge,
        dp: &str,
        seen: Money,
        status: &str,
    ) -> Result<(), PaymentsError> {
        let mut tx = self.store.pool().begin().await?;
        let locked = Store::lock_charge(&mut tx, &charge.account_id, &charge.charge_id)
            .await?
            .ok_or_else(|| PaymentsError::internal("disputed charge vanished"))?;
        let left = locked.amount - locked.refunded_amount - locked.disputed_amount;
        let amount = seen.min(left);
        // Recorded open, so that a dispute first seen won is won (credited back) once.
        if amount > Money::ZERO
            && Store::insert_dispute(&mut tx, dp, &locked, amount, "needs_response").await?
        {
            let event = Event::ChargeDisputed(ChargeDisputed {
                charge_id: charge.charge_id.clone(),
                dispute_id: dp.to_owned(),
                amount,
                status: status.to_owned(),
            });
            outbox::enqueue(&mut tx, &charge.account_id, &event).await?;
        }
        tx.commit().await?;
        // The amount recorded with the dispute, whatever this event says: its debit's key
        // is the dispute's, so it has one amount forever.
        let Some(amount) = self.store.dispute_amount(dp).await? else {
            return Ok(());
        };
        // Every time (idempotent): a debit lost to a crash after the commit is posted now.
        self.debit(
            &charge.account_id,
            amount,
            ledger_pb::DebitKind::Dispute,
            &charge.charge_id,
            &format!("dispute:{dp}"),
            &format!("dispute {dp} of charge {}", charge.charge_id),
            false,
        )
        .await?;
        Ok(())
    }

    async fn dispute_won(&self, charge: &Charge, dp: &str) -> Result<(), PaymentsError> {
        // What was debited is what comes back.
        let Some(amount) = self.store.dispute_amount(dp).await? else {
            return Ok(());
        };
        let mut tx = self.store.pool().begin().await?;
        Store::dispute_won(&mut tx, dp).await?;
        tx.commit().await?;
        let mut ledger = self.ledger.clone();
        ledger
            .add_credits(ledger_pb::AddCreditsRequest {
                account_id: charge.account_id.clone(),
                amount: amount.to_wire(),
                source: ledger_pb::CreditSource::Adjustment as i32,
                reference: charge.charge_id.clone(),
                idempotency_key: format!("dispute-won:{dp}"),
                description: format!("dispute {dp} won: credited back"),
            })
            .await
            .map_err(|s| PaymentsError::from(credits_common::error::ServiceError::from(s)))?;
        Ok(())
    }
}
