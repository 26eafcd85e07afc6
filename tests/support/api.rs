//! The one set of test helpers every suite drives the services with: `credits-client`
//! behind short verbs (`buy`, `use_credits`, `enable_recharge`, `add_card`, `balance`,
//! `settled_attempts`, …) taking plain `&str` ids and amounts, so a test reads like the
//! rule it checks. The in-process suites (ledger, payments, recharge) and the process-based
//! e2e suite share them.
//!
//! The client never retries here ([`RetryPolicy::none`]): a test must see exactly what the
//! service answered, e.g. the first UNAVAILABLE of a transient processor error.
//!
//! Raw prost requests stay only where a typed client cannot go (fields it refuses before
//! sending, unknown enum numbers, bytes that are not UTF-8, non-canonical amount spellings):
//! `tests/hostile.rs` and some `bad_input_*` cases, through the daemons' `client()`.

use std::time::Duration;

pub use credits_client::{
    Access, AccessCheck, Account, AccountId, AttemptStatus, AutoRecharge, AutoRechargeChange,
    BalanceThreshold, BankAccountDetails, BillingMode, CardDetails, Charge, ChargeStatus, Client,
    ClientConfig, ClientError, Code, CreditSource, CreditsAdded, CreditsToAdd, DisabledReason,
    Entry, EntryKind, Hold, HoldCaptured, HoldRequest, HoldStatus, IdempotencyKey, Money,
    NewPaymentMethod, Page, PaymentMethod, PaymentMethodType, Purchase, RechargeAttempt,
    RetryPolicy, UsageCategory, UsageRecord, UsageRecorded,
};
use rust_decimal::Decimal;

use crate::eventually;

/// How long [`Api::settled_attempts`] waits for top-ups to finish.
pub const SETTLE_WAIT: Duration = Duration::from_secs(30);

/// The per-call deadline of the test client.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// An amount as the tests write it ("25.00", "-1.01", "0.000125").
pub fn money(s: &str) -> Money {
    Money::parse_signed("amount", s).unwrap_or_else(|e| panic!("test amount {s:?}: {e}"))
}

/// A decimal, for sums across several amounts.
pub fn dec(s: &str) -> Decimal {
    s.parse()
        .unwrap_or_else(|e| panic!("test decimal {s:?}: {e}"))
}

/// The sum of the signed `amount` column of a history CSV (`credits_client::csv`, header
/// first): what the entries moved the balance by.
pub fn csv_amount_sum(csv: &str) -> Decimal {
    csv.lines()
        .skip(1)
        .map(|l| {
            l.split(',')
                .nth(4)
                .unwrap_or_else(|| panic!("no amount in {l:?}"))
                .parse::<Decimal>()
                .unwrap_or_else(|e| panic!("amount of {l:?}: {e}"))
        })
        .sum()
}

pub fn acct(id: &str) -> AccountId {
    AccountId::parse(id).unwrap_or_else(|e| panic!("test account id {id:?}: {e}"))
}

pub fn key(k: &str) -> IdempotencyKey {
    IdempotencyKey::parse(k).unwrap_or_else(|e| panic!("test key {k:?}: {e}"))
}

/// A sandbox test card, expiring 12/2034, CVC 123.
pub fn card(number: &str) -> NewPaymentMethod {
    NewPaymentMethod::Card(CardDetails {
        number: number.into(),
        exp_month: 12,
        exp_year: 2034,
        cvc: "123".into(),
    })
}

/// The sandbox's US bank account.
pub fn bank() -> NewPaymentMethod {
    NewPaymentMethod::UsBankAccount(BankAccountDetails {
        routing_number: "110000000".into(),
        account_number: "000123456789".into(),
        holder_name: "Jane Roe".into(),
    })
}

/// API-request usage of `amount`, with no description.
pub fn usage(id: &str, amount: &str, k: &str) -> UsageRecord {
    UsageRecord {
        account_id: acct(id),
        category: UsageCategory::ApiRequests,
        amount: money(amount),
        idempotency_key: key(k),
        description: String::new(),
    }
}

/// A credit of `amount` from `source`, referencing `ch_<key>`.
pub fn credits(id: &str, amount: &str, source: CreditSource, k: &str) -> CreditsToAdd {
    CreditsToAdd {
        account_id: acct(id),
        amount: money(amount),
        source,
        reference: format!("ch_{k}"),
        idempotency_key: key(k),
        description: String::new(),
    }
}

/// A refusal as the typed client or a raw prost client reports it.
pub trait Refusal: std::fmt::Debug {
    fn code(&self) -> Code;
    fn message(&self) -> &str;
}

impl Refusal for ClientError {
    fn code(&self) -> Code {
        ClientError::code(self)
    }
    fn message(&self) -> &str {
        ClientError::message(self)
    }
}

impl Refusal for tonic::Status {
    fn code(&self) -> Code {
        tonic::Status::code(self)
    }
    fn message(&self) -> &str {
        tonic::Status::message(self)
    }
}

/// Asserts that `e` is a `code` refusal whose message starts with the field it names,
/// `field` (for `case`, which the failure shows).
#[track_caller]
pub fn assert_names(e: &impl Refusal, code: Code, field: &str, case: &str) {
    assert_eq!(e.code(), code, "{case}: {e:?}");
    assert!(
        e.message().starts_with(field),
        "{case}: {field}: {}",
        e.message()
    );
}

/// Asserts that `e` is a `code` refusal whose message says `text`.
#[track_caller]
pub fn assert_says(e: &impl Refusal, code: Code, text: &str) {
    assert_eq!(e.code(), code, "{e:?}");
    assert!(e.message().contains(text), "{text}: {}", e.message());
}

/// The items of a first page (of up to 500), which must answer.
fn first_page<T>(page: Result<Page<T>, ClientError>, what: &str, id: &str) -> Vec<T> {
    page.unwrap_or_else(|e| panic!("{what} of {id}: {e}")).items
}

/// The typed client of one set of daemons, with the shared test verbs.
#[derive(Clone, Debug)]
pub struct Api {
    pub client: Client,
}

impl Api {
    /// A client of the three services (a URL nobody serves is fine for a service the test
    /// does not call: channels are lazy).
    pub fn connect(ledger: &str, payments: &str, recharge: &str, token: Option<&str>) -> Api {
        let client = Client::connect(ClientConfig {
            ledger_url: ledger.to_owned(),
            payments_url: payments.to_owned(),
            recharge_url: recharge.to_owned(),
            token: token.map(str::to_owned),
            retry: RetryPolicy::none(),
            // Generous: a deadline of the harness's own must not fail a slow call on a
            // loaded CI machine (the tests set their own waits where time matters).
            timeout: CALL_TIMEOUT,
        })
        .expect("test client config");
        Api { client }
    }

    pub fn ledger(&self) -> &credits_client::Ledger {
        self.client.ledger()
    }

    pub fn payments(&self) -> &credits_client::Payments {
        self.client.payments()
    }

    pub fn recharge(&self) -> &credits_client::Recharge {
        self.client.recharge()
    }

    /// Runs `n` calls of `task` at once, each with its own clone of this client and its
    /// index; their answers, by index. A call that panics fails the test.
    pub async fn concurrently<T, Fut>(&self, n: usize, task: impl Fn(Api, usize) -> Fut) -> Vec<T>
    where
        Fut: std::future::Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        let calls: Vec<_> = (0..n)
            .map(|i| tokio::spawn(task(self.clone(), i)))
            .collect();
        let mut answers = Vec::with_capacity(n);
        for call in calls {
            answers.push(call.await.expect("a concurrent call"));
        }
        answers
    }

    // ---- ledger ---------------------------------------------------------------------

    pub async fn create_account(&self, id: &str, mode: BillingMode) -> Account {
        self.ledger()
            .create_account(&acct(id), mode, &format!("{id} Inc."))
            .await
            .unwrap_or_else(|e| panic!("create {id}: {e}"))
    }

    /// A prepaid account that bought `amount` (credited straight into the ledger, key
    /// "buy"), so it has access.
    pub async fn prepaid(&self, id: &str, amount: &str) -> CreditsAdded {
        self.create_account(id, BillingMode::Prepaid).await;
        self.add_credits(id, amount, CreditSource::Purchase, "buy")
            .await
    }

    pub async fn account(&self, id: &str) -> Account {
        self.ledger()
            .get_account(&acct(id))
            .await
            .unwrap_or_else(|e| panic!("get {id}: {e}"))
    }

    pub async fn balance(&self, id: &str) -> Money {
        self.account(id).await.balance
    }

    pub async fn access(&self, id: &str) -> AccessCheck {
        self.ledger()
            .check_access(&acct(id))
            .await
            .unwrap_or_else(|e| panic!("check access {id}: {e}"))
    }

    /// API-request usage; see [`Api::try_use_credits`] for a refusal.
    pub async fn use_credits(&self, id: &str, amount: &str, k: &str) -> UsageRecorded {
        self.try_use_credits(id, amount, k)
            .await
            .unwrap_or_else(|e| panic!("usage {amount} on {id}: {e}"))
    }

    pub async fn try_use_credits(
        &self,
        id: &str,
        amount: &str,
        k: &str,
    ) -> Result<UsageRecorded, ClientError> {
        self.ledger().record_usage(&usage(id, amount, k)).await
    }

    /// Credits straight into the ledger (as payments or recharge would), referencing
    /// `ch_<key>`.
    pub async fn add_credits(
        &self,
        id: &str,
        amount: &str,
        source: CreditSource,
        k: &str,
    ) -> CreditsAdded {
        self.ledger()
            .add_credits(&credits(id, amount, source, k))
            .await
            .unwrap_or_else(|e| panic!("credit {amount} to {id}: {e}"))
    }

    /// The R7 threshold of `id`, set with no version check.
    pub async fn set_threshold(&self, id: &str, threshold: &str) -> BalanceThreshold {
        self.ledger()
            .set_balance_threshold(&acct(id), money(threshold), None)
            .await
            .unwrap_or_else(|e| panic!("threshold {threshold} of {id}: {e}"))
    }

    /// Every journal entry, newest first, across pages.
    pub async fn entries(&self, id: &str) -> Vec<Entry> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .ledger()
                .list_entries(&acct(id), 500, token.as_deref())
                .await
                .unwrap_or_else(|e| panic!("entries of {id}: {e}"));
            out.extend(page.items);
            match page.next_page_token {
                Some(t) => token = Some(t),
                None => return out,
            }
        }
    }

    // ---- payments -------------------------------------------------------------------

    pub async fn add_method(
        &self,
        id: &str,
        method: NewPaymentMethod,
        make_default: bool,
    ) -> PaymentMethod {
        self.payments()
            .add_payment_method(&acct(id), &method, make_default)
            .await
            .unwrap_or_else(|e| panic!("add a payment method to {id}: {e}"))
    }

    pub async fn add_card(&self, id: &str, number: &str, make_default: bool) -> PaymentMethod {
        self.add_method(id, card(number), make_default).await
    }

    /// An account in `mode` with one card on file (its default).
    pub async fn with_card(&self, id: &str, mode: BillingMode, number: &str) -> PaymentMethod {
        self.create_account(id, mode).await;
        self.add_card(id, number, false).await
    }

    pub async fn add_bank(&self, id: &str, make_default: bool) -> PaymentMethod {
        self.add_method(id, bank(), make_default).await
    }

    pub async fn set_default(&self, id: &str, payment_method_id: &str) -> PaymentMethod {
        self.payments()
            .set_default_payment_method(&acct(id), payment_method_id)
            .await
            .unwrap_or_else(|e| panic!("set default of {id}: {e}"))
    }

    pub async fn remove_method(&self, id: &str, payment_method_id: &str) {
        self.payments()
            .remove_payment_method(&acct(id), payment_method_id)
            .await
            .unwrap_or_else(|e| panic!("remove a method of {id}: {e}"))
    }

    pub async fn methods(&self, id: &str) -> Vec<PaymentMethod> {
        self.payments()
            .list_payment_methods(&acct(id))
            .await
            .unwrap_or_else(|e| panic!("methods of {id}: {e}"))
    }

    /// A purchase with the default method that answered (it may have failed or be
    /// pending); see [`Api::buy`] for one that must be credited.
    pub async fn try_buy(&self, id: &str, amount: &str, k: &str) -> Result<Purchase, ClientError> {
        self.payments()
            .purchase_credits(&acct(id), money(amount), None, &key(k))
            .await
    }

    /// A purchase with the default method, credited at once.
    pub async fn buy(&self, id: &str, amount: &str, k: &str) -> Purchase {
        let p = self
            .try_buy(id, amount, k)
            .await
            .unwrap_or_else(|e| panic!("buy {amount} for {id}: {e}"));
        assert!(p.entry.is_some(), "purchase credited: {p:?}");
        p
    }

    /// A charge (`method` empty: the default), described as "test".
    pub async fn try_charge(
        &self,
        id: &str,
        amount: &str,
        method: &str,
        k: &str,
    ) -> Result<Charge, ClientError> {
        let method = (!method.is_empty()).then_some(method);
        self.payments()
            .charge(&acct(id), money(amount), method, &key(k), "test")
            .await
    }

    /// Every charge, newest first.
    pub async fn charges(&self, id: &str) -> Vec<Charge> {
        let page = self.payments().list_charges(&acct(id), 500, None).await;
        first_page(page, "charges", id)
    }

    // ---- holds (R15) ----------------------------------------------------------------

    pub async fn try_hold(
        &self,
        id: &str,
        amount: &str,
        k: &str,
        ttl_seconds: Option<u32>,
    ) -> Result<Hold, ClientError> {
        let req = HoldRequest {
            account_id: acct(id),
            amount: money(amount),
            category: UsageCategory::FineTuning,
            idempotency_key: key(k),
            description: format!("job {k}"),
            ttl_seconds,
        };
        self.ledger().create_hold(&req).await
    }

    pub async fn hold(&self, id: &str, amount: &str, k: &str) -> Hold {
        self.try_hold(id, amount, k, None)
            .await
            .unwrap_or_else(|e| panic!("hold {amount} on {id}: {e}"))
    }

    pub async fn try_capture(
        &self,
        id: &str,
        hold_id: &str,
        amount: &str,
    ) -> Result<HoldCaptured, ClientError> {
        self.ledger()
            .capture_hold(&acct(id), hold_id, money(amount), "final cost")
            .await
    }

    pub async fn try_release(&self, id: &str, hold_id: &str) -> Result<Hold, ClientError> {
        self.ledger().release_hold(&acct(id), hold_id).await
    }

    pub async fn release(&self, id: &str, hold_id: &str) -> Hold {
        self.try_release(id, hold_id)
            .await
            .unwrap_or_else(|e| panic!("release {hold_id} on {id}: {e}"))
    }

    pub async fn holds(&self, id: &str) -> Vec<Hold> {
        let page = self.ledger().list_holds(&acct(id), 500, None).await;
        first_page(page, "holds", id)
    }

    // ---- recharge -------------------------------------------------------------------

    pub async fn enable_recharge(
        &self,
        id: &str,
        threshold: &str,
        target: &str,
    ) -> Result<AutoRecharge, ClientError> {
        let change = AutoRechargeChange::Enable {
            threshold: money(threshold),
            target: money(target),
            monthly_limit: None,
        };
        self.recharge().set_auto_recharge(&acct(id), change).await
    }

    pub async fn disable_recharge(&self, id: &str) -> AutoRecharge {
        self.recharge()
            .set_auto_recharge(&acct(id), AutoRechargeChange::Disable)
            .await
            .unwrap_or_else(|e| panic!("disable auto-recharge of {id}: {e}"))
    }

    pub async fn recharge_settings(&self, id: &str) -> AutoRecharge {
        self.recharge()
            .get_auto_recharge(&acct(id))
            .await
            .unwrap_or_else(|e| panic!("auto-recharge of {id}: {e}"))
    }

    /// Every top-up attempt, newest first.
    pub async fn attempts(&self, id: &str) -> Vec<RechargeAttempt> {
        let page = self
            .recharge()
            .list_recharge_attempts(&acct(id), 500, None)
            .await;
        first_page(page, "attempts", id)
    }

    /// Waits until at least `n` attempts exist and every one is finished (succeeded or
    /// failed); returns them, newest first.
    pub async fn settled_attempts(&self, id: &str, n: usize) -> Vec<RechargeAttempt> {
        eventually(SETTLE_WAIT, "attempts to settle", || async move {
            let a = self.attempts(id).await;
            let finished = a.iter().all(|a| {
                matches!(
                    a.status,
                    AttemptStatus::Succeeded | AttemptStatus::Failed | AttemptStatus::Skipped
                )
            });
            (finished && a.len() >= n).then_some(a)
        })
        .await
    }

    /// Waits until nothing is in flight and the balance is back at or above `threshold`
    /// (R9's quiescence); returns the attempts.
    pub async fn settled_at_or_above(
        &self,
        id: &str,
        n: usize,
        threshold: &str,
        wait: Duration,
    ) -> Vec<RechargeAttempt> {
        let floor = money(threshold);
        eventually(
            wait,
            "balance back at or above the threshold",
            || async move {
                let a = self.settled_attempts(id, n).await;
                (self.balance(id).await >= floor).then_some(a)
            },
        )
        .await
    }

    /// A prepaid account with a Visa on file and $25 bought, auto-recharge below 10 up
    /// to 50.
    pub async fn funded(&self, id: &str) {
        self.funded_with(id, "4242424242424242", "25.00").await;
    }

    /// A prepaid account with `card` on file and `bought` bought, then auto-recharge below
    /// 10 up to 50.
    pub async fn funded_with(&self, id: &str, card: &str, bought: &str) {
        self.with_card(id, BillingMode::Prepaid, card).await;
        self.buy(id, bought, &format!("{id}-buy")).await;
        let s = self
            .enable_recharge(id, "10", "50")
            .await
            .unwrap_or_else(|e| panic!("enable auto-recharge of {id}: {e}"));
        assert!(s.enabled);
        assert_eq!(
            (s.threshold, s.target),
            (Some(money("10")), Some(money("50")))
        );
    }
}
