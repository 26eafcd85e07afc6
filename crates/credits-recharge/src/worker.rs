//! The heart of auto-recharge: deciding a top-up and carrying it out, exactly once.
//!
//! *Deciding* (per crossing, on enabling below the threshold, after a top-up that left the
//! balance still below it, after a failure's retry delay) reads the settings and the
//! balance with no lock held, then runs one transaction that marks a crossing's event
//! processed, locks the account's settings row, checks it did not change meanwhile, and
//! inserts a CHARGING attempt with the amount of R8, leased to the deciding worker. The
//! partial unique index on in-flight attempts backs this with a constraint.
//!
//! *Executing* an attempt (leased at its insert, or taken over when its lease ran out)
//! charges the default card through payments and credits the ledger, both with the
//! idempotency key `recharge:<attempt_id>`,
//! then records the outcome with its event. Any worker may resume an attempt whose lease
//! ran out (a crash, a transient failure's backoff), repeating the same keyed calls, so a
//! crossing is charged once and credited once however often it is retried.

use std::sync::Arc;
use std::time::Duration;

use credits_common::Money;
use credits_common::events::{AttemptFinished, Event, LimitReached, SettingsDisabled};
use credits_common::outbox;
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::domain::*;
use crate::ports::{
    ChargeAnswer, DefaultMethod, LedgerAccount, LedgerPort, PaymentsPort, TopUpCharge,
};
use crate::store::Store;

/// Most due checks or resumed attempts one sweeper pass carries out at once.
pub const SWEEP_CONCURRENCY: usize = 16;
/// Most due checks or attempts one sweeper pass takes on.
pub const SWEEP_BATCH: i64 = 100;
/// How often a decision re-reads when the settings changed under it before leaving the
/// check due for the sweeper.
const DECIDE_ROUNDS: usize = 3;
/// An attempt whose key payments keeps refusing as a different request is failed after
/// this many reloads.
const MAX_KEY_CONFLICTS: i32 = 10;
/// A charge refused on the default while the default reads as a card is tried again this
/// many times before the refusal ends the attempt.
const MAX_DEFAULT_RETRIES: i32 = 3;
/// How long a crossing's decision waits for the ledger's balance before the crossing is
/// recorded as a due check instead (the ledger slow or away).
const CROSSING_LEDGER_DEADLINE: Duration = Duration::from_millis(500);
/// After the ledger was slow or away for a crossing, crossings are recorded as due checks
/// at once for this long, so the consumer keeps acknowledging at full speed.
const CROSSING_FAST_PATH_PAUSE: Duration = Duration::from_secs(5);

/// What a decision came to.
pub enum Decision {
    /// A top-up to carry out, leased to this worker.
    TopUp(Box<Lease>),
    /// Decided: nothing to charge, an attempt already in flight (it makes a check due when
    /// it ends), no check due, or a duplicate crossing.
    Done,
    /// Nothing recorded: auto-recharge off, or the settings kept changing.
    NotDone,
}

#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// How long a worker owns an attempt it is executing.
    pub lease: Duration,
    /// After a declined top-up, when to look at the balance again (R11 counts failures).
    pub retry_after_failure: Duration,
    /// Backoff of transient failures: base doubled per retry, capped.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// How often the sweeper looks for attempts to resume and checks that are due.
    pub sweep_every: Duration,
    /// How often the reconciler compares every enabled account with the ledger.
    pub reconcile_every: Duration,
    /// "Now" for the monthly limit's calendar month (R19); tests move it.
    pub clock: Clock,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(30),
            retry_after_failure: Duration::from_secs(3600),
            backoff_base: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            sweep_every: Duration::from_secs(1),
            reconcile_every: Duration::from_secs(60),
            clock: Clock::default(),
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
    store: Store,
    ledger: Arc<dyn LedgerPort>,
    payments: Arc<dyn PaymentsPort>,
    min_purchase: Money,
    cfg: WorkerConfig,
    faults: Faults,
    /// Every attempt and check started in the background, drained on shutdown.
    tasks: TaskTracker,
    /// Until when crossings skip the decision at once ([`CROSSING_FAST_PATH_PAUSE`]).
    fast_path_paused_until: std::sync::Mutex<Option<std::time::Instant>>,
}

enum Step {
    Done,
    /// Transient trouble: try again later under the same keys.
    Retry(String),
    /// Another worker took the attempt over; it carries on.
    LeaseLost,
}

impl Recharge {
    pub fn new(
        store: Store,
        ledger: Arc<dyn LedgerPort>,
        payments: Arc<dyn PaymentsPort>,
        min_purchase: Money,
        cfg: WorkerConfig,
        faults: Faults,
    ) -> Self {
        Self {
            store,
            ledger,
            payments,
            min_purchase,
            cfg,
            faults,
            tasks: TaskTracker::new(),
            fast_path_paused_until: std::sync::Mutex::new(None),
        }
    }

    /// Waits for every background attempt and check to finish. Each step is bounded (gRPC
    /// and pool timeouts); what a later kill would cut short is durable and resumed by any
    /// replica.
    pub async fn drain(&self) {
        self.tasks.close();
        self.tasks.wait().await;
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// "Now" for the monthly limit (R19).
    pub fn clock(&self) -> &Clock {
        &self.cfg.clock
    }

    pub fn min_purchase(&self) -> Money {
        self.min_purchase
    }

    pub(crate) fn ledger(&self) -> &dyn LedgerPort {
        self.ledger.as_ref()
    }

    /// The ledger's view of the account; `None` when the ledger does not know it.
    pub async fn account(&self, account: &str) -> Result<Option<LedgerAccount>, RechargeError> {
        self.ledger.account(account).await
    }

    /// The account's default payment method, as payments knows it now.
    pub async fn default_method(&self, account: &str) -> Result<DefaultMethod, RechargeError> {
        self.payments.default_method(account).await
    }

    /// Records a crossing as a due balance check, in the transaction that marks the event
    /// processed. Once this returned, the event may be acknowledged: the check is durable
    /// and any replica's sweeper carries it out, however long the ledger is away.
    pub async fn record_crossing(
        &self,
        account: &str,
        event_id: &str,
    ) -> Result<bool, RechargeError> {
        let mut tx = self.store.pool().begin().await?;
        if !Store::mark_processed(&mut tx, event_id).await? {
            tracing::debug!(event_id, account_id = account, "duplicate event ignored");
            return Ok(false);
        }
        // Off or never configured: the crossing is ignored (docs/api.md).
        let due =
            Store::mark_due(&mut tx, account, Trigger::ThresholdCrossed, Some(event_id)).await?;
        tx.commit().await?;
        Ok(due)
    }

    /// A crossing, decided at once when it can be: one read, the ledger asked (waiting at
    /// most [`CROSSING_LEDGER_DEADLINE`]), then one transaction that marks the event
    /// processed, takes the decision and leases the new attempt to this worker. When the
    /// decision cannot be taken now (the ledger slow or away, the settings changing under
    /// it, auto-recharge off) the crossing is recorded as a due check instead
    /// ([`Self::record_crossing`]), which needs no peer; after the ledger was slow or away,
    /// for [`CROSSING_FAST_PATH_PAUSE`], every crossing is.
    pub async fn on_crossing(
        self: &Arc<Self>,
        account: &str,
        event_id: &str,
    ) -> Result<(), RechargeError> {
        if !self.fast_path_paused() {
            match self
                .decide_with(account, Trigger::ThresholdCrossed, Some(event_id))
                .await
            {
                Ok(Decision::TopUp(lease)) => {
                    self.spawn_run(*lease);
                    return Ok(());
                }
                Ok(Decision::Done) => return Ok(()),
                Ok(Decision::NotDone) => {}
                Err(e) => {
                    if matches!(e, RechargeError::Unavailable(_)) {
                        self.pause_fast_path();
                    }
                    tracing::debug!(account_id = account, error = %e, "crossing not decided at once; recorded as a due check");
                }
            }
        }
        if self.record_crossing(account, event_id).await? {
            // Durable now; carrying it out at once only saves the sweeper's delay.
            self.spawn_decide(account.to_owned(), Trigger::ThresholdCrossed);
        }
        Ok(())
    }

    fn fast_path_paused(&self) -> bool {
        let mut until = self
            .fast_path_paused_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match *until {
            Some(t) if t > std::time::Instant::now() => true,
            Some(_) => {
                *until = None;
                false
            }
            None => false,
        }
    }

    fn pause_fast_path(&self) {
        *self
            .fast_path_paused_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some(std::time::Instant::now() + CROSSING_FAST_PATH_PAUSE);
    }

    /// Carries out the account's balance check: decides whether a top-up is due now and
    /// records it. Returns the new attempt, leased to this worker.
    pub async fn decide(
        &self,
        account: &str,
        fallback: Trigger,
    ) -> Result<Option<Lease>, RechargeError> {
        Ok(match self.decide_with(account, fallback, None).await? {
            Decision::TopUp(lease) => Some(*lease),
            Decision::Done | Decision::NotDone => None,
        })
    }

    /// The decision behind [`Self::decide`] and [`Self::on_crossing`].
    ///
    /// The ledger is read with no lock and no connection held; the attempt is then inserted
    /// only if the settings row is still at the revision read before (a top-up landing, a
    /// change of settings or another replica's decision bumps it), so a stale balance never
    /// decides a charge. When the row keeps changing the check stays due for the sweeper.
    ///
    /// With `crossing` (its event id), the crossing itself makes the check due: the event
    /// is marked processed in the decision's transaction, and a redelivery is `Done`.
    async fn decide_with(
        &self,
        account: &str,
        fallback: Trigger,
        crossing: Option<&str>,
    ) -> Result<Decision, RechargeError> {
        for _ in 0..DECIDE_ROUNDS {
            let Some((seen, in_flight)) = self.store.settings_for_decision(account).await? else {
                return Ok(Decision::NotDone);
            };
            if !seen.enabled {
                return Ok(Decision::NotDone);
            }
            if crossing.is_none() {
                // Every path that asks for a check first records it as due (a crossing,
                // enabling, a landed top-up, a failure's retry, the reconciler); a check
                // another replica already carried out is not done twice on a newer balance.
                if seen.due.is_none() {
                    return Ok(Decision::Done);
                }
                // R19: after a skipped top-up the check waits for the month's turn; another
                // path (a re-check racing the skip) must not skip again before then. A new
                // crossing makes the check due now and is decided as usual.
                if let Some(d) = &seen.due
                    && d.trigger == Trigger::MonthTurned.as_str()
                    && d.at.is_some_and(|at| {
                        at > chrono::Utc::now()
                            + chrono::Duration::seconds(self.cfg.clock.offset_secs() as i64)
                    })
                {
                    return Ok(Decision::Done);
                }
            }
            if in_flight {
                // That attempt makes a check due again when it ends (R9, R11).
                match crossing {
                    // Parked for the attempt's end: the credit may have brought the balance
                    // back before this crossing, and the success re-checks only when it
                    // leaves the balance below the threshold or a check was parked.
                    Some(event_id) => {
                        let mut tx = self.store.pool().begin().await?;
                        if Store::mark_processed(&mut tx, event_id).await?
                            && !Store::park_due(&mut tx, account, event_id).await?
                        {
                            // The attempt ended meanwhile: decide on what it left.
                            tx.rollback().await?;
                            continue;
                        }
                        tx.commit().await?;
                    }
                    // The check stays due, parked for the attempt's end (its success re-checks
                    // when a check is parked); a success that committed first changed the
                    // revision, and then nothing is parked: it scheduled the check itself.
                    None => {
                        let mut conn = self.store.pool().acquire().await?;
                        Store::park_due_at(&mut conn, account, seen.revision).await?;
                    }
                }
                return Ok(Decision::Done);
            }
            let acct = match crossing {
                Some(_) => tokio::time::timeout(CROSSING_LEDGER_DEADLINE, self.account(account))
                    .await
                    .map_err(|_| {
                        RechargeError::Unavailable(format!(
                            "the ledger did not answer within {} ms",
                            CROSSING_LEDGER_DEADLINE.as_millis()
                        ))
                    })??,
                None => self.account(account).await?,
            };
            let mut tx = self.store.pool().begin().await?;
            if let Some(event_id) = crossing
                && !Store::mark_processed(&mut tx, event_id).await?
            {
                tracing::debug!(event_id, account_id = account, "duplicate event ignored");
                return Ok(Decision::Done);
            }
            let Some(now) = Store::lock_settings(&mut tx, account).await? else {
                tx.commit().await?;
                return Ok(Decision::Done);
            };
            if now.revision != seen.revision {
                tx.rollback().await?;
                continue;
            }
            let Some(acct) = acct else {
                tracing::warn!(
                    account_id = account,
                    "account unknown to the ledger; nothing to top up"
                );
                Store::clear_due(&mut tx, account, seen.revision).await?;
                tx.commit().await?;
                return Ok(Decision::Done);
            };
            let balance = acct.balance;
            Store::clear_due(&mut tx, account, seen.revision).await?;
            if balance >= now.threshold {
                tx.commit().await?;
                return Ok(Decision::Done);
            }
            let (trigger, event_id) = match (crossing, &now.due) {
                (Some(e), _) => (
                    Trigger::ThresholdCrossed.as_str().to_owned(),
                    Some(e.to_owned()),
                ),
                (None, Some(d)) => (d.trigger.clone(), d.event_id.clone()),
                (None, None) => (fallback.as_str().to_owned(), None),
            };
            let due_amount = top_up_amount(now.target, balance);
            // R19: the month's allowance is read and spent under the settings row lock, so
            // two replicas cannot both spend its last dollars.
            let offset = self.cfg.clock.offset_secs();
            let charged = match now.monthly_limit {
                Some(_) => Store::charged_this_month(&mut tx, account, offset).await?,
                None => Money::default(),
            };
            let amount = match allowance(due_amount, now.monthly_limit, charged, self.min_purchase)
            {
                Allowance::Charge(a) => a,
                Allowance::Skip => {
                    let skipped = Store::insert_skipped(
                        &mut tx,
                        account,
                        &trigger,
                        event_id.as_deref(),
                        balance,
                        due_amount,
                        offset,
                    )
                    .await?;
                    let event = Event::LimitReached(LimitReached {
                        monthly_limit: now.monthly_limit.unwrap_or_default(),
                        charged_this_month: charged,
                        due_amount,
                    });
                    outbox::enqueue(&mut tx, account, &event).await?;
                    tx.commit().await?;
                    metrics::counter!("credits_recharge_attempts_skipped_total").increment(1);
                    tracing::warn!(account_id = account, attempt_id = %skipped.attempt_id, %balance, %due_amount, %charged, "monthly auto-recharge limit reached; top-up skipped until the month turns");
                    return Ok(Decision::Done);
                }
            };
            let lease = Store::insert_attempt(
                &mut tx,
                account,
                &trigger,
                event_id.as_deref(),
                balance,
                amount,
                self.cfg.lease,
                uuid::Uuid::new_v4(),
            )
            .await?;
            tx.commit().await?;
            let Some(lease) = lease else {
                return Ok(Decision::Done);
            };
            metrics::counter!("credits_recharge_attempts_total", "trigger" => trigger.clone())
                .increment(1);
            tracing::info!(account_id = account, attempt_id = %lease.attempt.attempt_id, %balance, %amount, trigger, "top-up decided");
            return Ok(Decision::TopUp(Box::new(lease)));
        }
        tracing::debug!(
            account_id = account,
            "settings kept changing; the check stays due"
        );
        Ok(Decision::NotDone)
    }

    /// Decides, and if a top-up is due, starts it in the background.
    pub async fn decide_and_start(
        self: &Arc<Self>,
        account: &str,
        fallback: Trigger,
    ) -> Result<(), RechargeError> {
        if let Some(lease) = self.decide(account, fallback).await? {
            self.spawn_run(lease);
        }
        Ok(())
    }

    /// Runs the account's due check in the background; a failure leaves it due.
    pub fn spawn_decide(self: &Arc<Self>, account: String, fallback: Trigger) {
        let me = self.clone();
        self.tasks.spawn(credits_common::trace::carried(async move {
            if let Err(e) = me.decide_and_start(&account, fallback).await {
                tracing::warn!(account_id = %account, error = %e, "balance check deferred to the sweeper");
            }
        }));
    }

    /// Carries an attempt this worker holds the lease of in the background.
    fn spawn_run(self: &Arc<Self>, lease: Lease) {
        let me = self.clone();
        self.tasks.spawn(credits_common::trace::carried(async move {
            let attempt_id = lease.attempt.attempt_id.clone();
            if let Err(e) = me.run_leased(&lease).await {
                tracing::warn!(attempt_id, error = %e, "attempt interrupted; the sweeper resumes it");
            }
        }));
    }

    /// Carries an attempt as far as it can go now.
    pub async fn execute(self: &Arc<Self>, attempt_id: &str) -> Result<(), RechargeError> {
        let Some(lease) = self.store.claim(attempt_id, self.cfg.lease).await? else {
            return Ok(()); // finished, or another worker holds it
        };
        self.run_leased(&lease).await
    }

    /// Carries an attempt whose lease this worker holds as far as it can go now.
    async fn run_leased(self: &Arc<Self>, lease: &Lease) -> Result<(), RechargeError> {
        let attempt_id = lease.attempt.attempt_id.as_str();
        match self.run_attempt(lease).await {
            Ok(Step::Done) => Ok(()),
            Ok(Step::LeaseLost) => {
                tracing::warn!(
                    attempt_id,
                    "lease lost to another worker; it carries the attempt on"
                );
                Ok(())
            }
            Ok(Step::Retry(why)) | Err(RechargeError::Unavailable(why)) => {
                let delay = self.backoff(lease.attempt.retries);
                if self.store.defer(lease, delay).await? {
                    tracing::warn!(attempt_id, retries = lease.attempt.retries + 1, delay_ms = delay.as_millis() as u64, reason = %why, "top-up deferred");
                }
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

    async fn run_attempt(self: &Arc<Self>, lease: &Lease) -> Result<Step, RechargeError> {
        let a = &lease.attempt;
        // The card: the account's default card, which payments resolves (cards only, R10)
        // when it first sees the attempt's key and keeps under it, so every resend is the
        // identical request and is answered with that same charge, never charged to a newer
        // default. An attempt from before this release may have fixed its card itself.
        let method_id = a.payment_method_id.clone().unwrap_or_default();
        let request = TopUpCharge {
            account_id: a.account_id.clone(),
            amount: a.amount,
            payment_method_id: method_id,
            idempotency_key: a.key(),
            description: format!("auto-recharge {}", a.attempt_id),
        };
        let answer = self.payments.charge(&request).await?;
        // Refused on the default: R10 says why (no default, or not a card) and turns
        // auto-recharge off; only this path asks payments for the default.
        if request.payment_method_id.is_empty()
            && matches!(
                answer,
                ChargeAnswer::Refused(_) | ChargeAnswer::MethodNotFound
            )
        {
            match method_step(self.default_method(&a.account_id).await?) {
                Err((code, reason)) => return self.fail(lease, None, code, Some(reason)).await,
                // The default became a card since payments refused (nothing is recorded
                // under the key): charge again, a few times, before the refusal stands.
                Ok(_) if a.retries < MAX_DEFAULT_RETRIES => {
                    return Ok(Step::Retry(
                        "payments refused the default, which is now a card".into(),
                    ));
                }
                Ok(_) => {}
            }
        }
        let charge_id = match charge_step(&a.attempt_id, answer, a.retries) {
            ChargeStep::Credit(charge_id) => charge_id,
            ChargeStep::Fail { charge_id, code } => {
                return self.fail(lease, charge_id.as_deref(), &code, None).await;
            }
            ChargeStep::Retry(why) => return Ok(Step::Retry(why)),
        };
        if self.faults.stop_after_charge {
            tracing::warn!(attempt_id = %a.attempt_id, "fault injected: worker stops after the charge");
            return Err(RechargeError::internal("fault injected after charge"));
        }
        // The charge's id is recorded with the outcome: a worker resuming this attempt asks
        // payments again under the same key and is answered with the same charge.
        let available = self.ledger.credit_top_up(&request, &charge_id).await?;
        let Some(recheck) = self.succeed(lease, &charge_id, available).await? else {
            return Ok(Step::LeaseLost);
        };
        // R9: usage may have outrun the top-up. The success made this check due durably;
        // doing it now only saves the sweeper's delay.
        if recheck {
            if self.faults.skip_recheck_after_success {
                tracing::warn!(attempt_id = %a.attempt_id, "fault injected: no immediate re-check after the top-up");
            } else {
                self.spawn_decide(a.account_id.clone(), Trigger::StillBelowThreshold);
            }
        }
        Ok(Step::Done)
    }

    /// Records the success with its event, and whether a balance check is now due (R9);
    /// `None` when the lease was lost first.
    async fn succeed(
        &self,
        lease: &Lease,
        charge_id: &str,
        available: Option<Money>,
    ) -> Result<Option<bool>, RechargeError> {
        let a = &lease.attempt;
        let mut tx = self.store.pool().begin().await?;
        let Some(done) = Store::finish(
            &mut tx,
            lease,
            AttemptStatus::SUCCEEDED,
            Some(charge_id),
            "",
            self.cfg.clock.offset_secs(),
        )
        .await?
        else {
            return Ok(None);
        };
        let recheck = Store::after_success(&mut tx, &a.account_id, available).await?;
        let event = Event::AttemptSucceeded(AttemptFinished {
            attempt_id: done.attempt_id.clone(),
            amount: done.amount,
            charge_id: charge_id.to_owned(),
            failure_code: String::new(),
        });
        outbox::enqueue(&mut tx, &a.account_id, &event).await?;
        tx.commit().await?;
        metrics::counter!("credits_recharge_topups_total", "status" => "SUCCEEDED").increment(1);
        // From the decision (made when the crossing or due check was taken) to the credit.
        metrics::histogram!("credits_recharge_trigger_to_credit_seconds", "trigger" => a.trigger.clone())
            .record((chrono::Utc::now() - a.created_at).num_milliseconds().max(0) as f64 / 1000.0);
        tracing::info!(account_id = %a.account_id, attempt_id = %a.attempt_id, charge_id, amount = %a.amount, "top-up succeeded");
        Ok(Some(recheck))
    }

    /// Records a failed attempt (R11): its event, the failure streak, and turning
    /// auto-recharge off on the third failure in a row or when the method rules it out.
    async fn fail(
        &self,
        lease: &Lease,
        charge_id: Option<&str>,
        code: &str,
        disable: Option<DisabledReason>,
    ) -> Result<Step, RechargeError> {
        let a = &lease.attempt;
        let mut tx = self.store.pool().begin().await?;
        if Store::finish(
            &mut tx,
            lease,
            AttemptStatus::FAILED,
            charge_id,
            code,
            self.cfg.clock.offset_secs(),
        )
        .await?
        .is_none()
        {
            return Ok(Step::LeaseLost);
        }
        let event = Event::AttemptFailed(AttemptFinished {
            attempt_id: a.attempt_id.clone(),
            amount: a.amount,
            charge_id: charge_id.unwrap_or("").to_owned(),
            failure_code: code.to_owned(),
        });
        outbox::enqueue(&mut tx, &a.account_id, &event).await?;
        let streak =
            Store::count_failure(&mut tx, &a.account_id, self.cfg.retry_after_failure).await?;
        let reason = disable
            .or((streak >= MAX_CONSECUTIVE_FAILURES).then_some(DisabledReason::REPEATED_FAILURES));
        if let Some(reason) = reason {
            disable_in_tx(&mut tx, &a.account_id, reason, None).await?;
        }
        tx.commit().await?;
        metrics::counter!("credits_recharge_topups_total", "status" => "FAILED").increment(1);
        tracing::warn!(account_id = %a.account_id, attempt_id = %a.attempt_id, failure_code = code, streak, "top-up failed");
        Ok(Step::Done)
    }

    /// Acts on a payment-method event that may rule auto-recharge out (R10): a new default
    /// that is not a card, or the default removed.
    ///
    /// Events can arrive late — after the user switched back to a card and re-enabled — so
    /// the event only says "look again": the current default is read from payments, and
    /// auto-recharge is turned off only if it still rules it out and the settings did not
    /// change meanwhile. A late event never undoes a newer choice.
    pub async fn apply_method_event(
        &self,
        account: &str,
        event_id: &str,
    ) -> Result<(), RechargeError> {
        for _ in 0..DECIDE_ROUNDS {
            let Some(seen) = self.store.settings(account).await? else {
                return Ok(());
            };
            if !seen.enabled {
                return Ok(());
            }
            let reason = match self.default_method(account).await? {
                DefaultMethod::Card(_) => {
                    tracing::info!(
                        account_id = account,
                        event_id,
                        "payment-method event is older than the card default now in place; ignored"
                    );
                    return Ok(());
                }
                DefaultMethod::NotCard => DisabledReason::DEFAULT_PAYMENT_METHOD_NOT_CARD,
                DefaultMethod::None => DisabledReason::NO_DEFAULT_PAYMENT_METHOD,
            };
            let mut tx = self.store.pool().begin().await?;
            if !Store::mark_processed(&mut tx, event_id).await? {
                return Ok(());
            }
            if disable_in_tx(&mut tx, account, reason, Some(seen.revision)).await? {
                tx.commit().await?;
                return Ok(());
            }
            tx.rollback().await?;
        }
        Err(RechargeError::Unavailable(format!(
            "settings of {account} kept changing while applying event {event_id}"
        )))
    }

    /// R26: a disputed payment turns auto-recharge off (`DISPUTED`), whatever the settings'
    /// revision: a customer whose bank claws payments back is not charged again by itself.
    /// A won dispute (`status = won`) changes nothing here.
    pub async fn apply_dispute_event(
        &self,
        account: &str,
        event_id: &str,
        status: &str,
    ) -> Result<(), RechargeError> {
        if status == "won" {
            return Ok(());
        }
        let mut tx = self.store.pool().begin().await?;
        if !Store::mark_processed(&mut tx, event_id).await? {
            return Ok(());
        }
        disable_in_tx(&mut tx, account, DisabledReason::DISPUTED, None).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Resumes attempts whose lease ran out, and carries out due balance checks, until
    /// shutdown. The two run as separate loops so that slow attempts (a slow processor)
    /// never hold up checks that are due.
    pub async fn run_sweeper(self: Arc<Self>, shutdown: CancellationToken) {
        let (sweep, reconcile) = (self.cfg.sweep_every, self.cfg.reconcile_every);
        tokio::join!(
            self.every(sweep, &shutdown, "resuming attempts", |me| async move {
                me.resume_once().await.map(|_| ())
            }),
            self.every(sweep, &shutdown, "due balance checks", |me| async move {
                me.due_checks_once().await.map(|_| ())
            }),
            self.every(
                reconcile,
                &shutdown,
                "reconciling with the ledger",
                |me| async move { me.reconcile_once().await.map(|_| ()) }
            ),
        );
    }

    async fn every<F, Fut>(
        self: &Arc<Self>,
        period: Duration,
        shutdown: &CancellationToken,
        what: &str,
        pass: F,
    ) where
        F: Fn(Arc<Self>) -> Fut,
        Fut: std::future::Future<Output = Result<(), RechargeError>>,
    {
        loop {
            if let Err(e) = pass(self.clone()).await {
                tracing::warn!(error = %e, "{what} failed; next pass retries");
            }
            tokio::select! {
                _ = tokio::time::sleep(period) => {},
                _ = shutdown.cancelled() => break,
            }
        }
    }

    /// One pass over attempts whose lease ran out; returns how many it took on.
    pub async fn resume_once(self: &Arc<Self>) -> Result<usize, RechargeError> {
        let ids = self.store.claimable(SWEEP_BATCH).await?;
        let n = ids.len();
        futures_util::stream::iter(ids)
            .for_each_concurrent(SWEEP_CONCURRENCY, |id| async move {
                if let Err(e) = self.execute(&id).await {
                    tracing::warn!(attempt_id = %id, error = %e, "resuming attempt failed");
                }
            })
            .await;
        Ok(n)
    }

    /// One pass over due balance checks; returns how many it carried out.
    pub async fn due_checks_once(self: &Arc<Self>) -> Result<usize, RechargeError> {
        let accounts = self
            .store
            .due_checks(SWEEP_BATCH, self.cfg.clock.offset_secs())
            .await?;
        let n = accounts.len();
        futures_util::stream::iter(accounts)
            .for_each_concurrent(SWEEP_CONCURRENCY, |account| async move {
                if let Err(e) = self.decide_and_start(&account, Trigger::StillBelowThreshold).await {
                    tracing::warn!(account_id = %account, error = %e, "balance check failed; it stays due");
                }
            })
            .await;
        Ok(n)
    }

    /// Compares every enabled account with the ledger and repairs what diverged:
    /// - the ledger's threshold must be the settings' threshold (a crash between
    ///   SetAutoRecharge's two writes, or a writer that lost a race, can leave it behind);
    /// - a balance below the threshold with nothing due and nothing in flight means a
    ///   crossing was lost before it reached us (e.g. the queue was deleted): a check is
    ///   made due.
    ///
    /// Returns how many accounts it repaired.
    pub async fn reconcile_once(self: &Arc<Self>) -> Result<usize, RechargeError> {
        let mut after = String::new();
        let mut repaired = 0;
        loop {
            let page = self.store.enabled_page(&after, SWEEP_BATCH).await?;
            let Some(last) = page.last() else { break };
            after = last.account_id.clone();
            for s in page {
                match self.reconcile_account(&s).await {
                    Ok(true) => repaired += 1,
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(account_id = %s.account_id, error = %e, "reconciling failed; next pass retries")
                    }
                }
            }
        }
        Ok(repaired)
    }

    async fn reconcile_account(self: &Arc<Self>, s: &Settings) -> Result<bool, RechargeError> {
        let Some(acct) = self.account(&s.account_id).await? else {
            return Ok(false);
        };
        if acct.threshold != Some(s.threshold) {
            // Claim a fresh version first: a SetAutoRecharge racing this repair then loses
            // its store (older version) and retries with a newer one than ours.
            let Some((version, threshold)) =
                self.store.bump_version(&s.account_id, s.version).await?
            else {
                return Ok(false); // the settings changed meanwhile; the next pass looks again
            };
            self.ledger
                .set_threshold(&s.account_id, Some(threshold), version)
                .await?;
            metrics::counter!("credits_recharge_reconciler_repairs_total", "what" => "threshold")
                .increment(1);
            tracing::warn!(account_id = %s.account_id, settings_threshold = %threshold, ledger_threshold = ?acct.threshold, version, "ledger threshold differed from the settings; repaired");
            return Ok(true);
        }
        let balance = acct.balance;
        // A failure streak needs no exception: a declined top-up always leaves a check due
        // (its retry delay), so `due` is empty only once that retry was carried out.
        if balance < s.threshold && s.due.is_none() {
            let mut tx = self.store.pool().begin().await?;
            let in_flight = Store::has_in_flight(&mut tx, &s.account_id).await?;
            let marked = !in_flight
                && sqlx::query_scalar!(
                    r#"SELECT (revision = $2) AS "same!" FROM settings WHERE account_id = $1 FOR UPDATE"#,
                    s.account_id,
                    s.revision
                )
                .fetch_optional(&mut *tx)
                .await?
                .unwrap_or(false)
                && Store::mark_due(&mut tx, &s.account_id, Trigger::FoundBelowThreshold, None).await?;
            tx.commit().await?;
            if marked {
                metrics::counter!("credits_recharge_reconciler_repairs_total", "what" => "missed_crossing")
                    .increment(1);
                tracing::warn!(account_id = %s.account_id, %balance, threshold = %s.threshold, "balance below the threshold with no check due or attempt in flight; a crossing was lost upstream — check made due");
                self.spawn_decide(s.account_id.clone(), Trigger::FoundBelowThreshold);
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// Turns auto-recharge off with its event; with `revision`, only if the settings are
/// still at it. True when this call turned it off.
/// Which card a new attempt charges: the default when it is a card; otherwise the failure
/// code and why auto-recharge turns off (R10).
fn method_step(method: DefaultMethod) -> Result<String, (&'static str, DisabledReason)> {
    match method {
        DefaultMethod::Card(id) => Ok(id),
        DefaultMethod::NotCard => Err((
            "default_payment_method_not_card",
            DisabledReason::DEFAULT_PAYMENT_METHOD_NOT_CARD,
        )),
        DefaultMethod::None => Err((
            "no_default_payment_method",
            DisabledReason::NO_DEFAULT_PAYMENT_METHOD,
        )),
    }
}

/// What an attempt does with payments' answer to its charge.
#[derive(Debug, PartialEq, Eq)]
enum ChargeStep {
    /// Charged: record the charge and credit the ledger.
    Credit(String),
    /// The attempt ends FAILED with this code (R11).
    Fail {
        charge_id: Option<String>,
        code: String,
    },
    /// Ask again later under the same key.
    Retry(String),
}

fn charge_step(attempt_id: &str, answer: ChargeAnswer, retries: i32) -> ChargeStep {
    let fail = |charge_id: Option<String>, code: &str| ChargeStep::Fail {
        charge_id,
        code: code.to_owned(),
    };
    match answer {
        ChargeAnswer::Succeeded { charge_id } => ChargeStep::Credit(charge_id),
        ChargeAnswer::Declined { charge_id, code } => fail(Some(charge_id), &code),
        ChargeAnswer::NotFinal { charge_id } => {
            ChargeStep::Retry(format!("charge {charge_id} is not final yet"))
        }
        ChargeAnswer::MethodNotFound => fail(None, "payment_method_not_found"),
        ChargeAnswer::Refused(why) => {
            tracing::error!(attempt_id, status = %why, "payments refused the top-up");
            fail(None, "charge_refused")
        }
        // The key is already taken by a charge that differs from what this copy of the
        // attempt asks: this copy is stale. Reload and go on from what is stored; never
        // record a failure for a charge that may exist.
        ChargeAnswer::KeyConflict(why) if retries < MAX_KEY_CONFLICTS => {
            tracing::error!(attempt_id, status = %why, "payments holds a different charge under this attempt's key; reloading");
            ChargeStep::Retry(format!("payments: {why}"))
        }
        // Reloading did not resolve it: end the attempt visibly rather than block the
        // account's auto-recharge behind it for ever.
        ChargeAnswer::KeyConflict(why) => {
            tracing::error!(attempt_id, status = %why, "idempotency conflict persists; attempt failed");
            fail(None, "idempotency_conflict")
        }
    }
}

async fn disable_in_tx(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    account: &str,
    reason: DisabledReason,
    revision: Option<i64>,
) -> Result<bool, RechargeError> {
    if !Store::disable_at(tx, account, reason, revision).await? {
        return Ok(false);
    }
    let event = Event::SettingsDisabled(SettingsDisabled {
        reason: reason.as_str().into(),
    });
    outbox::enqueue(tx, account, &event).await?;
    tracing::warn!(
        account_id = account,
        reason = reason.as_str(),
        "auto-recharge turned off"
    );
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_card_is_charged_otherwise_auto_recharge_turns_off_r10() {
        assert_eq!(
            method_step(DefaultMethod::Card("pm_1".into())),
            Ok("pm_1".into())
        );
        assert_eq!(
            method_step(DefaultMethod::NotCard),
            Err((
                "default_payment_method_not_card",
                DisabledReason::DEFAULT_PAYMENT_METHOD_NOT_CARD
            ))
        );
        assert_eq!(
            method_step(DefaultMethod::None),
            Err((
                "no_default_payment_method",
                DisabledReason::NO_DEFAULT_PAYMENT_METHOD
            ))
        );
    }

    #[test]
    fn each_charge_answer_has_one_step() {
        let fail = |charge_id: Option<&str>, code: &str| ChargeStep::Fail {
            charge_id: charge_id.map(str::to_owned),
            code: code.to_owned(),
        };
        let cases = [
            (
                ChargeAnswer::Succeeded {
                    charge_id: "ch_1".into(),
                },
                0,
                ChargeStep::Credit("ch_1".into()),
            ),
            (
                ChargeAnswer::Declined {
                    charge_id: "ch_2".into(),
                    code: "card_declined".into(),
                },
                0,
                fail(Some("ch_2"), "card_declined"),
            ),
            (
                ChargeAnswer::NotFinal {
                    charge_id: "ch_3".into(),
                },
                0,
                ChargeStep::Retry("charge ch_3 is not final yet".into()),
            ),
            (
                ChargeAnswer::MethodNotFound,
                0,
                fail(None, "payment_method_not_found"),
            ),
            (
                ChargeAnswer::Refused("no".into()),
                0,
                fail(None, "charge_refused"),
            ),
            // A stale copy of the attempt reloads a few times before it gives up visibly.
            (
                ChargeAnswer::KeyConflict("taken".into()),
                MAX_KEY_CONFLICTS - 1,
                ChargeStep::Retry("payments: taken".into()),
            ),
            (
                ChargeAnswer::KeyConflict("taken".into()),
                MAX_KEY_CONFLICTS,
                fail(None, "idempotency_conflict"),
            ),
        ];
        for (answer, retries, step) in cases {
            assert_eq!(charge_step("att_1", answer, retries), step);
        }
    }
}
