//! The recharge worker's outbound calls, as two small ports: what it asks of the ledger
//! and of payments, in domain types. The gRPC adapters ([`GrpcLedger`], [`GrpcPayments`])
//! are the only code here that knows prost; the worker's decisions see only these traits,
//! so they can be exercised against fakes without a network or a database.

use credits_common::Money;
use credits_common::error::ServiceError;
use credits_common::grpc::AuthChannel;
use credits_proto::ledger::v1 as lpb;
use credits_proto::ledger::v1::ledger_service_client::LedgerServiceClient;
use credits_proto::payments::v1 as ppb;
use credits_proto::payments::v1::payments_service_client::PaymentsServiceClient;

use crate::domain::RechargeError;

/// The ledger's view of an account, as much of it as recharge needs.
#[derive(Clone, Debug, PartialEq)]
pub struct LedgerAccount {
    /// R17: the available balance (balance − active holds): what crossings follow and what
    /// a top-up brings up to the target.
    pub balance: Money,
    /// The threshold registered in the ledger, if any.
    pub threshold: Option<Money>,
    /// R5: auto-recharge does not apply to contract accounts.
    pub contract: bool,
}

/// What the account's default payment method is (R10).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DefaultMethod {
    Card(String),
    NotCard,
    None,
}

/// A top-up charge to make: always the attempt's fixed card, amount and key.
#[derive(Clone, Debug)]
pub struct TopUpCharge {
    pub account_id: String,
    pub amount: Money,
    pub payment_method_id: String,
    pub idempotency_key: String,
    pub description: String,
}

/// What payments answered to a top-up charge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChargeAnswer {
    Succeeded {
        charge_id: String,
    },
    Declined {
        charge_id: String,
        code: String,
    },
    /// Not final yet (processing, or an ACH debit pending): ask again later.
    NotFinal {
        charge_id: String,
    },
    /// The payment method is gone.
    MethodNotFound,
    /// Payments refused the request itself (a rule, bad input): it will not succeed.
    Refused(String),
    /// The key is taken by a different request: this copy of the attempt is stale.
    KeyConflict(String),
}

#[tonic::async_trait]
pub trait LedgerPort: Send + Sync + 'static {
    /// `None` when the ledger does not know the account.
    async fn account(&self, account: &str) -> Result<Option<LedgerAccount>, RechargeError>;
    /// Writes (`Some`) or clears (`None`) the threshold under `version`; returns the
    /// version the ledger holds afterwards (a newer one means this write lost a race).
    async fn set_threshold(
        &self,
        account: &str,
        threshold: Option<Money>,
        version: i64,
    ) -> Result<i64, RechargeError>;
    /// Credits a top-up (source `AUTO_RECHARGE`) under `key`; the available balance read
    /// right after it, when the ledger sends one.
    async fn credit_top_up(
        &self,
        charge: &TopUpCharge,
        charge_id: &str,
    ) -> Result<Option<Money>, RechargeError>;
}

#[tonic::async_trait]
pub trait PaymentsPort: Send + Sync + 'static {
    async fn default_method(&self, account: &str) -> Result<DefaultMethod, RechargeError>;
    /// Charges; `Err` only when payments could not be asked (down, refusing our token).
    async fn charge(&self, charge: &TopUpCharge) -> Result<ChargeAnswer, RechargeError>;
}

/// A peer's gRPC error as the worker sees it: a dependency that is down or refuses our
/// credentials is `Unavailable` (retried, loudly logged), never a reason to give up.
pub fn peer_error(peer: &str, s: tonic::Status) -> RechargeError {
    match s.code() {
        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => {
            tracing::error!(peer, status = %s.message(), "a peer refuses our credentials (CREDITS_AUTH_TOKEN / token file); retrying");
            RechargeError::Unavailable(format!("{peer} refused our credentials: {}", s.message()))
        }
        tonic::Code::NotFound
        | tonic::Code::InvalidArgument
        | tonic::Code::FailedPrecondition
        | tonic::Code::AlreadyExists => RechargeError::PeerRefused(ServiceError::from(s)),
        _ => RechargeError::Unavailable(format!("{peer} unavailable: {}", s.message())),
    }
}

/// Classifies payments' answer to a top-up charge.
pub fn charge_answer(
    result: Result<ppb::Charge, tonic::Status>,
) -> Result<ChargeAnswer, RechargeError> {
    match result {
        Ok(c) => Ok(match ppb::ChargeStatus::try_from(c.status) {
            Ok(ppb::ChargeStatus::Succeeded) => ChargeAnswer::Succeeded {
                charge_id: c.charge_id,
            },
            Ok(ppb::ChargeStatus::Failed) => ChargeAnswer::Declined {
                charge_id: c.charge_id,
                code: c.failure_code,
            },
            _ => ChargeAnswer::NotFinal {
                charge_id: c.charge_id,
            },
        }),
        Err(s) => match s.code() {
            tonic::Code::NotFound => Ok(ChargeAnswer::MethodNotFound),
            tonic::Code::FailedPrecondition | tonic::Code::InvalidArgument => {
                Ok(ChargeAnswer::Refused(s.message().to_owned()))
            }
            tonic::Code::AlreadyExists => Ok(ChargeAnswer::KeyConflict(s.message().to_owned())),
            _ => Err(peer_error("payments", s)),
        },
    }
}

/// The ledger over gRPC.
#[derive(Clone)]
pub struct GrpcLedger(pub LedgerServiceClient<AuthChannel>);

#[tonic::async_trait]
impl LedgerPort for GrpcLedger {
    async fn account(&self, account: &str) -> Result<Option<LedgerAccount>, RechargeError> {
        let answer = self
            .0
            .clone()
            .get_account(lpb::GetAccountRequest {
                account_id: account.to_owned(),
            })
            .await;
        let a = match answer {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == tonic::Code::NotFound => return Ok(None),
            Err(s) => return Err(peer_error("ledger", s)),
        };
        Ok(Some(LedgerAccount {
            // A ledger from before holds sends no available balance: it is the balance.
            balance: match a.available_balance.as_str() {
                "" => Money::parse_signed("balance", &a.balance)?,
                available => Money::parse_signed("available_balance", available)?,
            },
            threshold: match a.balance_threshold.as_str() {
                "" => None,
                t => Some(Money::parse_signed("balance_threshold", t)?),
            },
            contract: a.billing_mode == lpb::BillingMode::Contract as i32,
        }))
    }

    async fn set_threshold(
        &self,
        account: &str,
        threshold: Option<Money>,
        version: i64,
    ) -> Result<i64, RechargeError> {
        let mut ledger = self.0.clone();
        let stored = match threshold {
            Some(t) => ledger
                .set_balance_threshold(lpb::SetBalanceThresholdRequest {
                    account_id: account.to_owned(),
                    threshold: t.to_wire(),
                    version,
                })
                .await
                .map(|r| r.into_inner().version),
            None => ledger
                .clear_balance_threshold(lpb::ClearBalanceThresholdRequest {
                    account_id: account.to_owned(),
                    version,
                })
                .await
                .map(|r| r.into_inner().version),
        };
        stored.map_err(|s| peer_error("ledger", s))
    }

    async fn credit_top_up(
        &self,
        charge: &TopUpCharge,
        charge_id: &str,
    ) -> Result<Option<Money>, RechargeError> {
        let answer = self
            .0
            .clone()
            .add_credits(lpb::AddCreditsRequest {
                account_id: charge.account_id.clone(),
                amount: charge.amount.to_wire(),
                source: lpb::CreditSource::AutoRecharge as i32,
                reference: charge_id.to_owned(),
                idempotency_key: charge.idempotency_key.clone(),
                description: charge.description.clone(),
            })
            .await
            .map_err(|s| match peer_error("ledger", s) {
                RechargeError::Unavailable(m) => RechargeError::Unavailable(m),
                other => {
                    RechargeError::internal(format!("ledger refused the top-up credit: {other}"))
                }
            })?
            .into_inner();
        // A ledger from before sends none: the balance is then checked again as before.
        Ok(match answer.available_balance.as_str() {
            "" => None,
            a => Some(Money::parse_signed("available_balance", a)?),
        })
    }
}

/// Payments over gRPC.
#[derive(Clone)]
pub struct GrpcPayments(pub PaymentsServiceClient<AuthChannel>);

#[tonic::async_trait]
impl PaymentsPort for GrpcPayments {
    async fn default_method(&self, account: &str) -> Result<DefaultMethod, RechargeError> {
        // Page by page until the default (an account holds at most 25: one page).
        let mut page_token = String::new();
        loop {
            let page = self
                .0
                .clone()
                .list_payment_methods(ppb::ListPaymentMethodsRequest {
                    account_id: account.to_owned(),
                    page_size: 100,
                    page_token,
                })
                .await
                .map_err(|s| peer_error("payments", s))?
                .into_inner();
            if let Some(m) = page.payment_methods.into_iter().find(|m| m.is_default) {
                return Ok(if m.r#type == ppb::PaymentMethodType::Card as i32 {
                    DefaultMethod::Card(m.payment_method_id)
                } else {
                    DefaultMethod::NotCard
                });
            }
            if page.next_page_token.is_empty() {
                return Ok(DefaultMethod::None);
            }
            page_token = page.next_page_token;
        }
    }

    async fn charge(&self, charge: &TopUpCharge) -> Result<ChargeAnswer, RechargeError> {
        let answer = self
            .0
            .clone()
            .charge(ppb::ChargeRequest {
                account_id: charge.account_id.clone(),
                amount: charge.amount.to_wire(),
                payment_method_id: charge.payment_method_id.clone(),
                idempotency_key: charge.idempotency_key.clone(),
                description: charge.description.clone(),
                // Credited by us under this key; after an on-session confirmation (R25)
                // payments credits it the same way.
                top_up: true,
            })
            .await
            .map(|r| r.into_inner());
        charge_answer(answer)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn charge(status: ppb::ChargeStatus, code: &str) -> ppb::Charge {
        ppb::Charge {
            charge_id: "ch_1".into(),
            status: status as i32,
            failure_code: code.into(),
            ..Default::default()
        }
    }

    #[test]
    fn payments_answers_are_classified_for_the_worker() {
        assert_eq!(
            charge_answer(Ok(charge(ppb::ChargeStatus::Succeeded, ""))).unwrap(),
            ChargeAnswer::Succeeded {
                charge_id: "ch_1".into()
            }
        );
        assert_eq!(
            charge_answer(Ok(charge(ppb::ChargeStatus::Failed, "card_declined"))).unwrap(),
            ChargeAnswer::Declined {
                charge_id: "ch_1".into(),
                code: "card_declined".into()
            }
        );
        assert!(matches!(
            charge_answer(Ok(charge(ppb::ChargeStatus::Pending, ""))).unwrap(),
            ChargeAnswer::NotFinal { .. }
        ));
        assert!(matches!(
            charge_answer(Err(tonic::Status::already_exists("x"))).unwrap(),
            ChargeAnswer::KeyConflict(_)
        ));
        assert!(matches!(
            charge_answer(Err(tonic::Status::failed_precondition("x"))).unwrap(),
            ChargeAnswer::Refused(_)
        ));
        assert_eq!(
            charge_answer(Err(tonic::Status::not_found("x"))).unwrap(),
            ChargeAnswer::MethodNotFound
        );
    }

    #[test]
    fn a_peer_that_is_down_or_refuses_our_token_is_retried_never_given_up() {
        for s in [
            tonic::Status::unavailable("x"),
            tonic::Status::unauthenticated("x"),
            tonic::Status::permission_denied("x"),
            tonic::Status::unknown("x"),
            tonic::Status::deadline_exceeded("x"),
        ] {
            assert!(
                matches!(
                    charge_answer(Err(s.clone())),
                    Err(RechargeError::Unavailable(_))
                ),
                "{s:?}"
            );
        }
    }
}
