//! The gRPC edge of recharge: settings (R5, R6, R7, R10) and attempts.

use std::sync::Arc;

use credits_common::Money;
use credits_common::ids::paging::{next_token, page_size, page_token};
use credits_common::ids::timestamp;
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

    /// The account's settings on the wire, with what R19 counts this month; those of an
    /// account that never configured auto-recharge when there are none.
    async fn settings_reply(
        &self,
        account: &AccountId,
        settings: Option<Settings>,
    ) -> Result<Response<pb::AutoRecharge>, Status> {
        Ok(Response::new(match settings {
            Some(s) => settings_to_wire(s, self.worker.charged_this_month(account).await?),
            None => never_configured(account),
        }))
    }
}

/// `GetAutoRecharge` of an account that never configured it (docs/api.md).
fn never_configured(account: &AccountId) -> pb::AutoRecharge {
    pb::AutoRecharge {
        account_id: account.as_str().to_owned(),
        enabled: false,
        disabled_reason: pb::DisabledReason::None as i32,
        charged_this_month: Money::default().to_wire(),
        ..Default::default()
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
        DisabledReason::DISPUTED => pb::DisabledReason::Disputed,
    }
}

fn settings_to_wire(s: Settings, charged_this_month: Money) -> pb::AutoRecharge {
    pb::AutoRecharge {
        monthly_limit: s.monthly_limit.map(|m| m.to_wire()).unwrap_or_default(),
        charged_this_month: charged_this_month.to_wire(),
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
        AttemptStatus::SKIPPED => pb::AttemptStatus::Skipped,
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
        let settings = self.worker.auto_recharge(&account).await?;
        self.settings_reply(&account, settings).await
    }

    async fn set_auto_recharge(
        &self,
        req: Request<pb::SetAutoRechargeRequest>,
    ) -> Result<Response<pb::AutoRecharge>, Status> {
        let r = req.into_inner();
        let account = AccountId::parse(&r.account_id)?;
        let saved = self
            .worker
            .set_auto_recharge(
                &account,
                r.enabled,
                &r.threshold,
                &r.target,
                &r.monthly_limit,
            )
            .await?;
        self.settings_reply(&account, saved).await
    }

    async fn list_recharge_attempts(
        &self,
        req: Request<pb::ListRechargeAttemptsRequest>,
    ) -> Result<Response<pb::ListRechargeAttemptsResponse>, Status> {
        let r = req.into_inner();
        let account = AccountId::parse(&r.account_id)?;
        let limit = page_size(r.page_size)?;
        let before = page_token(&r.page_token)?;
        let attempts = self.worker.attempts(&account, before, limit).await?;
        let next_page_token = next_token(attempts.len(), limit, attempts.last().map(|a| a.seq));
        Ok(Response::new(pb::ListRechargeAttemptsResponse {
            attempts: attempts.into_iter().map(attempt_to_wire).collect(),
            next_page_token,
        }))
    }
}
