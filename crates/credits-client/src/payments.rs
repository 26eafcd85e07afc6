//! [`Payments`]: every RPC of `credits.payments.v1.PaymentsService` — payment methods,
//! charges and credit purchases.

use credits_common::Money;
use credits_common::ids::{AccountId, IdempotencyKey};
use credits_proto::payments::v1 as ppb;
use credits_proto::payments::v1::payments_service_client::PaymentsServiceClient;

use crate::retry::{Repeat, RetryPolicy, rpc};
use crate::types::{Charge, NewPaymentMethod, Page, PaymentMethod, Purchase, page_size};
use crate::{AuthChannel, ClientError};

/// The payments service (default port 50052). Cheap to clone; clones share the
/// connection.
#[derive(Clone, Debug)]
pub struct Payments {
    inner: PaymentsServiceClient<AuthChannel>,
    retry: RetryPolicy,
}

impl Payments {
    pub(crate) fn new(channel: AuthChannel, retry: RetryPolicy) -> Self {
        Payments {
            inner: PaymentsServiceClient::new(channel),
            retry,
        }
    }

    /// Adds a card or bank account (tokenised by the processor, never stored, R14). Sent
    /// once: a repeat after a lost answer would add a second method.
    pub async fn add_payment_method(
        &self,
        account: &AccountId,
        method: &NewPaymentMethod,
        make_default: bool,
    ) -> Result<PaymentMethod, ClientError> {
        let (method, processor_token) = method.to_wire();
        let req = ppb::AddPaymentMethodRequest {
            account_id: account.to_string(),
            method,
            make_default,
            processor_token,
        };
        rpc!(self, Repeat::Once, req, add_payment_method)
            .await?
            .try_into()
    }

    /// Every method of the account (at most 25, R28), in the order they were added: the
    /// pages of [`Payments::list_payment_methods_page`], all of them.
    pub async fn list_payment_methods(
        &self,
        account: &AccountId,
    ) -> Result<Vec<PaymentMethod>, ClientError> {
        let mut all = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .list_payment_methods_page(account, 0, token.as_deref())
                .await?;
            all.extend(page.items);
            match page.next_page_token {
                Some(t) => token = Some(t),
                None => return Ok(all),
            }
        }
    }

    /// One page of the account's methods (R28): `page_size` 0 = 50.
    pub async fn list_payment_methods_page(
        &self,
        account: &AccountId,
        page_size_: u32,
        page_token: Option<&str>,
    ) -> Result<Page<PaymentMethod>, ClientError> {
        let req = ppb::ListPaymentMethodsRequest {
            account_id: account.to_string(),
            page_size: page_size(page_size_),
            page_token: page_token.unwrap_or_default().to_owned(),
        };
        let r = rpc!(self, Repeat::Safe, req, list_payment_methods).await?;
        Page::from_wire(r.payment_methods, r.next_page_token)
    }

    /// Makes a method the default (R10: a bank account as default turns auto-recharge
    /// off). Sent once.
    pub async fn set_default_payment_method(
        &self,
        account: &AccountId,
        payment_method_id: &str,
    ) -> Result<PaymentMethod, ClientError> {
        let req = ppb::SetDefaultPaymentMethodRequest {
            account_id: account.to_string(),
            payment_method_id: payment_method_id.to_owned(),
        };
        rpc!(self, Repeat::Once, req, set_default_payment_method)
            .await?
            .try_into()
    }

    /// Removes a method. Sent once.
    pub async fn remove_payment_method(
        &self,
        account: &AccountId,
        payment_method_id: &str,
    ) -> Result<(), ClientError> {
        let req = ppb::RemovePaymentMethodRequest {
            account_id: account.to_string(),
            payment_method_id: payment_method_id.to_owned(),
        };
        rpc!(self, Repeat::Once, req, remove_payment_method).await?;
        Ok(())
    }

    /// Charges a method (`None`: the default) once per idempotency key; `amount` in whole
    /// cents. Retried when transient (R12). A `Pending` card charge may be completed by
    /// calling again with the same key.
    pub async fn charge(
        &self,
        account: &AccountId,
        amount: Money,
        payment_method_id: Option<&str>,
        idempotency_key: &IdempotencyKey,
        description: &str,
    ) -> Result<Charge, ClientError> {
        let req = ppb::ChargeRequest {
            account_id: account.to_string(),
            amount: amount.to_wire(),
            payment_method_id: payment_method_id.unwrap_or_default().to_owned(),
            idempotency_key: idempotency_key.as_str().to_owned(),
            description: description.to_owned(),
            top_up: false,
        };
        rpc!(self, Repeat::Safe, req, charge).await?.try_into()
    }

    /// Charges, then credits the ledger (R3: at least the minimum purchase). Retried when
    /// transient (R12). With an ACH method the credit comes when the charge settles.
    pub async fn purchase_credits(
        &self,
        account: &AccountId,
        amount: Money,
        payment_method_id: Option<&str>,
        idempotency_key: &IdempotencyKey,
    ) -> Result<Purchase, ClientError> {
        let req = ppb::PurchaseCreditsRequest {
            account_id: account.to_string(),
            amount: amount.to_wire(),
            payment_method_id: payment_method_id.unwrap_or_default().to_owned(),
            idempotency_key: idempotency_key.as_str().to_owned(),
        };
        rpc!(self, Repeat::Safe, req, purchase_credits)
            .await?
            .try_into()
    }

    /// Charges, newest first (R13); paging as in [`crate::Ledger::list_entries`].
    pub async fn list_charges(
        &self,
        account: &AccountId,
        page_size_: u32,
        page_token: Option<&str>,
    ) -> Result<Page<Charge>, ClientError> {
        let req = ppb::ListChargesRequest {
            account_id: account.to_string(),
            page_size: page_size(page_size_),
            page_token: page_token.unwrap_or_default().to_owned(),
        };
        let r = rpc!(self, Repeat::Safe, req, list_charges).await?;
        Page::from_wire(r.charges, r.next_page_token)
    }

    pub async fn get_charge(
        &self,
        account: &AccountId,
        charge_id: &str,
    ) -> Result<Charge, ClientError> {
        let req = ppb::GetChargeRequest {
            account_id: account.to_string(),
            charge_id: charge_id.to_owned(),
        };
        rpc!(self, Repeat::Safe, req, get_charge).await?.try_into()
    }

    /// R27: refunds unused credits of a succeeded purchase or top-up. Retried when
    /// transient (the same key answers the same refund).
    pub async fn refund_charge(
        &self,
        account: &AccountId,
        charge_id: &str,
        amount: Money,
        idempotency_key: &IdempotencyKey,
        reason: &str,
    ) -> Result<ppb::Refund, ClientError> {
        let req = ppb::RefundChargeRequest {
            account_id: account.to_string(),
            charge_id: charge_id.to_owned(),
            amount: amount.to_wire(),
            idempotency_key: idempotency_key.as_str().to_owned(),
            reason: reason.to_owned(),
        };
        rpc!(self, Repeat::Safe, req, refund_charge).await
    }

    /// R24: the client secret and publishable key the customer's Stripe.js needs to add a
    /// card for off-session use. Sent once (each call makes a SetupIntent).
    pub async fn create_setup_intent(
        &self,
        account: &AccountId,
    ) -> Result<ppb::CreateSetupIntentResponse, ClientError> {
        let req = ppb::CreateSetupIntentRequest {
            account_id: account.to_string(),
        };
        rpc!(self, Repeat::Once, req, create_setup_intent).await
    }

    /// R25: after the customer confirmed a payment on-session.
    pub async fn confirm_charge(
        &self,
        account: &AccountId,
        charge_id: &str,
    ) -> Result<Charge, ClientError> {
        let req = ppb::ConfirmChargeRequest {
            account_id: account.to_string(),
            charge_id: charge_id.to_owned(),
        };
        rpc!(self, Repeat::Safe, req, confirm_charge)
            .await?
            .try_into()
    }
}
