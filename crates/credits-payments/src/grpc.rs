//! The gRPC edge of payments: wire ↔ domain, every field validated (docs/api.md "Errors").

use std::sync::Arc;

use credits_common::ids::paging::{next_token, page_size, page_token};
use credits_common::ids::timestamp;
use credits_proto::payments::v1 as pb;
use tonic::{Request, Response, Status};

use crate::domain::*;
use crate::service::Payments;

pub struct PaymentsGrpc {
    svc: Arc<Payments>,
}

impl PaymentsGrpc {
    pub fn new(svc: Arc<Payments>) -> Self {
        Self { svc }
    }
}

fn method_type_to_wire(t: MethodType) -> pb::PaymentMethodType {
    match t {
        MethodType::CARD => pb::PaymentMethodType::Card,
        MethodType::US_BANK_ACCOUNT => pb::PaymentMethodType::UsBankAccount,
    }
}

fn method_to_wire(m: PaymentMethod) -> pb::PaymentMethod {
    pb::PaymentMethod {
        payment_method_id: m.payment_method_id,
        r#type: method_type_to_wire(m.method_type) as i32,
        brand: m.brand,
        last4: m.last4,
        exp_month: m.exp_month.unwrap_or(0) as u32,
        exp_year: m.exp_year.unwrap_or(0) as u32,
        is_default: m.is_default,
        account_id: m.account_id,
        created_at: Some(timestamp(m.created_at)),
    }
}

fn charge_to_wire(c: Charge) -> pb::Charge {
    let status = match c.status {
        ChargeStatus::SUCCEEDED => pb::ChargeStatus::Succeeded,
        ChargeStatus::FAILED | ChargeStatus::REQUIRES_ACTION => pb::ChargeStatus::Failed,
        ChargeStatus::PENDING | ChargeStatus::PROCESSING => pb::ChargeStatus::Pending,
    };
    let action_required = c.status == ChargeStatus::REQUIRES_ACTION;
    pb::Charge {
        charge_id: c.charge_id,
        status: status as i32,
        failure_code: c.failure_code,
        amount: c.amount.to_wire(),
        payment_method_id: c.payment_method_id,
        created_at: Some(timestamp(c.created_at)),
        account_id: c.account_id,
        description: c.description,
        idempotency_key: c.idempotency_key,
        payment_method_type: method_type_to_wire(c.payment_method_type) as i32,
        ledger_entry_id: c.ledger_entry_id.unwrap_or_default(),
        refunded_amount: c.refunded_amount.to_wire(),
        action_required,
        client_secret: if action_required {
            c.action_client_secret.unwrap_or_default()
        } else {
            String::new()
        },
        disputed_amount: c.disputed_amount.to_wire(),
    }
}

fn refund_to_wire(r: Refund) -> pb::Refund {
    let status = match r.status {
        RefundStatus::PROCESSING => pb::RefundStatus::RefundPending,
        RefundStatus::SUCCEEDED => pb::RefundStatus::RefundSucceeded,
        RefundStatus::FAILED => pb::RefundStatus::RefundFailed,
    };
    pb::Refund {
        refund_id: r.refund_id,
        charge_id: r.charge_id,
        amount: r.amount.to_wire(),
        status: status as i32,
        ledger_entry_id: r.ledger_entry_id.unwrap_or_default(),
        created_at: Some(timestamp(r.created_at)),
        account_id: r.account_id,
        reason: r.reason,
        failure_code: r.failure_code,
    }
}

/// A processor's payment method id (`pm_…`): letters, digits and `_`, as Stripe spells ids.
fn processor_token(s: &str) -> Result<String, PaymentsError> {
    if s.len() > 255 || !s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(PaymentsError::invalid(
            "processor_token: not a processor payment method id (pm_…)",
        ));
    }
    Ok(s.to_owned())
}

fn method_id(field: &str, s: &str) -> Result<String, PaymentsError> {
    if s.is_empty() {
        return Err(PaymentsError::invalid(format!("{field}: is required")));
    }
    Ok(bounded_text(field, s, 64)?)
}

#[tonic::async_trait]
impl pb::payments_service_server::PaymentsService for PaymentsGrpc {
    async fn add_payment_method(
        &self,
        req: Request<pb::AddPaymentMethodRequest>,
    ) -> Result<Response<pb::PaymentMethod>, Status> {
        let r = req.into_inner();
        let account = AccountId::parse(&r.account_id)?;
        let token = r.processor_token.trim();
        if !token.is_empty() {
            if r.method.is_some() {
                return Err(PaymentsError::invalid(
                    "processor_token: give a processor_token or card/bank details, not both",
                )
                .into());
            }
            let token = processor_token(token)?;
            let pm = self
                .svc
                .add_method(&account, NewMethod::Token(token), r.make_default)
                .await?;
            return Ok(Response::new(method_to_wire(pm)));
        }
        let method = match r.method {
            Some(pb::add_payment_method_request::Method::Card(c)) => {
                NewMethod::Card(CardDetails::parse(
                    &c.number,
                    c.exp_month,
                    c.exp_year,
                    &c.cvc,
                    chrono::Utc::now(),
                )?)
            }
            Some(pb::add_payment_method_request::Method::UsBankAccount(b)) => {
                NewMethod::UsBankAccount(BankAccountDetails::parse(
                    &b.routing_number,
                    &b.account_number,
                    &b.holder_name,
                )?)
            }
            None => {
                return Err(PaymentsError::invalid(
                    "method: one of processor_token, card or us_bank_account is required",
                )
                .into());
            }
        };
        let pm = self
            .svc
            .add_method(&account, method, r.make_default)
            .await?;
        Ok(Response::new(method_to_wire(pm)))
    }

    async fn list_payment_methods(
        &self,
        req: Request<pb::ListPaymentMethodsRequest>,
    ) -> Result<Response<pb::ListPaymentMethodsResponse>, Status> {
        let r = req.into_inner();
        let account = AccountId::parse(&r.account_id)?;
        let limit = page_size(r.page_size)?;
        let after = page_token(&r.page_token)?;
        let (methods, next_page_token) = self.svc.list_methods(&account, after, limit).await?;
        Ok(Response::new(pb::ListPaymentMethodsResponse {
            payment_methods: methods.into_iter().map(method_to_wire).collect(),
            next_page_token,
        }))
    }

    async fn set_default_payment_method(
        &self,
        req: Request<pb::SetDefaultPaymentMethodRequest>,
    ) -> Result<Response<pb::PaymentMethod>, Status> {
        let r = req.into_inner();
        let account = AccountId::parse(&r.account_id)?;
        let id = method_id("payment_method_id", &r.payment_method_id)?;
        Ok(Response::new(method_to_wire(
            self.svc.set_default(&account, &id).await?,
        )))
    }

    async fn remove_payment_method(
        &self,
        req: Request<pb::RemovePaymentMethodRequest>,
    ) -> Result<Response<pb::RemovePaymentMethodResponse>, Status> {
        let r = req.into_inner();
        let account = AccountId::parse(&r.account_id)?;
        let id = method_id("payment_method_id", &r.payment_method_id)?;
        self.svc.remove_method(&account, &id).await?;
        Ok(Response::new(pb::RemovePaymentMethodResponse {}))
    }

    async fn charge(
        &self,
        req: Request<pb::ChargeRequest>,
    ) -> Result<Response<pb::Charge>, Status> {
        let r = req.into_inner();
        let req = ChargeRequest {
            account_id: AccountId::parse(&r.account_id)?,
            amount: parse_cents("amount", &r.amount)?,
            payment_method_id: bounded_text("payment_method_id", &r.payment_method_id, 64)?,
            idempotency_key: IdempotencyKey::parse(&r.idempotency_key)?,
            description: description_text("description", &r.description, 1024)?,
            purpose: if r.top_up {
                Purpose::TOPUP
            } else {
                Purpose::CHARGE
            },
        };
        Ok(Response::new(charge_to_wire(self.svc.charge(&req).await?)))
    }

    async fn purchase_credits(
        &self,
        req: Request<pb::PurchaseCreditsRequest>,
    ) -> Result<Response<pb::PurchaseCreditsResponse>, Status> {
        let r = req.into_inner();
        let req = ChargeRequest {
            account_id: AccountId::parse(&r.account_id)?,
            amount: parse_cents("amount", &r.amount)?,
            payment_method_id: bounded_text("payment_method_id", &r.payment_method_id, 64)?,
            idempotency_key: IdempotencyKey::parse(&r.idempotency_key)?,
            description: "credit purchase".to_owned(),
            purpose: Purpose::PURCHASE,
        };
        let p = self.svc.purchase(&req).await?;
        Ok(Response::new(pb::PurchaseCreditsResponse {
            charge: Some(charge_to_wire(p.charge)),
            entry: p.entry,
            balance: p.balance.unwrap_or_default(),
        }))
    }

    async fn list_charges(
        &self,
        req: Request<pb::ListChargesRequest>,
    ) -> Result<Response<pb::ListChargesResponse>, Status> {
        let r = req.into_inner();
        let account = AccountId::parse(&r.account_id)?;
        let limit = page_size(r.page_size)?;
        let before = page_token(&r.page_token)?;
        let charges = self.svc.list_charges(&account, before, limit).await?;
        let next_page_token = next_token(charges.len(), limit, charges.last().map(|c| c.seq));
        Ok(Response::new(pb::ListChargesResponse {
            charges: charges.into_iter().map(charge_to_wire).collect(),
            next_page_token,
        }))
    }

    async fn get_charge(
        &self,
        req: Request<pb::GetChargeRequest>,
    ) -> Result<Response<pb::Charge>, Status> {
        let r = req.into_inner();
        let account = AccountId::parse(&r.account_id)?;
        let id = method_id("charge_id", &r.charge_id)?;
        Ok(Response::new(charge_to_wire(
            self.svc.get_charge(&account, &id).await?,
        )))
    }

    async fn refund_charge(
        &self,
        req: Request<pb::RefundChargeRequest>,
    ) -> Result<Response<pb::Refund>, Status> {
        let r = req.into_inner();
        let req = RefundRequest {
            account_id: AccountId::parse(&r.account_id)?,
            charge_id: method_id("charge_id", &r.charge_id)?,
            amount: parse_cents("amount", &r.amount)?,
            idempotency_key: IdempotencyKey::parse(&r.idempotency_key)?,
            reason: credits_common::ids::display_text("reason", &r.reason, 500)?,
        };
        Ok(Response::new(refund_to_wire(
            self.svc.refund_charge(&req).await?,
        )))
    }

    async fn create_setup_intent(
        &self,
        req: Request<pb::CreateSetupIntentRequest>,
    ) -> Result<Response<pb::CreateSetupIntentResponse>, Status> {
        let account = AccountId::parse(&req.into_inner().account_id)?;
        let si = self.svc.create_setup_intent(&account).await?;
        Ok(Response::new(pb::CreateSetupIntentResponse {
            client_secret: si.client_secret,
            publishable_key: si.publishable_key,
        }))
    }

    async fn confirm_charge(
        &self,
        req: Request<pb::ConfirmChargeRequest>,
    ) -> Result<Response<pb::Charge>, Status> {
        let r = req.into_inner();
        let account = AccountId::parse(&r.account_id)?;
        let id = method_id("charge_id", &r.charge_id)?;
        Ok(Response::new(charge_to_wire(
            self.svc.confirm_charge(&account, &id).await?,
        )))
    }
}
