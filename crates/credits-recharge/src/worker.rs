//! The heart of auto-recharge: deciding a top-up and carrying it out, exactly once.
//!
//! *Deciding* (per crossing, on enabling below the threshold, after a top-up that left the
//! balance still below it, after a failure's retry delay) runs in one transaction that
//! locks the account's settings row, marks the triggering event processed, checks that no
//! attempt is in flight, reads the balance, and inserts a PENDING attempt with the amount
//! of R8. The partial unique index on in-flight attempts backs this with a constraint.
//!
//! *Executing* an attempt takes its lease, fixes the card it charges, charges through
//! payments and credits the ledger, both with the idempotency key `recharge:<attempt_id>`,
//! then records the outcome with its event. Any worker may resume an attempt whose lease
//! ran out (a crash, a transient failure's backoff), repeating the same keyed calls, so a
//! crossing is charged once and credited once however often it is retried.

use std::sync::Arc;
use std::time::Duration;

use credits_common::Money;
use credits_common::grpc::AuthChannel;
use credits_common::outbox;
use credits_proto::ledger::v1 as lpb;
use credits_proto::ledger::v1::ledger_service_client::LedgerServiceClient;
use credits_proto::payments::v1 as ppb;
use credits_proto::payments::v1::payments_service_client::PaymentsServiceClient;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::domain::*;
use crate::store::Store;

pub type LedgerClient = LedgerServiceClient<AuthChannel>;

/// Re-check triggers (scheduled in `settings.retry_at`).
pub const ENABLED_BELOW: &str = "enabled_below_threshold";
pub const STILL_BELOW: &str = "still_below_threshold";
pub const RETRY_AFTER_FAILURE: &str = "retry_after_failure";

fn is_recheck(trigger: &str) -> bool {
    trigger == ENABLED_BELOW || trigger == STILL_BELOW || trigger == RETRY_AFTER_FAILURE
}
pub type PaymentsClient = PaymentsServiceClient<AuthChannel>;

#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// How long a worker owns an attempt it is executing.
    pub lease: Duration,
    /// After a declined top-up, when to look at the balance again (R11 counts failures).
    pub retry_after_failure: Duration,
    /// Backoff of transient failures: base doubled per retry, capped.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// How often the sweeper looks for attempts to resume and retries that are due.
    pub sweep_every: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(30),
            retry_after_failure: Duration::from_secs(3600),
            backoff_base: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            sweep_every: Duration::from_secs(1),
        }
    }
}

/// Deliberate crash points for tests of the exactly-once guarantees: the worker stops dead
/// at that point, persisting nothing more, as a `kill -9` would leave it.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    pub stop_after_charge: bool,
    /// Skip the immediate R9 re-check after a top-up, as a crash right after the success
    /// commit (or an unreachable ledger) would.
    pub skip_recheck_after_success: bool,
}

pub struct Recharge {
    pub store: Store,
    pub ledger: LedgerClient,
    pub payments: PaymentsClient,
    pub min_purchase: Money,
    pub cfg: WorkerConfig,
    pub faults: Faults,
}

enum Step {
    Done,
    /// Transient trouble: try again later under the same keys.
    Retry(String),
}

impl Recharge {
    /// The ledger's view of the account; `None` when the ledger does not know it.
    pub async fn account(&self, account: &str) -> Result<Option<lpb::Account>, RechargeError> {
        let mut ledger = self.ledger.clone();
        match ledger
            .get_account(lpb::GetAccountRequest {
                account_id: account.to_owned(),
            })
            .await
        {
            Ok(r) => Ok(Some(r.into_inner())),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
            Err(s) => Err(RechargeError::Unavailable(format!(
                "ledger unavailable: {}",
                s.message()
            ))),
        }
    }

    /// Decides whether a top-up is due now and records it. Returns the new attempt.
    pub async fn decide(
        &self,
        account: &str,
        trigger: &str,
        event_id: Option<&str>,
    ) -> Result<Option<Attempt>, RechargeError> {
        let mut tx = self.store.pool().begin().await?;
        if let Some(id) = event_id
            && !Store::mark_processed(&mut tx, id).await?
        {
            tracing::debug!(
                event_id = id,
                account_id = account,
                "duplicate event ignored"
            );
            return Ok(None);
        }
        let Some(settings) = Store::lock_settings(&mut tx, account).await? else {
            tx.commit().await?;
            return Ok(None);
        };
        if is_recheck(trigger) {
            Store::clear_recheck(&mut tx, account).await?;
        }
        if !settings.enabled || Store::has_in_flight(&mut tx, account).await? {
            // Off: crossings are ignored. In flight: that attempt re-checks when it lands (R9).
            tx.commit().await?;
            return Ok(None);
        }
        // Read under the lock and after the in-flight check, so a top-up that just landed
        // is seen and never doubled.
        let Some(acct) = self.account(account).await? else {
            tracing::warn!(
                account_id = account,
                "account unknown to the ledger; nothing to top up"
            );
            tx.commit().await?;
            return Ok(None);
        };
        let balance = Money::parse_signed("balance", &acct.balance)?;
        if balance >= settings.threshold {
            tx.commit().await?;
            return Ok(None);
        }
        let amount = top_up_amount(settings.target, balance);
        let attempt =
            Store::insert_attempt(&mut tx, account, trigger, event_id, balance, amount).await?;
        tx.commit().await?;
        if let Some(a) = &attempt {
            metrics::counter!("credits_recharge_attempts_total", "trigger" => trigger.to_owned())
                .increment(1);
            tracing::info!(account_id = account, attempt_id = %a.attempt_id, %balance, %amount, trigger, "top-up decided");
        }
        Ok(attempt)
    }

    /// Decides, and if a top-up is due, starts it in the background.
    pub async fn decide_and_start(
        self: &Arc<Self>,
        account: &str,
        trigger: &str,
        event_id: Option<&str>,
    ) -> Result<(), RechargeError> {
        if let Some(a) = self.decide(account, trigger, event_id).await? {
            self.spawn_execute(a.attempt_id);
        }
        Ok(())
    }

    pub fn spawn_execute(self: &Arc<Self>, attempt_id: String) {
        let me = self.clone();
        tokio::spawn(async move {
            if let Err(e) = me.execute(&attempt_id).await {
                tracing::warn!(attempt_id, error = %e, "attempt interrupted; the sweeper resumes it");
            }
        });
    }

    /// Carries an attempt as far as it can go now.
    pub async fn execute(self: &Arc<Self>, attempt_id: &str) -> Result<(), RechargeError> {
        let Some(attempt) = self.store.claim(attempt_id, self.cfg.lease).await? else {
            return Ok(()); // finished, or another worker holds it
        };
        match self.run_attempt(&attempt).await {
            Ok(Step::Done) => Ok(()),
            Ok(Step::Retry(why)) | Err(RechargeError::Unavailable(why)) => {
                let delay = self.backoff(attempt.retries);
                self.store.defer(&attempt.attempt_id, delay).await?;
                tracing::warn!(attempt_id = %attempt.attempt_id, retries = attempt.retries + 1, delay_ms = delay.as_millis() as u64, reason = %why, "top-up deferred");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn backoff(&self, retries: i32) -> Duration {
        let factor = 2u32.saturating_pow(retries.clamp(0, 16) as u32);
        self.cfg
            .backoff_base
            .saturating_mul(factor)
            .min(self.cfg.backoff_max)
    }

    async fn run_attempt(self: &Arc<Self>, a: &Attempt) -> Result<Step, RechargeError> {
        let method_id = match &a.payment_method_id {
            Some(id) => id.clone(),
            None => match self.choose_card(a).await? {
                Ok(id) => {
                    self.store.start_charging(&a.attempt_id, &id).await?;
                    id
                }
                Err((code, reason)) => {
                    self.fail(a, None, code, Some(reason)).await?;
                    return Ok(Step::Done);
                }
            },
        };
        let mut payments = self.payments.clone();
        let charge = payments
            .charge(ppb::ChargeRequest {
                account_id: a.account_id.clone(),
                amount: a.amount.to_wire(),
                payment_method_id: method_id,
                idempotency_key: a.key(),
                description: format!("auto-recharge {}", a.attempt_id),
            })
            .await;
        let charge = match charge {
            Ok(c) => c.into_inner(),
            Err(s) => {
                return match s.code() {
                    tonic::Code::NotFound => {
                        self.fail(a, None, "payment_method_not_found", None).await?;
                        Ok(Step::Done)
                    }
                    tonic::Code::FailedPrecondition
                    | tonic::Code::InvalidArgument
                    | tonic::Code::AlreadyExists => {
                        tracing::error!(attempt_id = %a.attempt_id, status = %s.message(), "payments refused the top-up");
                        self.fail(a, None, "charge_refused", None).await?;
                        Ok(Step::Done)
                    }
                    _ => Ok(Step::Retry(format!("payments: {}", s.message()))),
                };
            }
        };
        if self.faults.stop_after_charge {
            tracing::warn!(attempt_id = %a.attempt_id, "fault injected: worker stops after the charge");
            return Err(RechargeError::internal("fault injected after charge"));
        }
        match ppb::ChargeStatus::try_from(charge.status) {
            Ok(ppb::ChargeStatus::Succeeded) => {}
            Ok(ppb::ChargeStatus::Failed) => {
                self.fail(a, Some(&charge.charge_id), &charge.failure_code, None)
                    .await?;
                return Ok(Step::Done);
            }
            _ => {
                return Ok(Step::Retry(format!(
                    "charge {} is not final yet",
                    charge.charge_id
                )));
            }
        }
        self.store
            .set_charge(&a.attempt_id, &charge.charge_id)
            .await?;
        let mut ledger = self.ledger.clone();
        ledger
            .add_credits(lpb::AddCreditsRequest {
                account_id: a.account_id.clone(),
                amount: a.amount.to_wire(),
                source: lpb::CreditSource::AutoRecharge as i32,
                reference: charge.charge_id.clone(),
                idempotency_key: a.key(),
                description: format!("auto-recharge {}", a.attempt_id),
            })
            .await
            .map_err(|s| match s.code() {
                tonic::Code::Unavailable
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Cancelled => {
                    RechargeError::Unavailable(format!("ledger: {}", s.message()))
                }
                _ => RechargeError::internal(format!(
                    "ledger refused the top-up credit: {}",
                    s.message()
                )),
            })?;
        self.succeed(a, &charge.charge_id).await?;
        // R9: usage may have outrun the top-up. The success scheduled this re-check
        // durably; doing it now only saves the sweeper's delay, so a failure here is
        // left to the sweeper.
        if self.faults.skip_recheck_after_success {
            tracing::warn!(attempt_id = %a.attempt_id, "fault injected: no immediate re-check after the top-up");
        } else if let Err(e) = self
            .decide_and_start(&a.account_id, STILL_BELOW, None)
            .await
        {
            tracing::warn!(account_id = %a.account_id, error = %e, "re-check after top-up deferred to the sweeper");
        }
        Ok(Step::Done)
    }

    /// The account's default method, if it is a card (R10); otherwise the failure code and
    /// the reason to turn auto-recharge off.
    async fn choose_card(
        &self,
        a: &Attempt,
    ) -> Result<Result<String, (&'static str, DisabledReason)>, RechargeError> {
        let mut payments = self.payments.clone();
        let methods = payments
            .list_payment_methods(ppb::ListPaymentMethodsRequest {
                account_id: a.account_id.clone(),
            })
            .await
            .map_err(|s| RechargeError::Unavailable(format!("payments: {}", s.message())))?
            .into_inner()
            .payment_methods;
        Ok(match methods.into_iter().find(|m| m.is_default) {
            Some(m) if m.r#type == ppb::PaymentMethodType::Card as i32 => Ok(m.payment_method_id),
            Some(_) => Err((
                "default_payment_method_not_card",
                DisabledReason::DEFAULT_PAYMENT_METHOD_NOT_CARD,
            )),
            None => Err((
                "no_default_payment_method",
                DisabledReason::NO_DEFAULT_PAYMENT_METHOD,
            )),
        })
    }

    async fn succeed(&self, a: &Attempt, charge_id: &str) -> Result<(), RechargeError> {
        let mut tx = self.store.pool().begin().await?;
        if let Some(done) = Store::finish(
            &mut tx,
            &a.attempt_id,
            AttemptStatus::SUCCEEDED,
            Some(charge_id),
            "",
        )
        .await?
        {
            Store::after_success(&mut tx, &a.account_id).await?;
            outbox::enqueue(
                &mut tx,
                "recharge.attempt.succeeded",
                &a.account_id,
                json!({ "attempt_id": done.attempt_id, "amount": done.amount.to_wire(), "charge_id": charge_id, "failure_code": "" }),
            )
            .await?;
            metrics::counter!("credits_recharge_topups_total", "status" => "SUCCEEDED")
                .increment(1);
            tracing::info!(account_id = %a.account_id, attempt_id = %a.attempt_id, charge_id, amount = %a.amount, "top-up succeeded");
        }
        tx.commit().await?;
        Ok(())
    }

    /// Records a failed attempt (R11): its event, the failure streak, and turning
    /// auto-recharge off on the third failure in a row or when the method rules it out.
    async fn fail(
        &self,
        a: &Attempt,
        charge_id: Option<&str>,
        code: &str,
        disable: Option<DisabledReason>,
    ) -> Result<(), RechargeError> {
        let mut tx = self.store.pool().begin().await?;
        if Store::finish(
            &mut tx,
            &a.attempt_id,
            AttemptStatus::FAILED,
            charge_id,
            code,
        )
        .await?
        .is_some()
        {
            outbox::enqueue(
                &mut tx,
                "recharge.attempt.failed",
                &a.account_id,
                json!({ "attempt_id": a.attempt_id, "amount": a.amount.to_wire(), "charge_id": charge_id.unwrap_or(""), "failure_code": code }),
            )
            .await?;
            let streak =
                Store::count_failure(&mut tx, &a.account_id, self.cfg.retry_after_failure).await?;
            let reason = disable
                .or((streak >= MAX_CONSECUTIVE_FAILURES)
                    .then_some(DisabledReason::REPEATED_FAILURES));
            if let Some(reason) = reason {
                disable_in_tx(&mut tx, &a.account_id, reason).await?;
            }
            metrics::counter!("credits_recharge_topups_total", "status" => "FAILED").increment(1);
            tracing::warn!(account_id = %a.account_id, attempt_id = %a.attempt_id, failure_code = code, streak, "top-up failed");
        }
        tx.commit().await?;
        Ok(())
    }

    /// Turns auto-recharge off because of an event (R10), once per event.
    pub async fn disable_for_event(
        &self,
        account: &str,
        reason: DisabledReason,
        event_id: &str,
    ) -> Result<(), RechargeError> {
        let mut tx = self.store.pool().begin().await?;
        if Store::mark_processed(&mut tx, event_id).await? {
            disable_in_tx(&mut tx, account, reason).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Resumes attempts whose lease ran out and runs retries that are due, until shutdown.
    pub async fn run_sweeper(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            if let Err(e) = self.sweep_once().await {
                tracing::warn!(error = %e, "recharge sweep failed");
            }
            tokio::select! {
                _ = tokio::time::sleep(self.cfg.sweep_every) => {},
                _ = shutdown.cancelled() => break,
            }
        }
    }

    pub async fn sweep_once(self: &Arc<Self>) -> Result<(), RechargeError> {
        for id in self.store.claimable(100).await? {
            if let Err(e) = self.execute(&id).await {
                tracing::warn!(attempt_id = %id, error = %e, "resuming attempt failed");
            }
        }
        for (account, failures) in self.store.due_rechecks(100).await? {
            let trigger = if failures > 0 {
                RETRY_AFTER_FAILURE
            } else {
                STILL_BELOW
            };
            if let Err(e) = self.decide_and_start(&account, trigger, None).await {
                tracing::warn!(account_id = %account, error = %e, "re-check failed; it stays scheduled");
            }
        }
        Ok(())
    }
}

async fn disable_in_tx(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    account: &str,
    reason: DisabledReason,
) -> Result<(), RechargeError> {
    if Store::disable(tx, account, reason).await? {
        outbox::enqueue(
            tx,
            "recharge.settings.disabled",
            account,
            json!({ "reason": reason.as_str() }),
        )
        .await?;
        tracing::warn!(
            account_id = account,
            reason = reason.as_str(),
            "auto-recharge turned off"
        );
    }
    Ok(())
}
