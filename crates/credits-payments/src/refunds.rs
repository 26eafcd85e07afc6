//! R27 refunds and R25 on-session confirmations: the use cases that move money back.
//!
//! A refund is recorded (`PROCESSING`, counted against its charge under the charge's row
//! lock, so racing refunds can never pass the charge's amount) before anything moves; then
//! the ledger debit (`REFUND`, key `refund:<refund_id>`, refused when the available balance
//! does not cover it — the refund is then forgotten, nothing changed); then the processor's
//! refund, keyed by the refund id. A processor refusal reverses the debit (an `ADJUSTMENT`
//! credit, key `refund-reversal:<refund_id>`); a processor that does not answer leaves the
//! refund `PROCESSING`, and the recovery loop asks again with the same keys.

use credits_common::error::ServiceError;
use credits_common::events::{ChargeRefunded, Event};
use credits_common::outbox;
use credits_proto::ledger::v1 as ledger_pb;

use crate::domain::*;
use crate::processor::{ProcessorError, ProcessorStatus, RefundState};
use crate::service::{Payments, processor_error};
use crate::store::Store;

/// How long a refund being carried out is left to its caller (a processor call with its
/// retries can take two minutes) before a duplicate or the recovery loop takes it over.
/// The default of `REFUND_LEASE_SECS`.
pub const REFUND_LEASE_SECS: f64 = 180.0;
/// How soon recovery resumes a refund whose steps could not finish.
pub const REFUND_RETRY_SECS: f64 = 5.0;

impl Payments {
    pub async fn refund_charge(&self, req: &RefundRequest) -> Result<Refund, PaymentsError> {
        let account = &req.account_id;
        if let Some(existing) = self
            .store
            .refund_by_key(account.as_str(), req.idempotency_key.as_str())
            .await?
        {
            if !req.matches(&existing) {
                return Err(PaymentsError::IdempotencyConflict {
                    account: account.clone(),
                    key: req.idempotency_key.clone(),
                });
            }
            return match existing.status {
                RefundStatus::PROCESSING => self.resume_refund(account, existing).await,
                _ => Ok(existing),
            };
        }
        let mut tx = self.store.pool().begin().await?;
        let charge = Store::lock_charge(&mut tx, account.as_str(), &req.charge_id)
            .await?
            .ok_or_else(|| PaymentsError::ChargeNotFound {
                account: account.clone(),
                id: req.charge_id.clone(),
            })?;
        // A concurrent duplicate may have recorded it while this one waited for the lock:
        // answer as its replay, not by the limits the duplicate itself used up.
        if let Some(existing) = self
            .store
            .refund_by_key(account.as_str(), req.idempotency_key.as_str())
            .await?
        {
            tx.rollback().await?;
            return if req.matches(&existing) {
                match existing.status {
                    RefundStatus::PROCESSING => self.resume_refund(account, existing).await,
                    _ => Ok(existing),
                }
            } else {
                Err(PaymentsError::IdempotencyConflict {
                    account: account.clone(),
                    key: req.idempotency_key.clone(),
                })
            };
        }
        refundable(&charge, req.amount)?;
        let refund = Refund {
            seq: 0,
            refund_id: new_id("rf"),
            account_id: account.as_str().to_owned(),
            charge_id: charge.charge_id.clone(),
            amount: req.amount,
            reason: req.reason.clone(),
            idempotency_key: Some(req.idempotency_key.as_str().to_owned()),
            status: RefundStatus::PROCESSING,
            failure_code: String::new(),
            processor_refund_id: None,
            ledger_entry_id: None,
            created_at: chrono::Utc::now(),
        };
        let Some(refund) = Store::insert_refund(&mut tx, &refund).await? else {
            return Err(PaymentsError::internal("refund id collided"));
        };
        tx.commit().await?;
        tracing::info!(account_id = %account, charge_id = %refund.charge_id, refund_id = %refund.refund_id, amount = %refund.amount, "refund recorded");
        self.carry_out_refund(account, refund).await
    }

    /// A duplicate of a refund still being carried out: carried on only when nobody is
    /// (its lease ran out); otherwise answered as it stands (pending), so one refund is
    /// never asked of the processor by two callers at once.
    async fn resume_refund(&self, account: &AccountId, r: Refund) -> Result<Refund, PaymentsError> {
        if self
            .store
            .claim_refund(&r.refund_id, self.refund_lease.as_secs_f64())
            .await?
        {
            self.carry_out_refund(account, r).await
        } else {
            Ok(r)
        }
    }

    /// The refund's next steps from wherever it stands, by the caller that holds its lease.
    /// When they cannot finish (the ledger or the processor unreachable), nobody is inside
    /// a processor call for it any more: the lease is handed back so that recovery resumes
    /// it within seconds, not after the whole lease.
    pub(crate) async fn carry_out_refund(
        &self,
        account: &AccountId,
        refund: Refund,
    ) -> Result<Refund, PaymentsError> {
        let refund_id = refund.refund_id.clone();
        let result = self.refund_steps(account, refund).await;
        if result.is_err()
            && let Err(e) = self
                .store
                .release_refund(
                    &refund_id,
                    self.refund_lease.as_secs_f64(),
                    REFUND_RETRY_SECS,
                )
                .await
        {
            tracing::warn!(refund_id = %refund_id, error = %e, "refund lease not handed back; recovery resumes it when the lease runs out");
        }
        result
    }

    /// Every step repeatable.
    async fn refund_steps(
        &self,
        account: &AccountId,
        refund: Refund,
    ) -> Result<Refund, PaymentsError> {
        // 1. The ledger debit, first: the credits must be there to be taken back.
        if refund.ledger_entry_id.is_none() {
            match self
                .debit(
                    &refund.account_id,
                    refund.amount,
                    ledger_pb::DebitKind::Refund,
                    &refund.charge_id,
                    &format!("refund:{}", refund.refund_id),
                    &format!("refund {} of charge {}", refund.refund_id, refund.charge_id),
                    true,
                )
                .await
            {
                Ok(entry_id) => {
                    self.store
                        .set_refund_entry(&refund.refund_id, &entry_id)
                        .await?
                }
                Err(PaymentsError::Refused(m)) => {
                    // R27: not covered by the available balance: nothing changes.
                    self.store.delete_refund(&refund).await?;
                    return Err(PaymentsError::Refused(format!(
                        "a refund may take back at most the available balance: {m}"
                    )));
                }
                Err(e) => return Err(e),
            }
        }
        // 2. The processor's refund, keyed by our refund id.
        let charge = self
            .store
            .charge_by_id(account.as_str(), &refund.charge_id)
            .await?
            .ok_or_else(|| PaymentsError::internal("refunded charge vanished"))?;
        let processor_id = charge.processor_charge_id.clone().unwrap_or_default();
        match self
            .processor
            .refund(&processor_id, refund.amount, &refund.refund_id)
            .await
        {
            Ok(pr) if pr.state == RefundState::Failed => {
                self.reverse_refund(&refund, "refund_failed").await
            }
            Ok(pr) => {
                // A pending refund (some card networks) is as good as done for the credits.
                self.end_refund(
                    &refund,
                    RefundStatus::SUCCEEDED,
                    "",
                    Some(&pr.processor_refund_id),
                )
                .await
            }
            Err(ProcessorError::Rejected(m)) => {
                // A refusal of this request is not proof that no refund exists under our
                // key (an earlier try may have made it): ask before giving the credits back.
                if let Some(made) = self
                    .processor
                    .find_refund(&processor_id, &refund.refund_id)
                    .await
                    .map_err(processor_error)?
                {
                    return self
                        .end_refund(
                            &refund,
                            RefundStatus::SUCCEEDED,
                            "",
                            Some(&made.processor_refund_id),
                        )
                        .await;
                }
                tracing::warn!(refund_id = %refund.refund_id, reason = %m, "processor refused the refund; reversing the debit");
                self.reverse_refund(&refund, "processor_refused").await
            }
            Err(e) => Err(match processor_error(e) {
                PaymentsError::Unavailable(m) => PaymentsError::Unavailable(format!(
                    "{m}; refund {} stays pending and is asked again (or repeat the request with the same idempotency_key)",
                    refund.refund_id
                )),
                other => other,
            }),
        }
    }

    /// The processor refused: the debit is credited back, the refund fails, and it no
    /// longer counts against its charge.
    async fn reverse_refund(&self, refund: &Refund, code: &str) -> Result<Refund, PaymentsError> {
        let mut ledger = self.ledger.clone();
        ledger
            .add_credits(ledger_pb::AddCreditsRequest {
                account_id: refund.account_id.clone(),
                amount: refund.amount.to_wire(),
                source: ledger_pb::CreditSource::Adjustment as i32,
                reference: refund.refund_id.clone(),
                idempotency_key: format!("refund-reversal:{}", refund.refund_id),
                description: format!("refund {} refused by the processor", refund.refund_id),
            })
            .await
            .map_err(|s| PaymentsError::from(ServiceError::from(s)))?;
        self.end_refund(refund, RefundStatus::FAILED, code, None)
            .await
    }

    pub(crate) async fn end_refund(
        &self,
        refund: &Refund,
        status: RefundStatus,
        code: &str,
        processor_refund_id: Option<&str>,
    ) -> Result<Refund, PaymentsError> {
        let mut tx = self.store.pool().begin().await?;
        let ended = Store::finish_refund(
            &mut tx,
            &refund.refund_id,
            status,
            code,
            processor_refund_id,
        )
        .await?;
        if let Some(r) = &ended
            && status == RefundStatus::SUCCEEDED
        {
            refunded_event(&mut tx, r).await?;
        }
        tx.commit().await?;
        if let Some(r) = &ended {
            tracing::info!(refund_id = %r.refund_id, charge_id = %r.charge_id, status = r.status.as_str(), "refund ended");
        }
        self.store
            .refund_by_id(&refund.account_id, &refund.refund_id)
            .await?
            .ok_or_else(|| PaymentsError::internal("refund vanished"))
    }

    /// Takes credits back in the ledger; the entry id. `require_available`: refused
    /// (`Refused`) unless the available balance covers it.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn debit(
        &self,
        account: &str,
        amount: credits_common::Money,
        kind: ledger_pb::DebitKind,
        reference: &str,
        key: &str,
        description: &str,
        require_available: bool,
    ) -> Result<String, PaymentsError> {
        let mut ledger = self.ledger.clone();
        let resp = ledger
            .debit_credits(ledger_pb::DebitCreditsRequest {
                account_id: account.to_owned(),
                amount: amount.to_wire(),
                kind: kind as i32,
                reference: reference.to_owned(),
                idempotency_key: key.to_owned(),
                description: description.to_owned(),
                require_available,
            })
            .await
            .map_err(|s| match s.code() {
                tonic::Code::FailedPrecondition => PaymentsError::Refused(s.message().to_owned()),
                _ => PaymentsError::from(ServiceError::from(s)),
            })?
            .into_inner();
        Ok(resp.entry.map(|e| e.entry_id).unwrap_or_default())
    }

    /// R25: after the customer confirmed on-session, the processor is asked how the payment
    /// stands; a succeeded one is recorded and credited once (a webhook for the same payment
    /// converges on the same charge transition and the same ledger key).
    pub async fn confirm_charge(
        &self,
        account: &AccountId,
        charge_id: &str,
    ) -> Result<Charge, PaymentsError> {
        let charge = self.get_charge(account, charge_id).await?;
        let charge = match charge.status {
            ChargeStatus::REQUIRES_ACTION | ChargeStatus::PENDING => {
                self.confirm_from_processor(&charge, charge_id).await?
            }
            // After a failed 3-D Secure the customer may still confirm it.
            ChargeStatus::FAILED if charge.action_required_at.is_some() => {
                self.confirm_from_processor(&charge, charge_id).await?
            }
            ChargeStatus::SUCCEEDED => charge,
            _ => {
                return Err(PaymentsError::Refused(format!(
                    "charge {charge_id} is {} and has nothing to confirm",
                    charge.status.as_str()
                )));
            }
        };
        if charge.status == ChargeStatus::FAILED {
            return Err(PaymentsError::Refused(format!(
                "charge {charge_id} was not confirmed: the bank declined it ({})",
                charge.failure_code
            )));
        }
        self.credit_confirmed(charge).await
    }

    async fn confirm_from_processor(
        &self,
        charge: &Charge,
        charge_id: &str,
    ) -> Result<Charge, PaymentsError> {
        let id = charge.processor_charge_id.clone().unwrap_or_default();
        let pc = self
            .processor
            .retrieve(&id)
            .await
            .map_err(processor_error)?;
        if matches!(pc.status, ProcessorStatus::RequiresAction { .. }) {
            return Err(PaymentsError::Refused(format!(
                "charge {charge_id} is still waiting for the customer to confirm it"
            )));
        }
        self.record(charge, &pc).await
    }

    async fn credit_confirmed(&self, charge: Charge) -> Result<Charge, PaymentsError> {
        if charge.status == ChargeStatus::SUCCEEDED
            && charge.credited_by_payments()
            && charge.ledger_entry_id.is_none()
        {
            let (entry, _) = self.credit_purchase(&charge).await.map_err(|e| {
                PaymentsError::Unavailable(format!(
                    "charge {} succeeded but crediting the ledger failed ({e}); it will be credited automatically",
                    charge.charge_id
                ))
            })?;
            return Ok(Charge {
                ledger_entry_id: Some(entry.entry_id),
                ..charge
            });
        }
        Ok(charge)
    }
}

/// R27: only a succeeded purchase or top-up, and never past what is left of it.
fn refundable(charge: &Charge, amount: credits_common::Money) -> Result<(), PaymentsError> {
    if charge.status != ChargeStatus::SUCCEEDED {
        return Err(PaymentsError::Refused(format!(
            "charge {} is {}: only a succeeded charge can be refunded",
            charge.charge_id,
            charge.status.as_str()
        )));
    }
    if charge.purpose == Purpose::CHARGE {
        return Err(PaymentsError::Refused(format!(
            "charge {} bought no credits (a plain Charge): RefundCharge refunds purchases and top-ups",
            charge.charge_id
        )));
    }
    // What a dispute already took back is not refundable either.
    let left = charge.amount - charge.refunded_amount - charge.disputed_amount;
    if amount > left {
        return Err(PaymentsError::Refused(format!(
            "a refund of charge {} may be at most ${left} (charged ${}, refunded ${} and disputed ${} already); got ${amount}",
            charge.charge_id, charge.amount, charge.refunded_amount, charge.disputed_amount
        )));
    }
    Ok(())
}

pub(crate) async fn refunded_event(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    r: &Refund,
) -> Result<(), PaymentsError> {
    let event = Event::ChargeRefunded(ChargeRefunded {
        charge_id: r.charge_id.clone(),
        refund_id: r.refund_id.clone(),
        amount: r.amount,
        ledger_entry_id: r.ledger_entry_id.clone().unwrap_or_default(),
        processor_refund_id: r.processor_refund_id.clone().unwrap_or_default(),
    });
    outbox::enqueue(tx, &r.account_id, &event).await?;
    Ok(())
}
