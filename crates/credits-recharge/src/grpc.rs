//! The gRPC edge of recharge: settings (R5, R6, R7, R10) and attempts.

use std::sync::Arc;

use credits_common::Money;
use credits_common::ids::paging::{next_token, page_size, page_token};
use credits_common::ids::timestamp;
use credits_proto::ledger::v1 as lpb;
use credits_proto::payments::v1 as ppb;
use credits_proto::recharge::v1 as pb;
use tonic::{Request, Response, Status};

use crate::domain::*;
use crate::worker::Recharge;

pub struct RechargeGrpc {
    worker: Arc<Recharge>,
}

impl RechargeGrpc {
    pub fn new(worker: Arc<Recharge>) -> Self {
        Self { worker }
    }

    async fn known_account(&self, account: &AccountId) -> Result<lpb::Account, RechargeError> {
        self.worker.account(account.as_str()).await?.ok_or_else(|| {
            RechargeError::not_found(format!("account {:?} not found", account.as_str()))
        })
    }

    /// R10: the default payment method must be a card.
    async fn require_card_default(&self, account: &AccountId) -> Result<(), RechargeError> {
        let mut payments = self.worker.payments.clone();
        let methods = payments
            .list_payment_methods(ppb::ListPaymentMethodsRequest {
                account_id: account.as_str().to_owned(),
            })
            .await
            .map_err(RechargeError::from)?
            .into_inner()
            .payment_methods;
        match methods.iter().find(|m| m.is_default) {
            Some(m) if m.r#type == ppb::PaymentMethodType::Card as i32 => Ok(()),
            Some(_) => Err(RechargeError::precondition(
                "auto-recharge needs a credit or debit card as the default payment method; the default is a US bank account (R10)",
            )),
            None => Err(RechargeError::precondition(
                "auto-recharge needs a default payment method, and the account has none; add a card (R10)",
            )),
        }
    }
}

fn reason_to_wire(r: DisabledReason) -> pb::DisabledReason {
    match r {
        DisabledReason::NONE => pb::DisabledReason::None,
        DisabledReason::USER => pb::DisabledReason::User,
        DisabledReason::DEFAULT_PAYMENT_METHOD_NOT_CARD => {
            pb::DisabledReason::DefaultPaymentMethodNotCard
        }
        DisabledReason::NO_DEFAULT_PAYMENT_METHOD => pb::DisabledReason::NoDefaultPaymentMethod,
        DisabledReason::REPEATED_FAILURES => pb::DisabledReason::RepeatedFailures,
    }
}

fn settings_to_wire(s: Settings) -> pb::AutoRecharge {
    pb::AutoRecharge {
        account_id: s.account_id,
        enabled: s.enabled,
        threshold: s.threshold.to_wire(),
        target: s.target.to_wire(),
        disabled_reason: reason_to_wire(s.disabled_reason) as i32,
        updated_at: Some(timestamp(s.updated_at)),
        consecutive_failures: s.consecutive_failures.max(0) as u32,
    }
}

fn attempt_to_wire(a: Attempt) -> pb::RechargeAttempt {
    let status = match a.status {
        AttemptStatus::PENDING => pb::AttemptStatus::Pending,
        AttemptStatus::CHARGING => pb::AttemptStatus::Charging,
        AttemptStatus::SUCCEEDED => pb::AttemptStatus::Succeeded,
        AttemptStatus::FAILED => pb::AttemptStatus::Failed,
    };
    pb::RechargeAttempt {
        attempt_id: a.attempt_id,
        balance_at_trigger: a.balance_at_trigger.to_wire(),
        amount: a.amount.to_wire(),
        status: status as i32,
        charge_id: a.charge_id.unwrap_or_default(),
        failure_code: a.failure_code,
        created_at: Some(timestamp(a.created_at)),
        completed_at: a.completed_at.map(timestamp),
        account_id: a.account_id,
        trigger: a.trigger,
    }
}

#[tonic::async_trait]
impl pb::auto_recharge_service_server::AutoRechargeService for RechargeGrpc {
    async fn get_auto_recharge(
        &self,
        req: Request<pb::GetAutoRechargeRequest>,
    ) -> Result<Response<pb::AutoRecharge>, Status> {
        let account = AccountId::parse(&req.into_inner().account_id)?;
        match self.worker.store.settings(account.as_str()).await? {
            Some(s) => Ok(Response::new(settings_to_wire(s))),
            None => {
                self.known_account(&account).await?;
                Ok(Response::new(pb::AutoRecharge {
                    account_id: account.as_str().to_owned(),
                    enabled: false,
                    disabled_reason: pb::DisabledReason::None as i32,
                    ..Default::default()
                }))
            }
        }
    }

    async fn set_auto_recharge(
        &self,
        req: Request<pb::SetAutoRechargeRequest>,
    ) -> Result<Response<pb::AutoRecharge>, Status> {
        let r = req.into_inner();
        let account = AccountId::parse(&r.account_id)?;
        let stored = self.worker.store.settings(account.as_str()).await?;
        if !r.enabled && r.threshold.is_empty() && r.target.is_empty() && stored.is_none() {
            // Turning off what was never on: nothing to store, nothing to tell the ledger.
            self.known_account(&account).await?;
            return Ok(Response::new(pb::AutoRecharge {
                account_id: account.as_str().to_owned(),
                enabled: false,
                disabled_reason: pb::DisabledReason::None as i32,
                ..Default::default()
            }));
        }
        // Disabling may leave the amounts out: the stored ones are kept.
        let (threshold, target) = match (
            r.enabled,
            r.threshold.is_empty() && r.target.is_empty(),
            &stored,
        ) {
            (false, true, Some(s)) => (s.threshold, s.target),
            _ => (
                Money::parse_non_negative("threshold", &r.threshold)
                    .map_err(RechargeError::from)?,
                Money::parse_non_negative("target", &r.target).map_err(RechargeError::from)?,
            ),
        };
        validate_amounts(threshold, target, self.worker.min_purchase)?;
        let acct = self.known_account(&account).await?;
        if r.enabled {
            if acct.billing_mode == lpb::BillingMode::Contract as i32 {
                return Err(RechargeError::precondition(
                    "auto-recharge does not apply to contract accounts; they are invoiced under their contract (R5)",
                )
                .into());
            }
            self.require_card_default(&account).await?;
        }
        let saved = self
            .worker
            .save_settings(&account, r.enabled, threshold, target)
            .await?;
        Ok(Response::new(settings_to_wire(saved)))
    }

    async fn list_recharge_attempts(
        &self,
        req: Request<pb::ListRechargeAttemptsRequest>,
    ) -> Result<Response<pb::ListRechargeAttemptsResponse>, Status> {
        let r = req.into_inner();
        let account = AccountId::parse(&r.account_id)?;
        let limit = page_size(r.page_size)?;
        let before = page_token(&r.page_token)?;
        let attempts = self
            .worker
            .store
            .list_attempts(account.as_str(), before, limit)
            .await?;
        if attempts.is_empty() {
            self.known_account(&account).await?;
        }
        let next_page_token = next_token(attempts.len(), limit, attempts.last().map(|a| a.seq));
        Ok(Response::new(pb::ListRechargeAttemptsResponse {
            attempts: attempts.into_iter().map(attempt_to_wire).collect(),
            next_page_token,
        }))
    }
}
