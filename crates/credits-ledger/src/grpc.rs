//! The gRPC edge of the ledger: converts wire types to domain requests (validating every
//! field, docs/api.md "Errors"), calls the store, and converts results back. The only module that knows
//! prost types.

use std::sync::Arc;

use credits_common::Money;
use credits_common::ids::paging::{next_token, page_size, page_token};
use credits_common::ids::timestamp;
use credits_proto::ledger::v1 as pb;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::access::AccessViews;
use crate::coalesce::Coalescer;
use crate::domain::*;
use crate::store::Store;
use crate::watch::{Feed, WatchEnd, WatchFailure, WatchItem};

pub const MAX_BATCH: usize = 1000;
/// `StreamUsage`: how many of one stream's items may be in the group commit at once (results
/// still come back in request order).
pub const STREAM_WINDOW: usize = 512;

pub struct LedgerGrpc {
    store: Store,
    coalescer: Coalescer,
    /// `CheckAccess` from memory; every write here drops its account before answering.
    views: AccessViews,
    /// R31: `WatchAccess` streams.
    feed: Feed,
    stream_limits: StreamLimits,
    /// R29: how long purchased credits last (`PURCHASED_CREDITS_EXPIRE_DAYS`).
    purchase_expiry: Option<chrono::Duration>,
}

/// R28: how much one `StreamUsage` call may carry before the server ends it (the client
/// opens a new one for the items that have no result): no stream holds a connection, a
/// task and its buffers forever.
#[derive(Clone, Copy, Debug)]
pub struct StreamLimits {
    pub max_items: usize,
    pub max_lifetime: std::time::Duration,
}

/// The defaults of `STREAM_USAGE_MAX_ITEMS` and `STREAM_USAGE_MAX_SECS`.
pub const STREAM_MAX_ITEMS: u64 = 1_000_000;
pub const STREAM_MAX_SECS: u64 = 3600;

impl Default for StreamLimits {
    fn default() -> Self {
        Self {
            max_items: STREAM_MAX_ITEMS as usize,
            max_lifetime: std::time::Duration::from_secs(STREAM_MAX_SECS),
        }
    }
}

impl LedgerGrpc {
    pub fn new(store: Store, coalescer: Coalescer, views: AccessViews, feed: Feed) -> Self {
        Self {
            store,
            coalescer,
            views,
            feed,
            stream_limits: StreamLimits::default(),
            purchase_expiry: None,
        }
    }

    pub fn with_purchase_expiry(mut self, days: Option<u64>) -> Self {
        self.purchase_expiry = days.map(|d| chrono::Duration::days(d as i64));
        self
    }

    pub fn with_stream_limits(mut self, limits: StreamLimits) -> Self {
        self.stream_limits = limits;
        self
    }
}

fn billing_mode_from_wire(v: i32) -> Result<BillingMode, LedgerError> {
    match pb::BillingMode::try_from(v) {
        Ok(pb::BillingMode::Unspecified | pb::BillingMode::Prepaid) => Ok(BillingMode::PREPAID),
        Ok(pb::BillingMode::Contract) => Ok(BillingMode::CONTRACT),
        Err(_) => Err(LedgerError::invalid(format!(
            "billing_mode: unknown value {v}"
        ))),
    }
}

fn billing_mode_to_wire(m: BillingMode) -> pb::BillingMode {
    match m {
        BillingMode::PREPAID => pb::BillingMode::Prepaid,
        BillingMode::CONTRACT => pb::BillingMode::Contract,
    }
}

fn access_to_wire(a: Access) -> pb::Access {
    match a {
        Access::PENDING_FIRST_PURCHASE => pb::Access::PendingFirstPurchase,
        Access::ACTIVE => pb::Access::Active,
        Access::SUSPENDED => pb::Access::Suspended,
    }
}

fn category_from_wire(v: i32) -> Result<UsageCategory, LedgerError> {
    match pb::UsageCategory::try_from(v) {
        Ok(pb::UsageCategory::ApiRequests) => Ok(UsageCategory::API_REQUESTS),
        Ok(pb::UsageCategory::DedicatedEndpoints) => Ok(UsageCategory::DEDICATED_ENDPOINTS),
        Ok(pb::UsageCategory::FineTuning) => Ok(UsageCategory::FINE_TUNING),
        Ok(pb::UsageCategory::Evaluations) => Ok(UsageCategory::EVALUATIONS),
        Ok(pb::UsageCategory::Other) => Ok(UsageCategory::OTHER),
        Ok(pb::UsageCategory::Unspecified) => Err(LedgerError::invalid(
            "category: is required (API_REQUESTS, DEDICATED_ENDPOINTS, FINE_TUNING, EVALUATIONS or OTHER)",
        )),
        Err(_) => Err(LedgerError::invalid(format!("category: unknown value {v}"))),
    }
}

fn category_to_wire(c: UsageCategory) -> pb::UsageCategory {
    match c {
        UsageCategory::API_REQUESTS => pb::UsageCategory::ApiRequests,
        UsageCategory::DEDICATED_ENDPOINTS => pb::UsageCategory::DedicatedEndpoints,
        UsageCategory::FINE_TUNING => pb::UsageCategory::FineTuning,
        UsageCategory::EVALUATIONS => pb::UsageCategory::Evaluations,
        UsageCategory::OTHER => pb::UsageCategory::Other,
    }
}

fn source_from_wire(v: i32) -> Result<CreditSource, LedgerError> {
    match pb::CreditSource::try_from(v) {
        Ok(pb::CreditSource::Purchase) => Ok(CreditSource::PURCHASE),
        Ok(pb::CreditSource::AutoRecharge) => Ok(CreditSource::AUTO_RECHARGE),
        Ok(pb::CreditSource::Grant) => Ok(CreditSource::GRANT),
        Ok(pb::CreditSource::Adjustment) => Ok(CreditSource::ADJUSTMENT),
        Ok(pb::CreditSource::Unspecified) => Err(LedgerError::invalid(
            "source: is required (PURCHASE, AUTO_RECHARGE, GRANT or ADJUSTMENT)",
        )),
        Err(_) => Err(LedgerError::invalid(format!("source: unknown value {v}"))),
    }
}

fn source_to_wire(s: CreditSource) -> pb::CreditSource {
    match s {
        CreditSource::PURCHASE => pb::CreditSource::Purchase,
        CreditSource::AUTO_RECHARGE => pb::CreditSource::AutoRecharge,
        CreditSource::GRANT => pb::CreditSource::Grant,
        CreditSource::ADJUSTMENT => pb::CreditSource::Adjustment,
    }
}

fn account_to_wire(a: Account) -> pb::Account {
    let available = a.available();
    pb::Account {
        account_id: a.account_id.as_str().to_owned(),
        billing_mode: billing_mode_to_wire(a.billing_mode) as i32,
        display_name: a.display_name,
        balance: a.balance.to_wire(),
        access: access_to_wire(a.access) as i32,
        created_at: Some(timestamp(a.created_at)),
        balance_threshold: a.threshold.map(|t| t.to_wire()).unwrap_or_default(),
        balance_threshold_version: a.threshold_version,
        held: a.held.to_wire(),
        available_balance: available.to_wire(),
        alert_thresholds: a.alert_thresholds.iter().map(|t| t.to_wire()).collect(),
        grants: a
            .lots
            .iter()
            .filter(|l| l.source == CreditSource::GRANT)
            .map(lot_to_wire)
            .collect(),
        expiring_purchases: a
            .lots
            .iter()
            .filter(|l| l.source != CreditSource::GRANT && l.expires_at.is_some())
            .map(lot_to_wire)
            .collect(),
    }
}

fn lot_to_wire(l: &Lot) -> pb::Grant {
    pb::Grant {
        grant_id: l.lot_id.to_string(),
        source: source_to_wire(l.source) as i32,
        amount: l.amount.to_wire(),
        remaining: l.remaining.to_wire(),
        expires_at: l.expires_at.map(timestamp),
        priority: l.priority,
        reason: l.reason.clone(),
        created_at: Some(timestamp(l.created_at)),
        entry_id: l.entry_id.map(|e| e.to_string()).unwrap_or_default(),
    }
}

fn granularity_from_wire(v: i32) -> Result<Granularity, LedgerError> {
    match pb::Granularity::try_from(v) {
        Ok(pb::Granularity::Unspecified | pb::Granularity::Day) => Ok(Granularity::Day),
        Ok(pb::Granularity::Hour) => Ok(Granularity::Hour),
        Err(_) => Err(LedgerError::invalid(format!(
            "granularity: unknown value {v} (DAY or HOUR)"
        ))),
    }
}

/// R29: a grant's expiry: unset, or in the future and within a century.
fn grant_expiry(
    t: Option<&prost_types::Timestamp>,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<Option<chrono::DateTime<chrono::Utc>>, LedgerError> {
    let Some(at) = credits_common::ids::timestamp_from_wire("expires_at", t)? else {
        return Ok(None);
    };
    if at <= now {
        return Err(LedgerError::invalid(format!(
            "expires_at: must be in the future (got {}); leave it unset for a grant that never expires",
            at.to_rfc3339()
        )));
    }
    if at > now + chrono::Duration::days(36_500) {
        return Err(LedgerError::invalid(
            "expires_at: at most 100 years from now; leave it unset for a grant that never expires",
        ));
    }
    Ok(Some(at))
}

fn hold_status_to_wire(s: HoldStatus) -> pb::HoldStatus {
    match s {
        HoldStatus::ACTIVE => pb::HoldStatus::Active,
        HoldStatus::CAPTURED => pb::HoldStatus::Captured,
        HoldStatus::RELEASED => pb::HoldStatus::Released,
        HoldStatus::EXPIRED => pb::HoldStatus::Expired,
    }
}

fn hold_to_wire(h: Hold) -> pb::Hold {
    pb::Hold {
        hold_id: h.hold_id.to_string(),
        account_id: h.account_id.as_str().to_owned(),
        amount: h.amount.to_wire(),
        category: category_to_wire(h.category) as i32,
        status: hold_status_to_wire(h.status) as i32,
        captured_amount: h.captured_amount.map(|c| c.to_wire()).unwrap_or_default(),
        description: h.description,
        created_at: Some(timestamp(h.created_at)),
        expires_at: Some(timestamp(h.expires_at)),
        ended_at: h.ended_at.map(timestamp),
        idempotency_key: h.idempotency_key,
        entry_id: h.entry_id.map(|e| e.to_string()).unwrap_or_default(),
    }
}

/// A hold id as the wire has it: a UUID, or INVALID_ARGUMENT naming the field.
fn hold_id(s: &str) -> Result<Uuid, LedgerError> {
    if s.is_empty() {
        return Err(LedgerError::invalid("hold_id: is required"));
    }
    Uuid::parse_str(s)
        .map_err(|_| LedgerError::invalid("hold_id: not a hold id (a UUID returned by CreateHold)"))
}

fn entry_to_wire(e: Entry) -> pb::Entry {
    let (kind, category, source) = match e.posting {
        Posting::Usage(c) => (
            pb::EntryKind::Usage,
            category_to_wire(c),
            pb::CreditSource::Unspecified,
        ),
        Posting::Credit(s) => (
            pb::EntryKind::Credit,
            pb::UsageCategory::Unspecified,
            source_to_wire(s),
        ),
        Posting::Debit(k) => (
            match k {
                EntryKind::REFUND => pb::EntryKind::Refund,
                EntryKind::DISPUTE => pb::EntryKind::Dispute,
                EntryKind::EXPIRY => pb::EntryKind::Expiry,
                EntryKind::USAGE => pb::EntryKind::Usage,
                EntryKind::CREDIT => pb::EntryKind::Credit,
            },
            pb::UsageCategory::Unspecified,
            pb::CreditSource::Unspecified,
        ),
    };
    pb::Entry {
        entry_id: e.entry_id.to_string(),
        account_id: e.account_id.as_str().to_owned(),
        kind: kind as i32,
        category: category as i32,
        source: source as i32,
        amount: e.amount.to_wire(),
        balance_after: e.balance_after.to_wire(),
        reference: e.reference,
        created_at: Some(timestamp(e.created_at)),
        description: e.description,
        idempotency_key: e.idempotency_key,
    }
}

fn threshold_version(v: i64) -> Result<i64, LedgerError> {
    if v < 0 {
        return Err(LedgerError::invalid("version: must not be negative"));
    }
    Ok(v)
}

fn usage_request(r: &pb::RecordUsageRequest) -> Result<PostingRequest, LedgerError> {
    Ok(PostingRequest {
        account_id: AccountId::parse(&r.account_id)?,
        posting: Posting::Usage(category_from_wire(r.category)?),
        amount: Money::parse_positive("amount", &r.amount)?,
        reference: String::new(),
        description: description_text("description", &r.description, 1024)?,
        idempotency_key: IdempotencyKey::parse(&r.idempotency_key)?,
        traceparent: credits_common::trace::current_header(),
        expires_at: None,
        priority: 0,
    })
}

fn usage_response(p: Posted) -> pb::RecordUsageResponse {
    pb::RecordUsageResponse {
        balance: p.balance.to_wire(),
        allowed: p.access.allows_api(),
        entry: Some(entry_to_wire(p.entry)),
    }
}

/// One item's result as `RecordUsageBatch` and `StreamUsage` answer it: the response, or its
/// error status with the message prefixed by where the item was.
fn item_result(outcome: Result<Posted, LedgerError>, at: &str) -> pb::RecordUsageBatchResult {
    let result = match outcome {
        Ok(p) => {
            record_posted(&p);
            pb::record_usage_batch_result::Result::Ok(usage_response(p))
        }
        Err(e) => {
            let status = Status::from(e);
            pb::record_usage_batch_result::Result::Error(pb::Status {
                code: status.code() as i32,
                message: format!("{at}: {}", status.message()),
            })
        }
    };
    pb::RecordUsageBatchResult {
        result: Some(result),
    }
}

fn record_posted(p: &Posted) {
    if p.replayed {
        metrics::counter!("credits_ledger_idempotent_replays_total").increment(1);
        return;
    }
    match p.entry.posting {
        Posting::Usage(c) => {
            metrics::counter!("credits_ledger_usage_entries_total", "category" => c.as_str())
                .increment(1)
        }
        Posting::Credit(s) => {
            metrics::counter!("credits_ledger_credit_entries_total", "source" => s.as_str())
                .increment(1)
        }
        Posting::Debit(k) => {
            metrics::counter!("credits_ledger_debit_entries_total", "kind" => k.as_str())
                .increment(1)
        }
    }
}

fn debit_kind_from_wire(v: i32) -> Result<EntryKind, LedgerError> {
    match pb::DebitKind::try_from(v) {
        Ok(pb::DebitKind::Refund) => Ok(EntryKind::REFUND),
        Ok(pb::DebitKind::Dispute) => Ok(EntryKind::DISPUTE),
        Ok(pb::DebitKind::Unspecified) => Err(LedgerError::invalid(
            "kind: is required (DEBIT_KIND_REFUND or DEBIT_KIND_DISPUTE)",
        )),
        Err(_) => Err(LedgerError::invalid(format!("kind: unknown value {v}"))),
    }
}

/// An `AddCredits` or `DebitCredits` request, every field checked.
fn money_request(
    account_id: &str,
    posting: Posting,
    amount: &str,
    reference: &str,
    description: &str,
    key: &str,
) -> Result<PostingRequest, LedgerError> {
    Ok(PostingRequest {
        account_id: AccountId::parse(account_id)?,
        posting,
        amount: Money::parse_positive("amount", amount)?,
        reference: bounded_text("reference", reference, 255)?,
        description: description_text("description", description, 1024)?,
        idempotency_key: IdempotencyKey::parse(key)?,
        traceparent: credits_common::trace::current_header(),
        expires_at: None,
        priority: 0,
    })
}

impl LedgerGrpc {
    /// What a credit or a debit answers; the account's cached access is dropped whatever
    /// the outcome (the posting may have committed before an error reached us).
    fn answer_money(
        &self,
        p: &PostingRequest,
        posted: Result<Posted, LedgerError>,
    ) -> Result<pb::AddCreditsResponse, LedgerError> {
        self.views.drop_account(p.account_id.as_str());
        let posted = posted?;
        record_posted(&posted);
        if !posted.replayed {
            tracing::info!(
                account_id = %p.account_id.as_str(),
                kind = p.posting.kind().as_str(),
                amount = %p.amount,
                reference = %p.reference,
                balance = %posted.balance,
                "money posted"
            );
        }
        Ok(pb::AddCreditsResponse {
            balance: posted.balance.to_wire(),
            entry: Some(entry_to_wire(posted.entry)),
            available_balance: String::new(),
        })
    }
}

#[tonic::async_trait]
impl pb::ledger_service_server::LedgerService for LedgerGrpc {
    async fn create_account(
        &self,
        req: Request<pb::CreateAccountRequest>,
    ) -> Result<Response<pb::Account>, Status> {
        let role = credits_common::auth::caller_role(&req);
        let r = req.into_inner();
        let new = NewAccount {
            account_id: AccountId::parse(&r.account_id)?,
            billing_mode: billing_mode_from_wire(r.billing_mode)?,
            display_name: credits_common::ids::display_text("display_name", &r.display_name, 200)?,
        };
        // R28: a CONTRACT account may go below zero without limit: only the platform
        // itself (an internal token) opens one, never the billing side.
        if new.billing_mode == BillingMode::CONTRACT && role != credits_common::auth::Role::Internal
        {
            return Err(Status::permission_denied(format!(
                "billing_mode: CONTRACT accounts are opened with an internal token only (this caller's role is {})",
                role.as_str()
            )));
        }
        let account = self.store.create_account(&new).await?;
        tracing::info!(account_id = %account.account_id.as_str(), billing_mode = account.billing_mode.as_str(), "account created");
        Ok(Response::new(account_to_wire(account)))
    }

    async fn get_account(
        &self,
        req: Request<pb::GetAccountRequest>,
    ) -> Result<Response<pb::Account>, Status> {
        let id = AccountId::parse(&req.into_inner().account_id)?;
        Ok(Response::new(account_to_wire(
            self.store.get_account(&id).await?,
        )))
    }

    async fn check_access(
        &self,
        req: Request<pb::CheckAccessRequest>,
    ) -> Result<Response<pb::CheckAccessResponse>, Status> {
        let r = req.into_inner();
        let id = AccountId::parse(&r.account_id)?;
        let cost = match r.amount.as_str() {
            "" => None,
            a => Some(Money::parse_positive("amount", a).map_err(LedgerError::from)?),
        };
        let view = self.views.get(&self.store, &id).await?;
        Ok(Response::new(pb::CheckAccessResponse {
            allowed: view.allows(cost),
            access: access_to_wire(view.access) as i32,
            balance: view.balance.to_wire(),
            held: view.held.to_wire(),
            available_balance: view.available().to_wire(),
        }))
    }

    async fn record_usage(
        &self,
        req: Request<pb::RecordUsageRequest>,
    ) -> Result<Response<pb::RecordUsageResponse>, Status> {
        let posting = usage_request(req.get_ref())?;
        let account = posting.account_id.clone();
        let posted = self.coalescer.post(posting).await;
        self.views.drop_account(account.as_str());
        let posted = posted?;
        record_posted(&posted);
        Ok(Response::new(usage_response(posted)))
    }

    async fn record_usage_batch(
        &self,
        req: Request<pb::RecordUsageBatchRequest>,
    ) -> Result<Response<pb::RecordUsageBatchResponse>, Status> {
        let items = req.into_inner().items;
        if items.len() > MAX_BATCH {
            return Err(
                LedgerError::invalid(format!("items: at most {MAX_BATCH} per batch")).into(),
            );
        }
        // Items that fail validation get their error in place; the rest go to the database
        // in one statement.
        let parsed: Vec<Result<PostingRequest, LedgerError>> =
            items.iter().map(usage_request).collect();
        let valid: Vec<PostingRequest> = parsed
            .iter()
            .filter_map(|p| p.as_ref().ok().cloned())
            .collect();
        let mut posted = self.store.post_batch_isolated(&valid).await.into_iter();
        for v in &valid {
            self.views.drop_account(v.account_id.as_str());
        }
        let results = parsed
            .into_iter()
            .enumerate()
            .map(|(i, p)| {
                let outcome = match p {
                    Ok(_) => posted.next().unwrap_or_else(|| {
                        Err(LedgerError::Internal("missing batch result".into()))
                    }),
                    Err(e) => Err(e),
                };
                item_result(outcome, &format!("items[{i}]"))
            })
            .collect();
        Ok(Response::new(pb::RecordUsageBatchResponse { results }))
    }

    async fn add_credits(
        &self,
        req: Request<pb::AddCreditsRequest>,
    ) -> Result<Response<pb::AddCreditsResponse>, Status> {
        let r = req.into_inner();
        let source = source_from_wire(r.source)?;
        let mut p = money_request(
            &r.account_id,
            Posting::Credit(source),
            &r.amount,
            &r.reference,
            &r.description,
            &r.idempotency_key,
        )?;
        // R29: purchased credits last PURCHASED_CREDITS_EXPIRE_DAYS when it is set.
        if matches!(source, CreditSource::PURCHASE | CreditSource::AUTO_RECHARGE) {
            p.expires_at = self.purchase_expiry.map(|d| chrono::Utc::now() + d);
        }
        let posted = self.store.post(&p).await;
        let mut answer = self.answer_money(&p, posted)?;
        if source == CreditSource::AUTO_RECHARGE {
            // Read after the credit, so usage after it counts too; a failed read leaves the
            // field empty and recharge checks the balance itself.
            if let Ok(view) = self.store.access(&p.account_id).await {
                answer.available_balance = view.available().to_wire();
            }
        }
        Ok(Response::new(answer))
    }

    async fn grant_credits(
        &self,
        req: Request<pb::GrantCreditsRequest>,
    ) -> Result<Response<pb::AddCreditsResponse>, Status> {
        let r = req.into_inner();
        if r.reason.trim().is_empty() {
            return Err(LedgerError::invalid(
                "reason: is required (what the customer sees beside the grant)",
            )
            .into());
        }
        let reason = credits_common::ids::display_text("reason", &r.reason, 200)?;
        if !(0..=MAX_GRANT_PRIORITY).contains(&r.priority) {
            return Err(LedgerError::invalid(format!(
                "priority: must be between 0 and {MAX_GRANT_PRIORITY} (lower is drawn first); got {}",
                r.priority
            ))
            .into());
        }
        let mut p = money_request(
            &r.account_id,
            Posting::Credit(CreditSource::GRANT),
            &r.amount,
            "",
            &reason,
            &r.idempotency_key,
        )?;
        p.expires_at = match grant_expiry(r.expires_at.as_ref(), chrono::Utc::now()) {
            Ok(at) => at,
            // A repeat of a grant whose expiry has passed since is answered as the first
            // (or refused as a conflict) like any repeat: only a new grant must expire in
            // the future.
            Err(e)
                if self
                    .store
                    .key_used(&p.account_id, &p.idempotency_key)
                    .await? =>
            {
                tracing::debug!(error = %e, "repeated grant past its expiry");
                credits_common::ids::timestamp_from_wire("expires_at", r.expires_at.as_ref())?
            }
            Err(e) => return Err(e.into()),
        };
        p.priority = r.priority;
        let posted = self.store.post(&p).await;
        Ok(Response::new(self.answer_money(&p, posted)?))
    }

    async fn get_usage_summary(
        &self,
        req: Request<pb::GetUsageSummaryRequest>,
    ) -> Result<Response<pb::GetUsageSummaryResponse>, Status> {
        let r = req.into_inner();
        let id = AccountId::parse(&r.account_id)?;
        let required = |name: &str, t: Option<&prost_types::Timestamp>| {
            credits_common::ids::timestamp_from_wire(name, t)?
                .ok_or_else(|| LedgerError::invalid(format!("{name}: is required")))
        };
        let range = SummaryRange::new(
            required("from", r.from.as_ref())?,
            required("to", r.to.as_ref())?,
            granularity_from_wire(r.granularity)?,
        )?;
        let periods = self.store.usage_summary(&id, &range).await?;
        Ok(Response::new(pb::GetUsageSummaryResponse {
            periods: periods
                .into_iter()
                .map(|p| pb::UsagePeriod {
                    start: Some(timestamp(p.start)),
                    category: category_to_wire(p.category) as i32,
                    amount: p.amount.to_wire(),
                    count: p.count,
                })
                .collect(),
        }))
    }

    async fn debit_credits(
        &self,
        req: Request<pb::DebitCreditsRequest>,
    ) -> Result<Response<pb::AddCreditsResponse>, Status> {
        let r = req.into_inner();
        let posting = Posting::Debit(debit_kind_from_wire(r.kind)?);
        let p = money_request(
            &r.account_id,
            posting,
            &r.amount,
            &r.reference,
            &r.description,
            &r.idempotency_key,
        )?;
        let posted = if r.require_available {
            self.store.post_covered_debit(&p).await
        } else {
            self.store.post(&p).await
        };
        Ok(Response::new(self.answer_money(&p, posted)?))
    }

    async fn list_entries(
        &self,
        req: Request<pb::ListEntriesRequest>,
    ) -> Result<Response<pb::ListEntriesResponse>, Status> {
        let r = req.into_inner();
        let id = AccountId::parse(&r.account_id)?;
        let limit = page_size(r.page_size)?;
        let before = page_token(&r.page_token)?;
        let entries = self.store.list_entries(&id, before, limit).await?;
        let next_page_token = next_token(entries.len(), limit, entries.last().map(|e| e.seq));
        Ok(Response::new(pb::ListEntriesResponse {
            entries: entries.into_iter().map(entry_to_wire).collect(),
            next_page_token,
        }))
    }

    async fn set_balance_threshold(
        &self,
        req: Request<pb::SetBalanceThresholdRequest>,
    ) -> Result<Response<pb::BalanceThreshold>, Status> {
        let r = req.into_inner();
        let id = AccountId::parse(&r.account_id)?;
        let threshold =
            Money::parse_non_negative("threshold", &r.threshold).map_err(LedgerError::from)?;
        let stored = self
            .store
            .set_threshold(&id, Some(threshold), threshold_version(r.version)?)
            .await?;
        Ok(Response::new(pb::BalanceThreshold {
            account_id: r.account_id,
            threshold: stored.threshold.map(|t| t.to_wire()).unwrap_or_default(),
            version: stored.version,
        }))
    }

    async fn clear_balance_threshold(
        &self,
        req: Request<pb::ClearBalanceThresholdRequest>,
    ) -> Result<Response<pb::ClearBalanceThresholdResponse>, Status> {
        let r = req.into_inner();
        let id = AccountId::parse(&r.account_id)?;
        let stored = self
            .store
            .set_threshold(&id, None, threshold_version(r.version)?)
            .await?;
        Ok(Response::new(pb::ClearBalanceThresholdResponse {
            threshold: stored.threshold.map(|t| t.to_wire()).unwrap_or_default(),
            version: stored.version,
        }))
    }

    async fn create_hold(
        &self,
        req: Request<pb::CreateHoldRequest>,
    ) -> Result<Response<pb::Hold>, Status> {
        let r = req.into_inner();
        let new = NewHold {
            account_id: AccountId::parse(&r.account_id)?,
            amount: Money::parse_positive("amount", &r.amount).map_err(LedgerError::from)?,
            category: category_from_wire(r.category)?,
            description: description_text("description", &r.description, 1024)?,
            idempotency_key: IdempotencyKey::parse(&r.idempotency_key)?,
            ttl_seconds: NewHold::ttl(r.ttl_seconds)?,
        };
        let created = self.store.create_hold(&new).await;
        self.views.drop_account(new.account_id.as_str());
        let (hold, replayed) = created?;
        if replayed {
            metrics::counter!("credits_ledger_idempotent_replays_total").increment(1);
        } else {
            metrics::counter!("credits_ledger_holds_total", "ending" => "created").increment(1);
            tracing::info!(account_id = %new.account_id.as_str(), hold_id = %hold.hold_id, amount = %hold.amount, "hold created");
        }
        Ok(Response::new(hold_to_wire(hold)))
    }

    async fn capture_hold(
        &self,
        req: Request<pb::CaptureHoldRequest>,
    ) -> Result<Response<pb::CaptureHoldResponse>, Status> {
        let r = req.into_inner();
        let account = AccountId::parse(&r.account_id)?;
        let id = hold_id(&r.hold_id)?;
        let ending = HoldEnding::Capture {
            amount: Money::parse_positive("amount", &r.amount).map_err(LedgerError::from)?,
            description: description_text("description", &r.description, 1024)?,
        };
        let ended = self.store.end_hold(&account, id, &ending).await;
        self.views.drop_account(account.as_str());
        let ended = ended?;
        metrics::counter!("credits_ledger_holds_total", "ending" => "captured").increment(1);
        Ok(Response::new(pb::CaptureHoldResponse {
            hold: Some(hold_to_wire(ended.hold)),
            entry: ended.entry.map(entry_to_wire),
            balance: ended.balance.to_wire(),
            available_balance: ended.available.to_wire(),
        }))
    }

    async fn release_hold(
        &self,
        req: Request<pb::ReleaseHoldRequest>,
    ) -> Result<Response<pb::Hold>, Status> {
        let r = req.into_inner();
        let account = AccountId::parse(&r.account_id)?;
        let id = hold_id(&r.hold_id)?;
        let ended = self
            .store
            .end_hold(&account, id, &HoldEnding::Release)
            .await;
        self.views.drop_account(account.as_str());
        let ended = ended?;
        metrics::counter!("credits_ledger_holds_total", "ending" => "released").increment(1);
        Ok(Response::new(hold_to_wire(ended.hold)))
    }

    async fn get_hold(
        &self,
        req: Request<pb::GetHoldRequest>,
    ) -> Result<Response<pb::Hold>, Status> {
        let r = req.into_inner();
        let account = AccountId::parse(&r.account_id)?;
        let id = hold_id(&r.hold_id)?;
        Ok(Response::new(hold_to_wire(
            self.store.get_hold(&account, id).await?,
        )))
    }

    async fn list_holds(
        &self,
        req: Request<pb::ListHoldsRequest>,
    ) -> Result<Response<pb::ListHoldsResponse>, Status> {
        let r = req.into_inner();
        let id = AccountId::parse(&r.account_id)?;
        let limit = page_size(r.page_size)?;
        let before = page_token(&r.page_token)?;
        let holds = self.store.list_holds(&id, before, limit).await?;
        let next_page_token = next_token(holds.len(), limit, holds.last().map(|h| h.seq));
        Ok(Response::new(pb::ListHoldsResponse {
            holds: holds.into_iter().map(hold_to_wire).collect(),
            next_page_token,
        }))
    }

    async fn set_balance_alerts(
        &self,
        req: Request<pb::SetBalanceAlertsRequest>,
    ) -> Result<Response<pb::BalanceAlerts>, Status> {
        let r = req.into_inner();
        let id = AccountId::parse(&r.account_id)?;
        let thresholds = alert_thresholds(&r.thresholds)?;
        let stored = self.store.set_alerts(&id, &thresholds).await?;
        tracing::info!(account_id = %id.as_str(), alerts = stored.len(), "balance alerts set");
        Ok(Response::new(pb::BalanceAlerts {
            account_id: r.account_id,
            thresholds: stored.iter().map(|t| t.to_wire()).collect(),
        }))
    }

    type StreamUsageStream = std::pin::Pin<
        Box<
            dyn futures_util::Stream<Item = Result<pb::RecordUsageBatchResult, Status>>
                + Send
                + 'static,
        >,
    >;

    async fn stream_usage(
        &self,
        req: Request<tonic::Streaming<pb::RecordUsageRequest>>,
    ) -> Result<Response<Self::StreamUsageStream>, Status> {
        use futures_util::StreamExt;
        use std::sync::atomic::{AtomicUsize, Ordering};
        let coalescer = self.coalescer.clone();
        let views = self.views.clone();
        // Items are read after this handler returned, outside the call's trace scope.
        let traceparent = credits_common::trace::current_header();
        let limits = self.stream_limits;
        let deadline = tokio::time::Instant::now() + limits.max_lifetime;
        let read = Arc::new(AtomicUsize::new(0));
        let taken = read.clone();
        // Whether the client ended the stream itself (then no limit cut it).
        let ended = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let ended_by_client = ended.clone();
        let results = req
            .into_inner()
            .map(Some)
            .chain(futures_util::stream::once(async { None }))
            .take_until(tokio::time::sleep_until(deadline))
            // Up to the limit; the client's own end (the `None` after its last item) is
            // noted, so a stream ended at exactly the limit is not reported cut.
            .scan((), move |(), x| {
                let next = match x {
                    None => {
                        ended_by_client.store(true, Ordering::Relaxed);
                        None
                    }
                    Some(_) if taken.load(Ordering::Relaxed) >= limits.max_items => None,
                    Some(item) => {
                        taken.fetch_add(1, Ordering::Relaxed);
                        Some(item)
                    }
                };
                futures_util::future::ready(next)
            })
            .enumerate()
            .map(move |(i, item)| {
                let (coalescer, views) = (coalescer.clone(), views.clone());
                let traceparent = traceparent.clone();
                async move {
                    // A broken stream (transport, undecodable message) ends it; a bad item
                    // is that item's result.
                    let r = item?;
                    let outcome = match usage_request(&r) {
                        Ok(mut posting) => {
                            posting.traceparent = traceparent;
                            let account = posting.account_id.clone();
                            let posted = coalescer.post(posting).await;
                            views.drop_account(account.as_str());
                            posted
                        }
                        Err(e) => Err(e),
                    };
                    Ok(item_result(outcome, &format!("stream[{i}]")))
                }
            })
            .buffered(STREAM_WINDOW);
        // Cut by a limit (not ended by the client): said after the last result, so the
        // client knows to send what has no result on a new stream.
        let cut = futures_util::stream::once(async move {
            let n = read.load(Ordering::Relaxed);
            (!ended.load(Ordering::Relaxed)).then(|| {
                Err(Status::unavailable(format!(
                    "StreamUsage: this stream reached its limit ({} items or {} s) after {n} items; open a new stream and send the items that have no result",
                    limits.max_items,
                    limits.max_lifetime.as_secs()
                )))
            })
        })
        .filter_map(|x| async move { x });
        Ok(Response::new(Box::pin(results.chain(cut))))
    }

    type WatchAccessStream = std::pin::Pin<
        Box<dyn futures_util::Stream<Item = Result<pb::AccessUpdate, Status>> + Send + 'static>,
    >;

    async fn watch_access(
        &self,
        req: Request<pb::WatchAccessRequest>,
    ) -> Result<Response<Self::WatchAccessStream>, Status> {
        use futures_util::StreamExt;
        let r = req.into_inner();
        let accounts = watched_accounts(&r.account_ids)?;
        let since = match r.resume_cursor.as_str() {
            "" => None,
            c => Some(FeedCursor::parse(c)?),
        };
        let rx = self.feed.watch(accounts, since).map_err(watch_status)?;
        let updates = tokio_stream::wrappers::ReceiverStream::new(rx).map(|item| match item {
            Ok(WatchItem::Change(c)) => Ok(access_update(&c)),
            Ok(WatchItem::Sync(cursor)) => Ok(pb::AccessUpdate {
                cursor,
                ..Default::default()
            }),
            Err(f) => Err(watch_status(f)),
        });
        Ok(Response::new(Box::pin(updates)))
    }
}

/// R31: at most this many ids in one `WatchAccess` request.
pub const MAX_WATCHED: usize = 10_000;

/// `WatchAccess`'s `account_ids`: empty for all; else each a valid id, at most
/// `MAX_WATCHED` (repeats are one).
fn watched_accounts(
    ids: &[String],
) -> Result<Option<std::collections::HashSet<String>>, LedgerError> {
    if ids.is_empty() {
        return Ok(None);
    }
    if ids.len() > MAX_WATCHED {
        return Err(LedgerError::invalid(format!(
            "account_ids: at most {MAX_WATCHED} (empty watches every account); got {}",
            ids.len()
        )));
    }
    let mut set = std::collections::HashSet::with_capacity(ids.len());
    for (i, id) in ids.iter().enumerate() {
        let id = AccountId::parse(id)
            .map_err(|e| LedgerError::invalid(format!("account_ids[{i}]: {e}")))?;
        set.insert(id.as_str().to_owned());
    }
    Ok(Some(set))
}

fn access_update(c: &AccessChange) -> pb::AccessUpdate {
    pb::AccessUpdate {
        account_id: c.account_id.clone(),
        access: access_to_wire(c.view.access) as i32,
        balance: c.view.balance.to_wire(),
        available_balance: c.view.available().to_wire(),
        seq: c.view.version.max(0) as u64,
        held: c.view.held.to_wire(),
        billing_mode: billing_mode_to_wire(c.view.billing_mode) as i32,
        changed_at: Some(timestamp(c.at)),
        cursor: String::new(),
    }
}

fn watch_status(f: WatchFailure) -> Status {
    match f {
        WatchFailure::TooMany(n) => Status::resource_exhausted(format!(
            "WatchAccess: this ledger replica already serves {n} streams (WATCH_ACCESS_MAX_STREAMS); share one stream per process, or try another replica"
        )),
        WatchFailure::Ledger(e) => e.into(),
        WatchFailure::Ended(end) => Status::unavailable(match end {
            WatchEnd::Lagged => {
                "WatchAccess: this stream fell too far behind the changes; resume with the last cursor"
            }
            WatchEnd::Reset => {
                "WatchAccess: the ledger lost its access feed for longer than its retention; resume (a fresh snapshot follows)"
            }
            WatchEnd::Lifetime => {
                "WatchAccess: this stream reached its lifetime (WATCH_ACCESS_MAX_SECS); resume with the last cursor"
            }
            WatchEnd::Stopping => {
                "WatchAccess: the ledger is stopping; resume with the last cursor on another replica"
            }
        }),
    }
}
