//! Payments use cases, independent of the wire: payment methods with the one-default rule,
//! the charge state machine, purchases that end in exactly one ledger credit, and the
//! recovery loop that finishes whatever a crash or an outage left half-done.
//!
//! Charge flow: record the charge (`PROCESSING`) → call the processor with the charge id as
//! its idempotency key → record the outcome and its event in one transaction. Every step
//! can be repeated: the processor answers a repeated key with the same charge, the
//! transition happens once, and the ledger answers a repeated credit key with the same entry.

use std::sync::Arc;
use std::time::Duration;

use credits_common::Money;
use credits_common::error::ServiceError;
use credits_common::events::{ChargeFinished, DefaultChanged, Event, MethodRemoved};
use credits_common::outbox;
use credits_proto::ledger::v1 as ledger_pb;
use credits_proto::ledger::v1::ledger_service_client::LedgerServiceClient;
use tokio_util::sync::CancellationToken;

use crate::domain::*;
use crate::processor::{
    ChargeInput, PaymentProcessor, ProcessorError, ProcessorStatus, SetupIntent,
};
use crate::store::Store;

pub type LedgerClient = LedgerServiceClient<credits_common::grpc::AuthChannel>;

/// A transient processor failure is retried this many times (by the client's retries and
/// the recovery loop) before the charge fails for good with `processing_error`.
pub const MAX_PROCESSOR_ATTEMPTS: i32 = 5;
/// A charge is failed for good only when the processor shows no charge under its key this
/// long after the charge was recorded (any concurrent processor call has ended by then).
pub const PROCESSOR_SETTLE_SECS: i64 = 60;

pub struct Payments {
    pub(crate) store: Store,
    pub(crate) processor: Arc<dyn PaymentProcessor>,
    pub(crate) ledger: LedgerClient,
    min_purchase: Money,
    /// The Stripe connector, when it is the processor: webhooks re-read objects through it.
    pub(crate) stripe: Option<Arc<crate::stripe::Stripe>>,
    /// How long a refund being carried out is left to its caller (REFUND_LEASE_SECS): at
    /// least as long as its processor calls may take.
    pub(crate) refund_lease: Duration,
}

/// R28: the most payment methods one account holds.
pub const MAX_METHODS: i64 = 25;

/// The result of a purchase: the charge and, once credited, the ledger entry and balance.
pub struct Purchase {
    pub charge: Charge,
    pub entry: Option<ledger_pb::Entry>,
    pub balance: Option<String>,
}

impl Payments {
    /// Payments over its store, a processor (the sandbox, or a test's), the ledger it
    /// credits, and the smallest purchase it accepts (R3).
    pub fn new(
        store: Store,
        processor: Arc<dyn PaymentProcessor>,
        ledger: LedgerClient,
        min_purchase: Money,
    ) -> Self {
        Payments {
            store,
            processor,
            ledger,
            min_purchase,
            stripe: None,
            refund_lease: Duration::from_secs_f64(crate::refunds::REFUND_LEASE_SECS),
        }
    }

    pub fn with_refund_lease(mut self, lease: Duration) -> Self {
        self.refund_lease = lease;
        self
    }

    /// Payments charging through Stripe (R23): the connector is both the processor and
    /// what processor events are re-read through.
    pub fn with_stripe(
        store: Store,
        stripe: Arc<crate::stripe::Stripe>,
        ledger: LedgerClient,
        min_purchase: Money,
    ) -> Self {
        Payments {
            stripe: Some(stripe.clone()),
            ..Payments::new(store, stripe, ledger, min_purchase)
        }
    }

    /// NOT_FOUND unless the ledger knows the account.
    pub async fn ensure_account(
        &self,
        account: &AccountId,
    ) -> Result<ledger_pb::Account, PaymentsError> {
        let mut ledger = self.ledger.clone();
        ledger
            .get_account(ledger_pb::GetAccountRequest {
                account_id: account.as_str().to_owned(),
            })
            .await
            .map(|r| r.into_inner())
            .map_err(|s| match s.code() {
                tonic::Code::NotFound => PaymentsError::AccountNotFound(account.clone()),
                _ => PaymentsError::Unavailable(format!("ledger unavailable: {}", s.message())),
            })
    }

    pub async fn add_method(
        &self,
        account: &AccountId,
        method: NewMethod,
        make_default: bool,
    ) -> Result<PaymentMethod, PaymentsError> {
        self.ensure_account(account).await?;
        // A token added before is that method (a retried form) — even on a full account.
        if let NewMethod::Token(token) = &method
            && !self.processor.takes_raw_details()
            && let Some(pm) = self.store.method_by_token(account.as_str(), token).await?
        {
            return Ok(pm);
        }
        if !matches!(method, NewMethod::Token(_)) && !self.processor.takes_raw_details() {
            // R24: card data never reaches a real processor through us.
            return Err(PaymentsError::invalid(format!(
                "card: raw card and bank details are refused with the {} processor; add the \
                 method with processor_token (Stripe.js and a SetupIntent, see CreateSetupIntent)",
                self.processor.name()
            )));
        }
        // R28: refused before the processor sees anything; checked again under the lock.
        {
            let mut conn = self.store.pool().acquire().await?;
            Self::check_room(&mut conn, account).await?;
        }
        let (tok, method_type, exp) = match &method {
            NewMethod::Card(c) => (
                self.processor.tokenize_card(c).await,
                MethodType::CARD,
                Some((c.exp_month as i32, c.exp_year as i32)),
            ),
            NewMethod::UsBankAccount(b) => (
                self.processor.tokenize_bank_account(b).await,
                MethodType::US_BANK_ACCOUNT,
                None,
            ),
            NewMethod::Token(_) if self.processor.takes_raw_details() => {
                return Err(PaymentsError::invalid(format!(
                    "processor_token: the {} processor takes card details (card), not tokens",
                    self.processor.name()
                )));
            }
            NewMethod::Token(token) => {
                let customer = self.ensure_customer(account).await?;
                let attached = self
                    .processor
                    .attach_method(&customer, token)
                    .await
                    .map_err(|e| match e {
                        ProcessorError::Unsupported(m) => PaymentsError::Invalid(m),
                        e => processor_error(e),
                    })?;
                let exp = match (attached.exp_month, attached.exp_year) {
                    (Some(m), Some(y)) if (1..=12).contains(&m) => Some((m as i32, y as i32)),
                    _ => None,
                };
                (
                    Ok(crate::processor::Tokenized {
                        token: attached.token,
                        brand: attached.brand,
                        last4: attached.last4,
                    }),
                    MethodType::CARD,
                    exp,
                )
            }
        };
        let tok = tok.map_err(processor_error)?;
        if tok.last4.len() != 4 || !tok.last4.bytes().all(|b| b.is_ascii_digit()) {
            return Err(PaymentsError::ProcessorRejected(
                "processor_token: the processor did not say the card's last four digits".into(),
            ));
        }
        let mut tx = self.store.pool().begin().await?;
        Store::lock_account(&mut tx, account.as_str()).await?;
        Self::check_room(&mut tx, account).await?;
        let had_default = Store::default_method(&mut tx, account.as_str())
            .await?
            .is_some();
        let becomes_default = make_default || !had_default;
        let pm = PaymentMethod {
            payment_method_id: new_id("pm"),
            account_id: account.as_str().to_owned(),
            method_type,
            brand: tok.brand,
            last4: tok.last4,
            exp_month: exp.map(|e| e.0),
            exp_year: exp.map(|e| e.1),
            is_default: false,
            processor_token: tok.token,
            created_at: chrono::Utc::now(),
        };
        Store::insert_method(&mut tx, &pm).await?;
        let pm = if becomes_default {
            Store::set_default(&mut tx, account.as_str(), Some(&pm.payment_method_id)).await?;
            default_changed(&mut tx, &pm).await?;
            PaymentMethod {
                is_default: true,
                ..pm
            }
        } else {
            pm
        };
        tx.commit().await?;
        tracing::info!(account_id = %account, payment_method_id = %pm.payment_method_id, r#type = pm.method_type.as_str(), is_default = pm.is_default, "payment method added");
        Ok(pm)
    }

    /// R23: the account's customer at the processor, created once. Two first calls may
    /// race: the processor's idempotency key (`customer:<account>`) gives both one customer
    /// at Stripe, and the first one stored wins here.
    pub async fn ensure_customer(&self, account: &AccountId) -> Result<String, PaymentsError> {
        if let Some(c) = self.store.customer(account.as_str()).await? {
            return Ok(c);
        }
        let made = self
            .processor
            .create_customer(account.as_str())
            .await
            .map_err(processor_error)?
            .ok_or_else(|| {
                PaymentsError::Refused(format!(
                    "the {} processor has no customers",
                    self.processor.name()
                ))
            })?;
        let c = self.store.insert_customer(account.as_str(), &made).await?;
        tracing::info!(account_id = %account, customer = %c, "processor customer created");
        Ok(c)
    }

    /// R24: what the browser needs to hand a card to Stripe.js for off-session use.
    pub async fn create_setup_intent(
        &self,
        account: &AccountId,
    ) -> Result<SetupIntent, PaymentsError> {
        if self.processor.takes_raw_details() {
            return Err(PaymentsError::Refused(format!(
                "the {} processor takes card details directly (AddPaymentMethod.card); it has no SetupIntents",
                self.processor.name()
            )));
        }
        self.ensure_account(account).await?;
        let customer = self.ensure_customer(account).await?;
        self.processor
            .create_setup_intent(&customer)
            .await
            .map_err(processor_error)
    }

    /// A page of the account's methods (R28), in the order they were added: at most
    /// `limit` after the one numbered `after`; the next page's token when there may be one.
    pub async fn list_methods(
        &self,
        account: &AccountId,
        after: Option<i64>,
        limit: i64,
    ) -> Result<(Vec<PaymentMethod>, String), PaymentsError> {
        let rows = self
            .store
            .list_methods(account.as_str(), after, limit)
            .await?;
        if rows.is_empty() && after.is_none() {
            self.ensure_account(account).await?;
        }
        let next = match rows.last() {
            Some((seq, _)) if rows.len() as i64 == limit => seq.to_string(),
            _ => String::new(),
        };
        Ok((rows.into_iter().map(|(_, m)| m).collect(), next))
    }

    /// R28: refuses a method past [`MAX_METHODS`] (the caller holds the account's lock
    /// when it must be exact).
    async fn check_room(
        conn: &mut sqlx::PgConnection,
        account: &AccountId,
    ) -> Result<(), PaymentsError> {
        let n = Store::count_methods(conn, account.as_str()).await?;
        if n >= MAX_METHODS {
            return Err(PaymentsError::Refused(format!(
                "payment methods: an account has at most {MAX_METHODS}; remove one to add another"
            )));
        }
        Ok(())
    }

    pub async fn set_default(
        &self,
        account: &AccountId,
        id: &str,
    ) -> Result<PaymentMethod, PaymentsError> {
        let mut tx = self.store.pool().begin().await?;
        Store::lock_account(&mut tx, account.as_str()).await?;
        let pm = Store::find_method(&mut tx, account.as_str(), id)
            .await?
            .ok_or_else(|| method_not_found(account, id))?;
        if !pm.is_default {
            Store::set_default(&mut tx, account.as_str(), Some(id)).await?;
            default_changed(&mut tx, &pm).await?;
            tracing::info!(account_id = %account, payment_method_id = id, r#type = pm.method_type.as_str(), "default payment method changed");
        }
        tx.commit().await?;
        Ok(PaymentMethod {
            is_default: true,
            ..pm
        })
    }

    pub async fn remove_method(&self, account: &AccountId, id: &str) -> Result<(), PaymentsError> {
        let mut tx = self.store.pool().begin().await?;
        Store::lock_account(&mut tx, account.as_str()).await?;
        let pm = Store::find_method(&mut tx, account.as_str(), id)
            .await?
            .ok_or_else(|| method_not_found(account, id))?;
        Store::mark_removed(&mut tx, account.as_str(), id).await?;
        let event = Event::PaymentMethodRemoved(MethodRemoved {
            payment_method_id: id.to_owned(),
            was_default: pm.is_default,
            method_type: pm.method_type.as_str().into(),
        });
        outbox::enqueue(&mut tx, account.as_str(), &event).await?;
        tx.commit().await?;
        tracing::info!(account_id = %account, payment_method_id = id, was_default = pm.is_default, "payment method removed");
        Ok(())
    }

    /// Charges newest first (R13); NOT_FOUND for an account the ledger does not know.
    pub async fn list_charges(
        &self,
        account: &AccountId,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<Charge>, PaymentsError> {
        let charges = self
            .store
            .list_charges(account.as_str(), before, limit)
            .await?;
        if charges.is_empty() {
            self.ensure_account(account).await?;
        }
        Ok(charges)
    }

    pub async fn get_charge(&self, account: &AccountId, id: &str) -> Result<Charge, PaymentsError> {
        self.store
            .charge_by_id(account.as_str(), id)
            .await?
            .ok_or_else(|| PaymentsError::ChargeNotFound {
                account: account.clone(),
                id: id.to_owned(),
            })
    }

    /// Charges once per idempotency key, resuming an unfinished charge with the same key.
    pub async fn charge(&self, req: &ChargeRequest) -> Result<Charge, PaymentsError> {
        // A top-up may end up credited by payments itself (R25): it is a purchase, and
        // obeys the minimum like one.
        if req.purpose == Purpose::TOPUP && req.amount < self.min_purchase {
            return Err(PaymentsError::BelowMinimumPurchase {
                min: self.min_purchase,
                amount: req.amount,
            });
        }
        let charge = match self
            .store
            .charge_by_key(req.account_id.as_str(), req.idempotency_key.as_str())
            .await?
        {
            Some(existing) => self.replay(req, existing)?,
            None => {
                let method = self.resolve_method(req).await?;
                match self.store.insert_charge(req, &method).await? {
                    Some(c) => c,
                    // A concurrent duplicate recorded it first: answer as its replay.
                    None => {
                        let existing = self
                            .store
                            .charge_by_key(req.account_id.as_str(), req.idempotency_key.as_str())
                            .await?
                            .ok_or_else(|| PaymentsError::internal("charge vanished"))?;
                        self.replay(req, existing)?
                    }
                }
            }
        };
        if charge.status == ChargeStatus::PROCESSING {
            self.drive(charge).await
        } else {
            Ok(charge)
        }
    }

    fn replay(&self, req: &ChargeRequest, existing: Charge) -> Result<Charge, PaymentsError> {
        if req.matches(&existing) {
            Ok(existing)
        } else {
            Err(PaymentsError::IdempotencyConflict {
                account: req.account_id.clone(),
                key: req.idempotency_key.clone(),
            })
        }
    }

    async fn resolve_method(&self, req: &ChargeRequest) -> Result<PaymentMethod, PaymentsError> {
        let mut conn = self.store.pool().acquire().await?;
        if req.payment_method_id.is_empty() {
            if let Some(pm) = Store::default_method(&mut conn, req.account_id.as_str()).await? {
                // R10: a top-up on the default charges it only when it is a card.
                if req.purpose == Purpose::TOPUP && pm.method_type != MethodType::CARD {
                    return Err(PaymentsError::Refused(format!(
                        "account {:?}: auto-recharge charges cards only (R10), and the default \
                         payment method is not a card",
                        req.account_id.as_str()
                    )));
                }
                return Ok(pm);
            }
            drop(conn);
            self.ensure_account(&req.account_id).await?;
            return Err(PaymentsError::NoDefaultMethod(req.account_id.clone()));
        }
        Store::find_method(&mut conn, req.account_id.as_str(), &req.payment_method_id)
            .await?
            .ok_or_else(|| method_not_found(&req.account_id, &req.payment_method_id))
    }

    /// Calls the processor for a PROCESSING charge and records the outcome.
    pub async fn drive(&self, charge: Charge) -> Result<Charge, PaymentsError> {
        let (token, customer) = self
            .store
            .charge_target(&charge.account_id, &charge.payment_method_id)
            .await?;
        let input = ChargeInput {
            account_id: &charge.account_id,
            customer: customer.as_deref(),
            token: &token,
            method: charge.payment_method_type,
            amount: charge.amount,
            idempotency_key: &charge.charge_id,
        };
        let result = self.processor.charge(&input).await;
        match result {
            Ok(pc) => self.record(&charge, &pc).await,
            // The processor refused the request itself (a payment method it no longer
            // has, …): final, never retried.
            Err(ProcessorError::Rejected(reason)) => {
                tracing::warn!(charge_id = %charge.charge_id, reason = %reason, "processor refused the charge");
                self.finish(
                    &charge,
                    ChargeStatus::FAILED,
                    "processor_refused",
                    None,
                    None,
                )
                .await
            }
            Err(ProcessorError::Transient(reason)) => {
                let attempts = self
                    .store
                    .count_attempt(&charge.account_id, &charge.charge_id)
                    .await?;
                metrics::counter!("credits_payments_processor_transient_errors_total").increment(1);
                if attempts >= MAX_PROCESSOR_ATTEMPTS {
                    // The error may have hidden a charge the processor did make (its answer
                    // was lost): ask by our key before recording a failure.
                    return match self.processor.find_by_key(&input).await {
                        Ok(Some(pc)) => {
                            tracing::warn!(charge_id = %charge.charge_id, attempts, processor_charge_id = %pc.processor_charge_id, "processor errors hid a charge it made; recording its outcome");
                            self.record(&charge, &pc).await
                        }
                        // Another drive of this charge (a retried request, the recovery loop)
                        // may still be inside its processor call: give it time to land
                        // before concluding the processor made nothing.
                        Ok(None)
                            if chrono::Utc::now() - charge.created_at
                                < chrono::Duration::seconds(PROCESSOR_SETTLE_SECS) =>
                        {
                            Err(PaymentsError::Unavailable(format!(
                                "payment processor failed transiently on charge {}; it stays processing and is looked up again",
                                charge.charge_id
                            )))
                        }
                        Ok(None) => {
                            tracing::warn!(charge_id = %charge.charge_id, attempts, "processor kept failing and made no charge; charge failed");
                            self.finish(
                                &charge,
                                ChargeStatus::FAILED,
                                "processing_error",
                                None,
                                None,
                            )
                            .await
                        }
                        Err(e) => Err(PaymentsError::Unavailable(format!(
                            "payment processor unreachable ({e}) on charge {}; it stays processing and is looked up again",
                            charge.charge_id
                        ))),
                    };
                }
                tracing::warn!(charge_id = %charge.charge_id, attempts, reason = %reason, "transient processor failure");
                Err(PaymentsError::Unavailable(format!(
                    "payment processor failed transiently ({reason}) on charge {}; retry with the same idempotency_key",
                    charge.charge_id
                )))
            }
            Err(e) => Err(PaymentsError::internal(e.to_string())),
        }
    }

    /// Records what the processor answered for a charge.
    pub(crate) async fn record(
        &self,
        charge: &Charge,
        pc: &crate::processor::ProcessorCharge,
    ) -> Result<Charge, PaymentsError> {
        let id = Some(pc.processor_charge_id.as_str()).filter(|s| !s.is_empty());
        let (status, code, secret) = match &pc.status {
            ProcessorStatus::Succeeded => (ChargeStatus::SUCCEEDED, "", None),
            ProcessorStatus::Pending => (ChargeStatus::PENDING, "", None),
            ProcessorStatus::Failed(code) => (ChargeStatus::FAILED, code.as_str(), None),
            ProcessorStatus::RequiresAction { client_secret } => (
                ChargeStatus::REQUIRES_ACTION,
                AUTHENTICATION_REQUIRED,
                Some(client_secret.as_str()),
            ),
        };
        if status == charge.status {
            // Nothing moved (a pending debit still pending, a confirmation still open).
            if let Some(id) = id {
                self.store
                    .set_processor_id(&charge.account_id, &charge.charge_id, id)
                    .await?;
            }
            return self.reload(charge).await;
        }
        self.finish(charge, status, code, id, secret).await
    }

    async fn reload(&self, charge: &Charge) -> Result<Charge, PaymentsError> {
        self.store
            .charge_by_id(&charge.account_id, &charge.charge_id)
            .await?
            .ok_or_else(|| PaymentsError::internal("charge vanished"))
    }

    /// Records a charge's new status and, when final, its events, in one transaction.
    pub(crate) async fn finish(
        &self,
        charge: &Charge,
        status: ChargeStatus,
        code: &str,
        processor_id: Option<&str>,
        client_secret: Option<&str>,
    ) -> Result<Charge, PaymentsError> {
        let mut tx = self.store.pool().begin().await?;
        let moved = Store::transition(
            &mut tx,
            &charge.account_id,
            &charge.charge_id,
            status,
            code,
            processor_id,
            client_secret,
        )
        .await?;
        if let Some(c) = &moved
            && c.status.is_final()
        {
            let data = ChargeFinished {
                charge_id: c.charge_id.clone(),
                amount: c.amount,
                failure_code: c.failure_code.clone(),
                payment_method_id: c.payment_method_id.clone(),
                purpose: c.purpose.as_str().into(),
            };
            let events = match c.status {
                ChargeStatus::SUCCEEDED => vec![Event::ChargeSucceeded(data)],
                // R25: failed for an off-session caller, and the customer is asked.
                ChargeStatus::REQUIRES_ACTION => vec![
                    Event::ChargeFailed(data.clone()),
                    Event::ChargeActionRequired(data),
                ],
                _ => vec![Event::ChargeFailed(data)],
            };
            for event in &events {
                outbox::enqueue(&mut tx, &c.account_id, event).await?;
            }
        }
        tx.commit().await?;
        let c = match moved {
            Some(c) => {
                tracing::info!(charge_id = %c.charge_id, account_id = %c.account_id, status = c.status.as_str(), failure_code = %c.failure_code, amount = %c.amount, "charge updated");
                metrics::counter!("credits_payments_charges_total", "status" => c.status.as_str())
                    .increment(1);
                c
            }
            // Someone else (a duplicate request, the recovery loop, a webhook) got there first.
            None => self.reload(charge).await?,
        };
        Ok(c)
    }

    pub async fn purchase(&self, req: &ChargeRequest) -> Result<Purchase, PaymentsError> {
        if req.amount < self.min_purchase {
            return Err(PaymentsError::BelowMinimumPurchase {
                min: self.min_purchase,
                amount: req.amount,
            });
        }
        // An unknown account is NOT_FOUND before anything is charged.
        if self
            .store
            .charge_by_key(req.account_id.as_str(), req.idempotency_key.as_str())
            .await?
            .is_none()
        {
            self.ensure_account(&req.account_id).await?;
        }
        let charge = self.charge(req).await?;
        if charge.status != ChargeStatus::SUCCEEDED {
            let balance = self
                .ensure_account(&req.account_id)
                .await
                .ok()
                .map(|a| a.balance);
            return Ok(Purchase {
                charge,
                entry: None,
                balance,
            });
        }
        let (entry, balance) = self.credit_purchase(&charge).await.map_err(|e| {
            PaymentsError::Unavailable(format!(
                "charge {} succeeded but crediting the ledger failed ({e}); it will be credited \
                 automatically, or repeat the request with the same idempotency_key",
                charge.charge_id
            ))
        })?;
        let charge = Charge {
            ledger_entry_id: Some(entry.entry_id.clone()),
            ..charge
        };
        Ok(Purchase {
            charge,
            entry: Some(entry),
            balance: Some(balance),
        })
    }

    /// Credits a succeeded purchase to the ledger. The ledger key is derived from the charge,
    /// so repeating this (retries, recovery, replicas) yields one credit.
    ///
    /// A top-up confirmed on-session (R25) is credited exactly as recharge credits a top-up
    /// (source, reference, description, and the charge's own key as the ledger key), so
    /// whichever of the two posts first, the other is answered with the same entry.
    pub async fn credit_purchase(
        &self,
        charge: &Charge,
    ) -> Result<(ledger_pb::Entry, String), PaymentsError> {
        let mut ledger = self.ledger.clone();
        let request = if charge.purpose == Purpose::TOPUP {
            ledger_pb::AddCreditsRequest {
                account_id: charge.account_id.clone(),
                amount: charge.amount.to_wire(),
                source: ledger_pb::CreditSource::AutoRecharge as i32,
                reference: charge.charge_id.clone(),
                idempotency_key: charge.idempotency_key.clone(),
                description: charge.description.clone(),
            }
        } else {
            ledger_pb::AddCreditsRequest {
                account_id: charge.account_id.clone(),
                amount: charge.amount.to_wire(),
                source: ledger_pb::CreditSource::Purchase as i32,
                reference: charge.charge_id.clone(),
                idempotency_key: format!("purchase:{}", charge.charge_id),
                description: format!("credit purchase, charge {}", charge.charge_id),
            }
        };
        let resp = ledger
            .add_credits(request)
            .await
            .map_err(|s| PaymentsError::from(ServiceError::from(s)))?
            .into_inner();
        let entry = resp
            .entry
            .ok_or_else(|| PaymentsError::internal("ledger returned no entry"))?;
        self.store
            .set_ledger_entry(&charge.account_id, &charge.charge_id, &entry.entry_id)
            .await?;
        Ok((entry, resp.balance))
    }

    /// One pass of recovery: resume stale PROCESSING charges, settle pending ACH debits,
    /// credit succeeded purchases that were not credited. Returns how much it touched.
    pub async fn recover_once(&self, stale_after: Duration) -> Result<usize, PaymentsError> {
        let work = self
            .store
            .claim_unfinished(stale_after.as_secs_f64(), 100)
            .await?;
        let mut done = 0;
        for c in work.stale_processing {
            tracing::info!(charge_id = %c.charge_id, "resuming unfinished charge");
            match self.drive(c).await {
                Ok(c) if c.credited_by_payments() && c.status == ChargeStatus::SUCCEEDED => {
                    self.credit_logged(&c).await;
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "resuming a charge failed; will retry"),
            }
            done += 1;
        }
        for (c, processor_id) in work.pending {
            match self.processor.retrieve(&processor_id).await {
                Ok(pc) => match self.record(&c, &pc).await {
                    Ok(c) => {
                        if c.status == ChargeStatus::SUCCEEDED && c.credited_by_payments() {
                            self.credit_logged(&c).await;
                        }
                        done += 1;
                    }
                    // One charge's trouble must not hold up the rest of the pass.
                    Err(e) => {
                        tracing::warn!(charge_id = %c.charge_id, error = %e, "recording a pending charge failed; will retry")
                    }
                },
                Err(e) => {
                    tracing::warn!(charge_id = %c.charge_id, error = %e, "cannot read pending charge")
                }
            }
        }
        for c in work.uncredited {
            self.credit_logged(&c).await;
            done += 1;
        }
        for r in self
            .store
            .claim_stale_refunds(
                stale_after
                    .as_secs_f64()
                    .max(self.refund_lease.as_secs_f64()),
            )
            .await?
        {
            let account = AccountId::parse(&r.account_id)?;
            if let Err(e) = self.carry_out_refund(&account, r).await {
                tracing::warn!(error = %e, "resuming a refund failed; will retry");
            }
            done += 1;
        }
        done += self.process_pending_events(stale_after).await?;
        Ok(done)
    }

    pub(crate) async fn credit_logged(&self, c: &Charge) {
        match self.credit_purchase(c).await {
            Ok((entry, balance)) => {
                tracing::info!(charge_id = %c.charge_id, entry_id = %entry.entry_id, balance = %balance, "purchase credited")
            }
            Err(e) => {
                tracing::warn!(charge_id = %c.charge_id, error = %e, "crediting purchase failed; will retry")
            }
        }
    }

    pub async fn run_recovery(
        self: Arc<Self>,
        every: Duration,
        stale_after: Duration,
        shutdown: CancellationToken,
    ) {
        loop {
            if let Err(e) = self.recover_once(stale_after).await {
                tracing::warn!(error = %e, "payments recovery pass failed");
            }
            tokio::select! {
                _ = tokio::time::sleep(every) => {},
                _ = shutdown.cancelled() => break,
            }
        }
    }
}

async fn default_changed(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    pm: &PaymentMethod,
) -> Result<(), PaymentsError> {
    let event = Event::PaymentMethodDefaultChanged(DefaultChanged {
        payment_method_id: pm.payment_method_id.clone(),
        method_type: pm.method_type.as_str().into(),
    });
    outbox::enqueue(tx, &pm.account_id, &event).await?;
    Ok(())
}

fn method_not_found(account: &AccountId, id: &str) -> PaymentsError {
    PaymentsError::MethodNotFound {
        account: account.clone(),
        id: id.to_owned(),
    }
}

pub(crate) fn processor_error(e: ProcessorError) -> PaymentsError {
    match e {
        ProcessorError::Rejected(m) => PaymentsError::ProcessorRejected(m),
        ProcessorError::Transient(m) => {
            PaymentsError::Unavailable(format!("payment processor unavailable: {m}"))
        }
        ProcessorError::Unsupported(m) => PaymentsError::Refused(m),
        ProcessorError::Other(m) => PaymentsError::internal(m),
    }
}
