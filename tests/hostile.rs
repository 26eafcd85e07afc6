//! Hostile clients (docs/api.md "Errors", R21, R22): a seeded, replayable stream of generated requests
//! to every RPC of the three services, against a whole in-process system (ledger +
//! payments + recharge) that also carries real money (a purchase, a card, auto-recharge).
//!
//! What it proves:
//! - (a) no request ever gets `INTERNAL` or `UNKNOWN` — not as the RPC's status, not as a
//!   batch item's status (§4: bad input is `INVALID_ARGUMENT`, never a 500);
//! - a request built with exactly one known-bad field is refused, with the status §4 names
//!   and, for malformed input, the field named; a batch answers per item (R21);
//! - (b) a refused request changes no row (§4 "nothing is half-applied"): every few hundred
//!   requests the system is let go quiet, then a run of only known-invalid requests is
//!   sent with a snapshot (row count + digest of every table of the three databases) taken
//!   before and after each one;
//! - (c) no daemon task ended and every daemon still reports SERVING;
//! - (d) every account's balance equals the sum of its journal.
//!
//! Every offence is collected (kind of request, its fields, the answer) and the test fails
//! once, with the whole list grouped, at the end. The seed is printed first: set
//! `HOSTILE_SEED=<n>` to replay a run, `HOSTILE_REQUESTS=<n>` to change its length.
//!
//! Two focused tests pin the group-commit isolation of R21 (one caller's NUL never fails
//! another caller) and the amount spelling of R22 on the real money paths.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use credits_proto::ledger::v1 as lpb;
use credits_proto::ledger::v1::ledger_service_client::LedgerServiceClient;
use credits_proto::payments::v1 as ppb;
use credits_proto::payments::v1::payments_service_client::PaymentsServiceClient;
use credits_proto::recharge::v1 as rpb;
use credits_proto::recharge::v1::auto_recharge_service_client::AutoRechargeServiceClient;
use credits_tests::raw::{self, usage};
use credits_tests::{Ledger, System, queue_depth};
use rust_decimal::Decimal;
use sqlx::PgConnection;
use tonic::Code;
use tonic::transport::Channel;

const DEFAULT_SEED: u64 = 0x00C0_FFEE_5EED;
const DEFAULT_REQUESTS: usize = 3000;
const ROUNDS: usize = 12;
/// Share of each round sent as a run of only known-invalid requests (check (b)).
const INVALID_SHARE_PERCENT: usize = 20;
const CALL_TIMEOUT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------------
// A small deterministic PRNG (splitmix64): the same seed gives the same decisions.

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn percent(&mut self, p: u64) -> bool {
        self.next() % 100 < p
    }

    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }
}

// ---------------------------------------------------------------------------------------
// What a generated value (and so a request) is known to be.

/// `Valid`: well-formed (a rule may still refuse it). `Odd`: the rules leave the answer
/// open (" 5", ".5", a garbage page token, a reused key…). `Bad`: the rules say refuse.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Class {
    Valid,
    Odd,
    Bad,
}

/// What a `Bad` value must be answered with.
#[derive(Clone, Debug)]
struct Expect {
    /// Acceptable status codes.
    codes: Vec<Code>,
    /// For malformed input: a word the message must contain (§4 "with the field named").
    field: Option<&'static str>,
    /// What is wrong with the input, for the report.
    why: String,
}

fn invalid(field: &'static str) -> Expect {
    Expect {
        codes: vec![Code::InvalidArgument],
        field: Some(field),
        why: String::new(),
    }
}

fn not_found() -> Expect {
    Expect {
        codes: vec![Code::NotFound],
        field: None,
        why: String::new(),
    }
}

fn refused_by_rule() -> Expect {
    Expect {
        codes: vec![Code::InvalidArgument, Code::FailedPrecondition],
        field: None,
        why: String::new(),
    }
}

struct F<T> {
    v: T,
    class: Class,
    expect: Option<Expect>,
}

fn ok<T>(v: T) -> F<T> {
    F {
        v,
        class: Class::Valid,
        expect: None,
    }
}

fn odd<T>(v: T) -> F<T> {
    F {
        v,
        class: Class::Odd,
        expect: None,
    }
}

fn bad<T: std::fmt::Debug>(v: T, mut e: Expect) -> F<T> {
    let value: String = abbreviate(&format!("{v:?}")).chars().take(100).collect();
    e.why = match e.field {
        Some(f) => format!("{f}={value}"),
        None => value,
    };
    F {
        v,
        class: Class::Bad,
        expect: Some(e),
    }
}

/// What a field generator is asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Want {
    Valid,
    Odd,
    Bad,
}

/// How a whole request is built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Every field well-formed.
    Valid,
    /// Exactly one field known-bad, all others well-formed: the answer is predictable.
    OneBad,
    /// Every field drawn from everything.
    Chaos,
}

// ---------------------------------------------------------------------------------------
// Requests.

#[derive(Clone, Debug)]
enum Req {
    CreateAccount(lpb::CreateAccountRequest),
    GetAccount(lpb::GetAccountRequest),
    CheckAccess(lpb::CheckAccessRequest),
    RecordUsage(lpb::RecordUsageRequest),
    RecordUsageBatch(lpb::RecordUsageBatchRequest),
    AddCredits(lpb::AddCreditsRequest),
    ListEntries(lpb::ListEntriesRequest),
    SetBalanceThreshold(lpb::SetBalanceThresholdRequest),
    ClearBalanceThreshold(lpb::ClearBalanceThresholdRequest),
    AddPaymentMethod(ppb::AddPaymentMethodRequest),
    ListPaymentMethods(ppb::ListPaymentMethodsRequest),
    SetDefaultPaymentMethod(ppb::SetDefaultPaymentMethodRequest),
    RemovePaymentMethod(ppb::RemovePaymentMethodRequest),
    Charge(ppb::ChargeRequest),
    PurchaseCredits(ppb::PurchaseCreditsRequest),
    ListCharges(ppb::ListChargesRequest),
    GetCharge(ppb::GetChargeRequest),
    GetAutoRecharge(rpb::GetAutoRechargeRequest),
    SetAutoRecharge(rpb::SetAutoRechargeRequest),
    ListRechargeAttempts(rpb::ListRechargeAttemptsRequest),
    CreateHold(lpb::CreateHoldRequest),
    CaptureHold(lpb::CaptureHoldRequest),
    GrantCredits(lpb::GrantCreditsRequest),
    GetUsageSummary(lpb::GetUsageSummaryRequest),
    WatchAccess(lpb::WatchAccessRequest),
}

const KINDS: usize = 25;

impl Req {
    fn rpc(&self) -> &'static str {
        match self {
            Req::CreateAccount(_) => "ledger.CreateAccount",
            Req::GetAccount(_) => "ledger.GetAccount",
            Req::CheckAccess(_) => "ledger.CheckAccess",
            Req::RecordUsage(_) => "ledger.RecordUsage",
            Req::RecordUsageBatch(_) => "ledger.RecordUsageBatch",
            Req::AddCredits(_) => "ledger.AddCredits",
            Req::ListEntries(_) => "ledger.ListEntries",
            Req::SetBalanceThreshold(_) => "ledger.SetBalanceThreshold",
            Req::ClearBalanceThreshold(_) => "ledger.ClearBalanceThreshold",
            Req::AddPaymentMethod(_) => "payments.AddPaymentMethod",
            Req::ListPaymentMethods(_) => "payments.ListPaymentMethods",
            Req::SetDefaultPaymentMethod(_) => "payments.SetDefaultPaymentMethod",
            Req::RemovePaymentMethod(_) => "payments.RemovePaymentMethod",
            Req::Charge(_) => "payments.Charge",
            Req::PurchaseCredits(_) => "payments.PurchaseCredits",
            Req::ListCharges(_) => "payments.ListCharges",
            Req::GetCharge(_) => "payments.GetCharge",
            Req::GetAutoRecharge(_) => "recharge.GetAutoRecharge",
            Req::SetAutoRecharge(_) => "recharge.SetAutoRecharge",
            Req::ListRechargeAttempts(_) => "recharge.ListRechargeAttempts",
            Req::CreateHold(_) => "ledger.CreateHold",
            Req::CaptureHold(_) => "ledger.CaptureHold",
            Req::GrantCredits(_) => "ledger.GrantCredits",
            Req::GetUsageSummary(_) => "ledger.GetUsageSummary",
            Req::WatchAccess(_) => "ledger.WatchAccess",
        }
    }
}

/// A generated request with what is known about it.
struct Gen {
    req: Req,
    class: Class,
    /// For a `Bad` request: how it must be refused; `None` = any error will do.
    expect: Option<Expect>,
    /// RecordUsageBatch only: the same, per item.
    items: Vec<(Class, Option<Expect>)>,
    /// What is wrong with each bad field, for the report.
    whys: Vec<String>,
}

fn whys(fields: &[(Class, Option<Expect>)]) -> Vec<String> {
    fields
        .iter()
        .filter(|f| f.0 == Class::Bad)
        .filter_map(|f| f.1.as_ref().map(|e| e.why.clone()))
        .collect()
}

/// Combines the fields' verdicts: `Bad` if any field is; the expectation is exact only
/// when one field is bad and all others are well-formed.
fn verdict(fields: &[(Class, Option<Expect>)]) -> (Class, Option<Expect>) {
    let class = fields.iter().map(|f| f.0).max().unwrap_or(Class::Valid);
    let bads: Vec<_> = fields.iter().filter(|f| f.0 == Class::Bad).collect();
    let expect =
        if class == Class::Bad && bads.len() == 1 && !fields.iter().any(|f| f.0 == Class::Odd) {
            bads[0].1.clone()
        } else {
            None
        };
    (class, expect)
}

macro_rules! fields {
    ($($f:expr),* $(,)?) => { vec![$(($f.class, $f.expect.clone())),*] };
}

// ---------------------------------------------------------------------------------------
// Text fields (R21).

struct TextSpec {
    name: &'static str,
    /// The length limit, in characters (today's limits: description 1024, display_name
    /// and holder_name 200, reference and idempotency_key 255).
    max: usize,
    /// Tab, newline and carriage return are allowed (in `description` only).
    ws_ok: bool,
    required: bool,
    /// Display text (R28): no bidirectional control or zero-width character.
    display: bool,
}

const DESCRIPTION: TextSpec = TextSpec {
    name: "description",
    max: 1024,
    ws_ok: true,
    required: false,
    display: true,
};
/// R29: a grant's reason (required display text).
const REASON: TextSpec = TextSpec {
    name: "reason",
    max: 200,
    ws_ok: false,
    required: true,
    display: true,
};
const DISPLAY_NAME: TextSpec = TextSpec {
    name: "display_name",
    max: 200,
    ws_ok: false,
    required: false,
    display: true,
};
const REFERENCE: TextSpec = TextSpec {
    name: "reference",
    max: 255,
    ws_ok: false,
    required: false,
    display: false,
};
const HOLDER_NAME: TextSpec = TextSpec {
    name: "holder_name",
    max: 200,
    ws_ok: false,
    required: true,
    display: true,
};
const KEY_MAX: usize = 255;

/// R21 (and R28 for display text) as a function.
fn text_class(spec: &TextSpec, s: &str) -> Class {
    let control = s.chars().any(|c| {
        (c.is_control() && !(spec.ws_ok && matches!(c, '\t' | '\n' | '\r')))
            || (spec.display && credits_common::ids::is_invisible_format(c))
    });
    if control || s.chars().count() > spec.max || (spec.required && s.trim().is_empty()) {
        Class::Bad
    } else {
        Class::Valid
    }
}

fn text_candidates(spec: &TextSpec) -> Vec<String> {
    let mut v: Vec<String> = [
        "",
        "chat completions",
        "Acme Inc.",
        "  padded  ",
        "naïve café — 日本語 — Ελληνικά — עברית — हिन्दी",
        "😀🚀🔥 emoji 👩‍👩‍👧‍👦 🇺🇸",
        "'; DROP TABLE entries; --",
        "Robert'); DROP TABLE accounts;--",
        "\u{200b}zero\u{200d}width\u{feff}",
        "\u{202e}override\u{202c}",
        "\u{fffd}\u{ffff}\u{fdd0}\u{10ffff}",
        "%s%n%x{}{0}$1\\\\\"",
        "tab\tseparated",
        "line\nbreak",
        "carriage\rreturn",
        "crlf\r\n",
        "nul\0byte",
        "\0",
        "ctl\u{1}",
        "del\u{7f}",
        "esc\u{1b}[31mred",
        "c1\u{85}nel",
        "bell\u{7}",
        "\u{8}backspace",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    v.push("x".repeat(300));
    v.push("é".repeat(300));
    v.push("😀".repeat(300));
    v.push("a".repeat(spec.max));
    v.push("a".repeat(spec.max + 1));
    v.push("x".repeat(5000));
    v.push("y".repeat(70_000));
    v.push("ü".repeat(70_000));
    v
}

// ---------------------------------------------------------------------------------------
// The generator: a seeded PRNG plus what the run has learned (accounts, methods, charges,
// keys, page tokens), so that valid requests hit real rows.

struct World {
    rng: Rng,
    n: u64,
    core: Vec<String>,
    accounts: Vec<String>,
    methods: Vec<(String, String)>,
    removed: Vec<(String, String)>,
    charges: Vec<(String, String)>,
    holds: Vec<(String, String)>,
    keys: Vec<(String, String)>,
    tokens: Vec<String>,
}

/// A value that is not a decimal in any reading, or breaks a rule of §4 outright.
const BAD_AMOUNTS: &[&str] = &[
    "",
    "-1",
    "-0.01",
    "NaN",
    "nan",
    "inf",
    "-inf",
    "1e3",
    "1E-2",
    "0.0000000001",
    "1,5",
    "abc",
    "5\0",
    "\0",
    "١٢",
    "1.2.3",
    "0x10",
    "--5",
    "5-",
    "$5",
    "5 USD",
    "½",
];
/// Spellings the rules do not settle: a tolerant server may read them.
const ODD_AMOUNTS: &[&str] = &[
    " 5",
    "5 ",
    "5.",
    ".5",
    "+5",
    "05",
    "99999999999999999999",
    "999999999999999.999999999",
];

#[derive(Clone, Copy)]
enum AmountKind {
    /// Ledger posting: > 0, at most 9 fractional digits.
    Ledger,
    /// Card/bank charge: > 0, whole cents.
    Cents,
    /// Credit purchase: whole cents, at least the $5.00 minimum.
    Purchase,
    /// A threshold: >= 0.
    NonNegative,
}

impl World {
    fn new(seed: u64, core: Vec<String>, methods: Vec<(String, String)>) -> World {
        World {
            rng: Rng(seed),
            n: 0,
            accounts: core.clone(),
            core,
            methods,
            removed: Vec::new(),
            charges: Vec::new(),
            holds: Vec::new(),
            keys: Vec::new(),
            tokens: Vec::new(),
        }
    }

    fn unique(&mut self) -> u64 {
        self.n += 1;
        self.n
    }

    fn wants(&mut self, mode: Mode, n: usize, corruptible: &[usize]) -> Vec<Want> {
        match mode {
            Mode::Valid => vec![Want::Valid; n],
            Mode::OneBad => {
                let k = *self.rng.pick(corruptible);
                (0..n)
                    .map(|i| if i == k { Want::Bad } else { Want::Valid })
                    .collect()
            }
            Mode::Chaos => (0..n)
                .map(|_| match self.rng.below(100) {
                    0..55 => Want::Valid,
                    55..70 => Want::Odd,
                    _ => Want::Bad,
                })
                .collect(),
        }
    }

    fn known_account(&mut self) -> String {
        if self.rng.percent(55) {
            self.rng.pick(&self.core).clone()
        } else {
            self.rng.pick(&self.accounts).clone()
        }
    }

    fn account(&mut self, want: Want, create: bool) -> F<String> {
        const SYNTAX: &[&str] = &[
            "",
            " ",
            "has space",
            "ünïcödé",
            "a/b",
            "acct.1",
            "acct'; DROP TABLE accounts;--",
            "acct\0",
            "\0",
            "acct\u{1}",
            "acct\n",
            "😀",
            "ACME\u{7f}",
            "../../etc/passwd",
            "%00",
        ];
        match want {
            Want::Valid if create => ok(format!("acct_{}", self.unique())),
            Want::Valid => ok(self.known_account()),
            Want::Odd if create => odd(self.known_account()),
            Want::Odd => ok(self.known_account()),
            Want::Bad => {
                if !create && self.rng.percent(35) {
                    return bad(format!("ghost_{}", self.unique()), not_found());
                }
                let s = match self.rng.below(SYNTAX.len() + 3) {
                    i if i < SYNTAX.len() => SYNTAX[i].to_owned(),
                    i if i == SYNTAX.len() => "a".repeat(65),
                    i if i == SYNTAX.len() + 1 => "a".repeat(5000),
                    _ => "a".repeat(70_000),
                };
                bad(s, invalid("account_id"))
            }
        }
    }

    fn text(&mut self, want: Want, spec: &TextSpec) -> F<String> {
        let candidates = text_candidates(spec);
        let target = if want == Want::Bad {
            Class::Bad
        } else {
            Class::Valid
        };
        for _ in 0..200 {
            let s = self.rng.pick(&candidates).clone();
            if text_class(spec, &s) == target {
                return match target {
                    Class::Bad => bad(s, invalid(spec.name)),
                    _ => ok(s),
                };
            }
        }
        unreachable!("no candidate of class {target:?} for {}", spec.name)
    }

    fn key(&mut self, want: Want, account: &str) -> F<String> {
        match want {
            Want::Valid => {
                let n = self.unique();
                let deco = *self.rng.pick(&[
                    "",
                    "",
                    "",
                    "-é",
                    "-😀",
                    "-'; DROP TABLE x;--",
                    "-日本",
                    "-%s",
                    " spaced",
                ]);
                let mut k = format!("k{n}{deco}");
                if self.rng.percent(5) {
                    while k.chars().count() < KEY_MAX {
                        k.push('z');
                    }
                }
                ok(k)
            }
            Want::Odd => {
                let used: Vec<&String> = self
                    .keys
                    .iter()
                    .filter(|(a, _)| a == account)
                    .map(|(_, k)| k)
                    .collect();
                if used.is_empty() {
                    let k = format!("k{}", self.unique());
                    ok(k)
                } else {
                    odd((*self.rng.pick(&used)).clone())
                }
            }
            Want::Bad => {
                let n = self.unique();
                let s = match self.rng.below(11) {
                    0 => String::new(),
                    1 => "\0".to_owned(),
                    2 => format!("k{n}\0x"),
                    3 => format!("k{n}\u{1}"),
                    4 => format!("k{n}\tx"),
                    5 => format!("k{n}\nx"),
                    6 => format!("k{n}\u{7f}"),
                    7 => "k".repeat(KEY_MAX + 1),
                    8 => "k".repeat(300),
                    9 => "k".repeat(5000),
                    _ => "k".repeat(70_000),
                };
                bad(s, invalid("idempotency_key"))
            }
        }
    }

    fn amount(&mut self, want: Want, kind: AmountKind, field: &'static str) -> F<String> {
        match want {
            Want::Valid => {
                let pool: &[&str] = match kind {
                    AmountKind::Ledger => &[
                        "0.000125",
                        "1",
                        "2.50",
                        "0.01",
                        "25.000",
                        "40.010",
                        "0.000000001",
                        "3.141592653",
                        "12",
                        "7.5",
                    ],
                    AmountKind::Cents => &[
                        "5", "10.00", "25.000", "40.010", "7.5", "12.34", "0.01", "1",
                    ],
                    AmountKind::Purchase => &[
                        "5",
                        "5.00",
                        "25.000",
                        "40.010",
                        "100",
                        "12.34",
                        "5.000000000",
                    ],
                    AmountKind::NonNegative => &["0", "10", "2.5", "0.000000001", "50.000", "100"],
                };
                ok((*self.rng.pick(pool)).to_owned())
            }
            Want::Odd => odd((*self.rng.pick(ODD_AMOUNTS)).to_owned()),
            Want::Bad => {
                let extra: &[&str] = match kind {
                    AmountKind::Ledger => &["0", "0.000"],
                    AmountKind::Cents => &["0", "0.000", "40.011", "0.001"],
                    AmountKind::Purchase => &["4.99", "0.01", "0"],
                    AmountKind::NonNegative => &[],
                };
                let i = self.rng.below(BAD_AMOUNTS.len() + extra.len());
                if i < BAD_AMOUNTS.len() {
                    bad(BAD_AMOUNTS[i].to_owned(), invalid(field))
                } else {
                    let s = extra[i - BAD_AMOUNTS.len()];
                    let e = match (kind, s) {
                        // Below the minimum purchase: a rule refuses it (§4).
                        (AmountKind::Purchase, "4.99" | "0.01") => refused_by_rule(),
                        _ => invalid(field),
                    };
                    bad(s.to_owned(), e)
                }
            }
        }
    }

    fn enum_value(&mut self, want: Want, valid: &[i32], field: &'static str) -> F<i32> {
        match want {
            Want::Valid => ok(*self.rng.pick(valid)),
            Want::Odd => odd(0),
            Want::Bad => {
                let v = *self.rng.pick(&[99, -1, 6, 1000, i32::MAX, i32::MIN]);
                bad(v, invalid(field))
            }
        }
    }

    /// R29: a grant's expiry: none or in the coming year; bad ones in the past, out of
    /// the Timestamp's range, with impossible nanos, or two centuries away.
    fn grant_expiry(&mut self, want: Want) -> F<Option<prost_types::Timestamp>> {
        let now = chrono::Utc::now().timestamp();
        let ts = |seconds: i64, nanos: i32| Some(prost_types::Timestamp { seconds, nanos });
        match want {
            Want::Valid if self.rng.percent(40) => ok(None),
            Want::Valid | Want::Odd => ok(ts(
                now + 3600 + self.rng.below(365 * 86_400) as i64,
                self.rng.below(1_000_000_000) as i32,
            )),
            Want::Bad => {
                let v = *self.rng.pick(&[
                    ts(now - 3600, 0),
                    ts(0, 0),
                    ts(now + 86_400, -1),
                    ts(now + 86_400, 1_000_000_000),
                    ts(253_402_300_800, 0),
                    ts(i64::MIN, 0),
                    ts(now + 200 * 366 * 86_400, 0),
                ]);
                bad(v, invalid("expires_at"))
            }
        }
    }

    /// R30: a usage summary's range: whole hours, `from` < `to`, within the granularity's
    /// longest range; bad ones name the field at fault.
    #[allow(clippy::type_complexity)]
    fn summary_range(
        &mut self,
        want: Want,
    ) -> F<(
        Option<prost_types::Timestamp>,
        Option<prost_types::Timestamp>,
        i32,
    )> {
        let hour = chrono::Utc::now().timestamp() / 3600 * 3600;
        let ts = |seconds: i64, nanos: i32| Some(prost_types::Timestamp { seconds, nanos });
        match want {
            Want::Valid | Want::Odd => {
                let g = *self.rng.pick(&[0, 1, 2]);
                let hours = if g == 2 {
                    1 + self.rng.below(744)
                } else {
                    24 * (1 + self.rng.below(400))
                };
                let from = hour - 3600 * self.rng.below(2000) as i64;
                ok((ts(from, 0), ts(from + 3600 * hours as i64, 0), g))
            }
            Want::Bad => {
                let (v, field) = *self.rng.pick(&[
                    ((None, ts(hour, 0), 2), "from"),
                    ((ts(hour, 0), None, 2), "to"),
                    ((ts(hour + 1, 0), ts(hour + 7200, 0), 2), "from"),
                    ((ts(hour, 0), ts(hour + 7200, 5_000), 2), "to"),
                    ((ts(hour, 0), ts(hour, 0), 1), "from"),
                    ((ts(hour, 0), ts(hour - 3600, 0), 1), "from"),
                    ((ts(hour, 0), ts(hour + 32 * 86_400, 0), 2), "to"),
                    ((ts(hour, 0), ts(hour + 401 * 86_400, 0), 1), "to"),
                    ((ts(hour, 0), ts(hour + 3600, 0), 7), "granularity"),
                    ((ts(hour, 0), ts(hour + 3600, 0), -1), "granularity"),
                    ((ts(i64::MIN, 0), ts(hour, 0), 1), "from"),
                ]);
                bad(v, invalid(field))
            }
        }
    }

    fn page_size(&mut self, want: Want) -> F<i32> {
        match want {
            Want::Valid => ok(*self.rng.pick(&[0, 1, 2, 10, 500, 100_000, i32::MAX])),
            _ => odd(*self.rng.pick(&[-1, -50, i32::MIN])),
        }
    }

    fn page_token(&mut self, want: Want) -> F<String> {
        match want {
            Want::Valid if !self.tokens.is_empty() && self.rng.percent(50) => {
                ok(self.rng.pick(&self.tokens).clone())
            }
            Want::Valid => ok(String::new()),
            _ => odd((*self.rng.pick(&[
                "garbage",
                "-5",
                "0",
                "1",
                "99999999999999999999999",
                "\0",
                "'; DROP TABLE charges;--",
                "😀",
                "eyJzZXEiOjF9",
            ]))
            .to_owned()),
        }
    }

    /// A payment method id; `required` for SetDefault/Remove (empty = default elsewhere).
    fn method(&mut self, want: Want, account: &str, required: bool) -> F<String> {
        let own: Vec<String> = self
            .methods
            .iter()
            .filter(|(a, _)| a == account)
            .map(|(_, m)| m.clone())
            .collect();
        match want {
            Want::Valid | Want::Odd => {
                if !required && (own.is_empty() || self.rng.percent(40)) {
                    return ok(String::new());
                }
                if own.is_empty() {
                    let gone: Vec<String> = self
                        .removed
                        .iter()
                        .filter(|(a, _)| a == account)
                        .map(|(_, m)| m.clone())
                        .collect();
                    return odd(if gone.is_empty() {
                        "pm_none".to_owned()
                    } else {
                        self.rng.pick(&gone).clone()
                    });
                }
                ok(self.rng.pick(&own).clone())
            }
            Want::Bad => {
                let foreign: Vec<String> = self
                    .methods
                    .iter()
                    .filter(|(a, _)| a != account)
                    .map(|(_, m)| m.clone())
                    .collect();
                match self.rng.below(if required { 4 } else { 3 }) {
                    0 => bad(
                        "pm_0190000000000000000000000000dead".to_owned(),
                        not_found(),
                    ),
                    1 if !foreign.is_empty() => bad(self.rng.pick(&foreign).clone(), not_found()),
                    3 => bad(String::new(), invalid("payment_method_id")),
                    _ => {
                        let s = match self.rng.below(5) {
                            0 => "pm\0".to_owned(),
                            1 => "\u{1}".to_owned(),
                            2 => "'; DROP TABLE payment_methods;--".to_owned(),
                            3 => "x".repeat(5000),
                            _ => "x".repeat(70_000),
                        };
                        bad(
                            s,
                            Expect {
                                codes: vec![Code::InvalidArgument, Code::NotFound],
                                field: None,
                                why: String::new(),
                            },
                        )
                    }
                }
            }
        }
    }

    /// R15: a hold's time to live. Valid ones never expire during the run (an expiry would
    /// change the books while a refused request is checked for changing nothing).
    fn ttl(&mut self, want: Want) -> F<i64> {
        match want {
            Want::Valid | Want::Odd => ok(*self.rng.pick(&[0, 3600, 604_800])),
            Want::Bad => bad(
                *self.rng.pick(&[-1, 604_801, i64::MAX, i64::MIN]),
                invalid("ttl_seconds"),
            ),
        }
    }

    /// A hold id: one this account holds, an unknown UUID, or not a UUID at all.
    fn hold_id(&mut self, want: Want, account: &str) -> F<String> {
        let own: Vec<String> = self
            .holds
            .iter()
            .filter(|(a, _)| a == account)
            .map(|(_, h)| h.clone())
            .collect();
        match want {
            Want::Valid if !own.is_empty() => ok(self.rng.pick(&own).clone()),
            Want::Valid | Want::Odd => odd("0190a5b0-0000-7000-8000-00000000dead".to_owned()),
            Want::Bad => bad(
                (*self
                    .rng
                    .pick(&["", "not-a-uuid", "'; DROP TABLE holds;--", "\0", "😀"]))
                .to_owned(),
                invalid("hold_id"),
            ),
        }
    }

    fn charge_id(&mut self, want: Want, account: &str) -> F<String> {
        let own: Vec<String> = self
            .charges
            .iter()
            .filter(|(a, _)| a == account)
            .map(|(_, c)| c.clone())
            .collect();
        match want {
            Want::Valid | Want::Odd => {
                if own.is_empty() {
                    odd("ch_none".to_owned())
                } else {
                    ok(self.rng.pick(&own).clone())
                }
            }
            Want::Bad => match self.rng.below(4) {
                0 => bad(String::new(), invalid("charge_id")),
                1 => bad(
                    "ch_0190000000000000000000000000dead".to_owned(),
                    not_found(),
                ),
                2 => {
                    let foreign: Vec<String> = self
                        .charges
                        .iter()
                        .filter(|(a, _)| a != account)
                        .map(|(_, c)| c.clone())
                        .collect();
                    if foreign.is_empty() {
                        bad("ch_x".to_owned(), not_found())
                    } else {
                        bad(self.rng.pick(&foreign).clone(), not_found())
                    }
                }
                _ => bad(
                    (*self.rng.pick(&["ch\0", "\u{7f}", "😀"])).to_owned(),
                    Expect {
                        codes: vec![Code::InvalidArgument, Code::NotFound],
                        field: None,
                        why: String::new(),
                    },
                ),
            },
        }
    }

    fn payment_method(&mut self, want: Want) -> F<Option<ppb::add_payment_method_request::Method>> {
        use ppb::add_payment_method_request::Method;
        let card = |number: &str, m: u32, y: u32, cvc: &str| {
            Some(Method::Card(ppb::CardDetails {
                number: number.to_owned(),
                exp_month: m,
                exp_year: y,
                cvc: cvc.to_owned(),
            }))
        };
        let bank = |r: &str, a: &str, h: &str| {
            Some(Method::UsBankAccount(ppb::UsBankAccountDetails {
                routing_number: r.to_owned(),
                account_number: a.to_owned(),
                holder_name: h.to_owned(),
            }))
        };
        let month = 1 + self.rng.below(12) as u32;
        let year = 2030 + self.rng.below(10) as u32;
        match want {
            Want::Valid => {
                if self.rng.percent(75) {
                    let number = match self.rng.below(20) {
                        0..8 => "4242424242424242",
                        8..11 => "5555555555554444",
                        11 => "4242 4242 4242 4242",
                        12 => "4242-4242-4242-4242",
                        13 => "378282246310005",
                        14 => "6011111111111117",
                        15 => "4000000000000002",
                        16 => "4000000000009995",
                        17 => "4000000000000069",
                        18 => "4000000000000119",
                        _ => "5555555555554444",
                    };
                    let cvc = if number.starts_with('3') {
                        "1234"
                    } else {
                        "123"
                    };
                    ok(card(number, month, year, cvc))
                } else {
                    let holder = self.text(Want::Valid, &HOLDER_NAME).v;
                    let account = *self
                        .rng
                        .pick(&["000123456789", "1234", "12345678901234567"]);
                    ok(bank("110000000", account, &holder))
                }
            }
            Want::Odd => odd(bank("021000021", "000123456789", "Jane Doe")),
            Want::Bad => match self.rng.below(12) {
                0 => bad(
                    None,
                    Expect {
                        codes: vec![Code::InvalidArgument],
                        field: None,
                        why: String::new(),
                    },
                ),
                1 => {
                    let n = *self.rng.pick(&[
                        "",
                        "4242424242424241",
                        "abcd",
                        "4242\u{0}4242424242",
                        "1111111111111111111111111",
                        "٤٢٤٢٤٢٤٢٤٢٤٢٤٢٤٢",
                        "42",
                    ]);
                    bad(card(n, month, year, "123"), invalid("number"))
                }
                2 => {
                    let m = *self.rng.pick(&[0, 13, u32::MAX]);
                    bad(
                        card("4242424242424242", m, year, "123"),
                        invalid("exp_month"),
                    )
                }
                3 => {
                    let y = *self.rng.pick(&[0, 1999, 2020, 99_999, u32::MAX]);
                    bad(card("4242424242424242", month, y, "123"), invalid("exp"))
                }
                4 => {
                    let c = *self
                        .rng
                        .pick(&["", "12", "12345", "abc", "1\u{0}3", "１２３"]);
                    bad(card("4242424242424242", month, year, c), invalid("cvc"))
                }
                5 => {
                    let r = *self
                        .rng
                        .pick(&["", "123", "110000001", "abcdefghi", "11000000\0"]);
                    bad(bank(r, "000123456789", "Jane"), invalid("routing_number"))
                }
                6 => {
                    let a = *self
                        .rng
                        .pick(&["", "12", "abcdefgh", "123456789012345678", "1234\0"]);
                    bad(bank("110000000", a, "Jane"), invalid("account_number"))
                }
                _ => {
                    let h = self.text(Want::Bad, &HOLDER_NAME).v;
                    bad(
                        bank("110000000", "000123456789", &h),
                        invalid("holder_name"),
                    )
                }
            },
        }
    }

    /// (enabled, threshold, target) for SetAutoRecharge (R6).
    fn recharge_settings(&mut self, want: Want) -> F<(bool, String, String)> {
        match want {
            Want::Valid => {
                if self.rng.percent(35) {
                    return ok((false, String::new(), String::new()));
                }
                let t: Decimal = self
                    .rng
                    .pick(&["10", "20.00", "5.5", "1", "15.000"])
                    .parse()
                    .unwrap();
                let gap: Decimal = self.rng.pick(&["5", "10", "50", "100"]).parse().unwrap();
                let threshold = t.to_string();
                let mut target = (t + gap).to_string();
                if self.rng.percent(30) {
                    target = format!("{}.000", (t + gap).trunc());
                }
                ok((self.rng.percent(85), threshold, target))
            }
            Want::Odd => odd((false, "50".to_owned(), "10".to_owned())),
            Want::Bad => {
                let (th, tg, e) = match self.rng.below(13) {
                    0 => ("50", "10", refused_by_rule()),
                    1 => ("10", "10", refused_by_rule()),
                    2 => ("10", "12", refused_by_rule()),
                    3 => ("0", "50", refused_by_rule()),
                    4 => ("-1", "50", invalid("threshold")),
                    5 => ("NaN", "50", invalid("threshold")),
                    6 => ("1e1", "2e3", invalid("threshold")),
                    7 => ("", "50", invalid("threshold")),
                    8 => ("10", "", invalid("target")),
                    9 => ("10", "0.0000000001", invalid("target")),
                    10 => ("10", "abc", invalid("target")),
                    11 => ("10\0", "50", invalid("threshold")),
                    _ => ("10", "-50", invalid("target")),
                };
                bad((true, th.to_owned(), tg.to_owned()), e)
            }
        }
    }

    fn usage_item(
        &mut self,
        mode: Mode,
    ) -> (lpb::RecordUsageRequest, Class, Option<Expect>, Vec<String>) {
        let w = self.wants(mode, 5, &[0, 1, 2, 3, 4]);
        let account = self.account(w[0], false);
        let category = self.enum_value(w[1], &[1, 2, 3, 4, 5], "category");
        let amount = self.amount(w[2], AmountKind::Ledger, "amount");
        let key = self.key(w[3], &account.v);
        let description = self.text(w[4], &DESCRIPTION);
        let f = fields![account, category, amount, key, description];
        let (class, expect) = verdict(&f);
        (
            lpb::RecordUsageRequest {
                account_id: account.v,
                category: category.v,
                amount: amount.v,
                idempotency_key: key.v,
                description: description.v,
            },
            class,
            expect,
            whys(&f),
        )
    }

    fn generate(&mut self, mode: Mode) -> Gen {
        let kind = self.rng.below(KINDS);
        self.gen_kind(kind, mode)
    }

    fn gen_kind(&mut self, kind: usize, mode: Mode) -> Gen {
        let mut items = Vec::new();
        let (req, fields) = match kind {
            0 => {
                let w = self.wants(mode, 3, &[0, 1, 2]);
                let a = self.account(w[0], true);
                let m = self.enum_value(w[1], &[0, 1, 2], "billing_mode");
                let d = self.text(w[2], &DISPLAY_NAME);
                let f = fields![a, m, d];
                (
                    Req::CreateAccount(lpb::CreateAccountRequest {
                        account_id: a.v,
                        billing_mode: m.v,
                        display_name: d.v,
                    }),
                    f,
                )
            }
            1 | 2 | 8 => {
                let w = self.wants(mode, 1, &[0]);
                let a = self.account(w[0], false);
                let f = fields![a];
                let id = a.v;
                let req = match kind {
                    1 => Req::GetAccount(lpb::GetAccountRequest { account_id: id }),
                    2 => Req::CheckAccess(lpb::CheckAccessRequest {
                        account_id: id,
                        amount: String::new(),
                    }),
                    _ => Req::ClearBalanceThreshold(lpb::ClearBalanceThresholdRequest {
                        account_id: id,
                        version: 0,
                    }),
                };
                (req, f)
            }
            3 => {
                let (r, class, expect, whys) = self.usage_item(mode);
                return Gen {
                    req: Req::RecordUsage(r),
                    class,
                    expect,
                    items,
                    whys,
                };
            }
            4 => {
                let n = match mode {
                    Mode::Valid => 1 + self.rng.below(8),
                    Mode::OneBad => 1 + self.rng.below(6),
                    Mode::Chaos => self.rng.below(13),
                };
                let mut reqs = Vec::new();
                let mut size = 0;
                let mut all_whys = Vec::new();
                for i in 0..n {
                    let (r, class, expect, whys) = self.usage_item(mode);
                    all_whys.extend(whys.into_iter().map(|w| format!("items[{i}].{w}")));
                    size += r.account_id.len() + r.idempotency_key.len() + r.description.len();
                    if size > 1_000_000 {
                        break;
                    }
                    reqs.push(r);
                    items.push((class, expect));
                }
                // The batch as a whole is "rejected" only when every item must be.
                let class = if !items.is_empty() && items.iter().all(|i| i.0 == Class::Bad) {
                    Class::Bad
                } else {
                    Class::Valid
                };
                return Gen {
                    req: Req::RecordUsageBatch(lpb::RecordUsageBatchRequest { items: reqs }),
                    class,
                    expect: None,
                    items,
                    whys: all_whys,
                };
            }
            5 => {
                let w = self.wants(mode, 6, &[0, 1, 2, 3, 4, 5]);
                let a = self.account(w[0], false);
                let amount = self.amount(w[1], AmountKind::Ledger, "amount");
                let source = self.enum_value(w[2], &[1, 2, 3, 4], "source");
                let reference = self.text(w[3], &REFERENCE);
                let key = self.key(w[4], &a.v);
                let d = self.text(w[5], &DESCRIPTION);
                let f = fields![a, amount, source, reference, key, d];
                (
                    Req::AddCredits(lpb::AddCreditsRequest {
                        account_id: a.v,
                        amount: amount.v,
                        source: source.v,
                        reference: reference.v,
                        idempotency_key: key.v,
                        description: d.v,
                    }),
                    f,
                )
            }
            6 | 15 | 19 => {
                let w = self.wants(mode, 3, &[0]);
                let a = self.account(w[0], false);
                let size = self.page_size(w[1]);
                let token = self.page_token(w[2]);
                let f = fields![a, size, token];
                let req = match kind {
                    6 => Req::ListEntries(lpb::ListEntriesRequest {
                        account_id: a.v,
                        page_size: size.v,
                        page_token: token.v,
                    }),
                    15 => Req::ListCharges(ppb::ListChargesRequest {
                        account_id: a.v,
                        page_size: size.v,
                        page_token: token.v,
                    }),
                    _ => Req::ListRechargeAttempts(rpb::ListRechargeAttemptsRequest {
                        account_id: a.v,
                        page_size: size.v,
                        page_token: token.v,
                    }),
                };
                (req, f)
            }
            7 => {
                let w = self.wants(mode, 2, &[0, 1]);
                let a = self.account(w[0], false);
                let t = self.amount(w[1], AmountKind::NonNegative, "threshold");
                let f = fields![a, t];
                (
                    Req::SetBalanceThreshold(lpb::SetBalanceThresholdRequest {
                        account_id: a.v,
                        threshold: t.v,
                        version: 0,
                    }),
                    f,
                )
            }
            9 => {
                let w = self.wants(mode, 3, &[0, 1]);
                let a = self.account(w[0], false);
                let m = self.payment_method(w[1]);
                let make_default = ok(self.rng.percent(40));
                let f = fields![a, m, make_default];
                (
                    Req::AddPaymentMethod(ppb::AddPaymentMethodRequest {
                        account_id: a.v,
                        method: m.v,
                        make_default: make_default.v,
                        processor_token: String::new(),
                    }),
                    f,
                )
            }
            10 | 17 => {
                let w = self.wants(mode, 1, &[0]);
                let a = self.account(w[0], false);
                let f = fields![a];
                let req = if kind == 10 {
                    Req::ListPaymentMethods(ppb::ListPaymentMethodsRequest {
                        account_id: a.v,
                        ..Default::default()
                    })
                } else {
                    Req::GetAutoRecharge(rpb::GetAutoRechargeRequest { account_id: a.v })
                };
                (req, f)
            }
            11 | 12 => {
                let w = self.wants(mode, 2, &[0, 1]);
                let a = self.account(w[0], false);
                let m = self.method(w[1], &a.v, true);
                let f = fields![a, m];
                let req = if kind == 11 {
                    Req::SetDefaultPaymentMethod(ppb::SetDefaultPaymentMethodRequest {
                        account_id: a.v,
                        payment_method_id: m.v,
                    })
                } else {
                    Req::RemovePaymentMethod(ppb::RemovePaymentMethodRequest {
                        account_id: a.v,
                        payment_method_id: m.v,
                    })
                };
                (req, f)
            }
            13 => {
                let w = self.wants(mode, 5, &[0, 1, 2, 3, 4]);
                let a = self.account(w[0], false);
                let amount = self.amount(w[1], AmountKind::Cents, "amount");
                let m = self.method(w[2], &a.v, false);
                let key = self.key(w[3], &a.v);
                let d = self.text(w[4], &DESCRIPTION);
                let f = fields![a, amount, m, key, d];
                (
                    Req::Charge(ppb::ChargeRequest {
                        account_id: a.v,
                        amount: amount.v,
                        payment_method_id: m.v,
                        idempotency_key: key.v,
                        description: d.v,
                        top_up: false,
                    }),
                    f,
                )
            }
            14 => {
                let w = self.wants(mode, 4, &[0, 1, 2, 3]);
                let a = self.account(w[0], false);
                let amount = self.amount(w[1], AmountKind::Purchase, "amount");
                let m = self.method(w[2], &a.v, false);
                let key = self.key(w[3], &a.v);
                let f = fields![a, amount, m, key];
                (
                    Req::PurchaseCredits(ppb::PurchaseCreditsRequest {
                        account_id: a.v,
                        amount: amount.v,
                        payment_method_id: m.v,
                        idempotency_key: key.v,
                    }),
                    f,
                )
            }
            16 => {
                let w = self.wants(mode, 2, &[0, 1]);
                let a = self.account(w[0], false);
                let c = self.charge_id(w[1], &a.v);
                let f = fields![a, c];
                (
                    Req::GetCharge(ppb::GetChargeRequest {
                        account_id: a.v,
                        charge_id: c.v,
                    }),
                    f,
                )
            }
            20 => {
                let w = self.wants(mode, 6, &[0, 1, 2, 3, 4, 5]);
                let a = self.account(w[0], false);
                let amount = self.amount(w[1], AmountKind::Ledger, "amount");
                let category = self.enum_value(w[2], &[1, 2, 3, 4, 5], "category");
                let key = self.key(w[3], &a.v);
                let d = self.text(w[4], &DESCRIPTION);
                let ttl = self.ttl(w[5]);
                let f = fields![a, amount, category, key, d, ttl];
                (
                    Req::CreateHold(lpb::CreateHoldRequest {
                        account_id: a.v,
                        amount: amount.v,
                        category: category.v,
                        idempotency_key: key.v,
                        description: d.v,
                        ttl_seconds: ttl.v,
                    }),
                    f,
                )
            }
            22 => {
                let w = self.wants(mode, 6, &[0, 1, 2, 3, 4]);
                let a = self.account(w[0], false);
                let amount = self.amount(w[1], AmountKind::Ledger, "amount");
                let k = self.key(w[2], &a.v);
                let reason = self.text(w[3], &REASON);
                let exp = self.grant_expiry(w[4]);
                let priority = ok(*self.rng.pick(&[0, 1, 7, 1_000_000]));
                let f = fields![a, amount, k, reason, exp, priority];
                (
                    Req::GrantCredits(lpb::GrantCreditsRequest {
                        account_id: a.v,
                        amount: amount.v,
                        idempotency_key: k.v,
                        reason: reason.v,
                        expires_at: exp.v,
                        priority: priority.v,
                    }),
                    f,
                )
            }
            24 => {
                let w = self.wants(mode, 2, &[0, 1]);
                // An id that names no account is valid here (it is absent from the first
                // part): only malformed ids are bad.
                let a = self.account(w[0], true);
                let cursor = match w[1] {
                    Want::Valid => ok(String::new()),
                    // Well-formed, of a feed this ledger never had: a snapshot instead.
                    Want::Odd => odd(format!("v1.{:032x}.10:20:12", self.unique())),
                    Want::Bad => {
                        let c = *self.rng.pick(&[
                            "v1",
                            "v1..",
                            "v2.0123456789abcdef0123456789abcdef.10:20:",
                            "v1.0123456789abcdef0123456789abcdef.20:10:",
                            "v1.0123456789abcdef0123456789abcdef.10:20:30",
                            "v1.0123456789abcdef0123456789abcdef.0:0:",
                            "v1.0123456789ABCDEF0123456789ABCDEF.10:20:",
                            "v1.0123456789abcdef0123456789abcdef.10:20:15,12",
                            "'; DROP TABLE access_changes; --",
                            "v1.0123456789abcdef0123456789abcdef.10:99999999999999999999999:",
                            "\0",
                        ]);
                        bad(c.to_owned(), invalid("resume_cursor"))
                    }
                };
                let f = fields![a, cursor];
                (
                    Req::WatchAccess(lpb::WatchAccessRequest {
                        account_ids: vec![a.v],
                        resume_cursor: cursor.v,
                    }),
                    f,
                )
            }
            23 => {
                let w = self.wants(mode, 2, &[0, 1]);
                let a = self.account(w[0], false);
                let r = self.summary_range(w[1]);
                let f = fields![a, r];
                let (from, to, granularity) = r.v;
                (
                    Req::GetUsageSummary(lpb::GetUsageSummaryRequest {
                        account_id: a.v,
                        from,
                        to,
                        granularity,
                    }),
                    f,
                )
            }
            21 => {
                let w = self.wants(mode, 4, &[0, 1, 2, 3]);
                let a = self.account(w[0], false);
                let h = self.hold_id(w[1], &a.v);
                let amount = self.amount(w[2], AmountKind::Ledger, "amount");
                let d = self.text(w[3], &DESCRIPTION);
                let f = fields![a, h, amount, d];
                (
                    Req::CaptureHold(lpb::CaptureHoldRequest {
                        account_id: a.v,
                        hold_id: h.v,
                        amount: amount.v,
                        description: d.v,
                    }),
                    f,
                )
            }
            _ => {
                let w = self.wants(mode, 2, &[0, 1]);
                let a = self.account(w[0], false);
                let s = self.recharge_settings(w[1]);
                let f = fields![a, s];
                let (enabled, threshold, target) = s.v;
                (
                    Req::SetAutoRecharge(rpb::SetAutoRechargeRequest {
                        account_id: a.v,
                        enabled,
                        threshold,
                        target,
                        monthly_limit: String::new(),
                    }),
                    f,
                )
            }
        };
        let (class, expect) = verdict(&fields);
        Gen {
            req,
            class,
            expect,
            items,
            whys: whys(&fields),
        }
    }

    /// Remembers what a successful answer created, for later requests to use.
    fn learn(&mut self, req: &Req, reply: &Reply) {
        if let Some(a) = &reply.new_account {
            self.accounts.push(a.clone());
        }
        if let Some(m) = &reply.new_method {
            self.methods.push(m.clone());
        }
        if let Some(c) = &reply.new_charge {
            self.charges.push(c.clone());
        }
        if let Some(h) = &reply.new_hold {
            self.holds.push(h.clone());
        }
        if let Some(t) = &reply.token
            && !t.is_empty()
        {
            self.tokens.push(t.clone());
        }
        if let Req::RemovePaymentMethod(r) = req {
            let gone = (r.account_id.clone(), r.payment_method_id.clone());
            self.methods.retain(|m| *m != gone);
            self.removed.push(gone);
        }
        let key = match req {
            Req::RecordUsage(r) => Some((&r.account_id, &r.idempotency_key)),
            Req::AddCredits(r) => Some((&r.account_id, &r.idempotency_key)),
            Req::Charge(r) => Some((&r.account_id, &r.idempotency_key)),
            Req::PurchaseCredits(r) => Some((&r.account_id, &r.idempotency_key)),
            _ => None,
        };
        if let Some((a, k)) = key
            && k.len() < 400
        {
            self.keys.push((a.clone(), k.clone()));
        }
    }
}

// ---------------------------------------------------------------------------------------
// Sending.

struct Clients {
    ledger: LedgerServiceClient<Channel>,
    payments: PaymentsServiceClient<Channel>,
    recharge: AutoRechargeServiceClient<Channel>,
}

impl Clients {
    async fn connect(sys: &System) -> Clients {
        let l = sys.ledger.client().await;
        let p = sys.payments.client().await;
        let r = sys.recharge[0].client().await;
        // Generous limits: the server's limits are what is under test, not the client's.
        Clients {
            ledger: l
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20),
            payments: p
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20),
            recharge: r
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20),
        }
    }
}

#[derive(Default)]
struct Reply {
    new_account: Option<String>,
    new_method: Option<(String, String)>,
    new_charge: Option<(String, String)>,
    new_hold: Option<(String, String)>,
    token: Option<String>,
    /// RecordUsageBatch: per item, `None` = ok, else (code, message).
    items: Vec<Option<(i32, String)>>,
}

async fn send(c: &mut Clients, req: &Req) -> Result<Reply, tonic::Status> {
    let mut out = Reply::default();
    match req.clone() {
        Req::CreateAccount(r) => {
            let a = c.ledger.create_account(r).await?.into_inner();
            out.new_account = Some(a.account_id);
        }
        Req::GetAccount(r) => {
            c.ledger.get_account(r).await?;
        }
        Req::CheckAccess(r) => {
            c.ledger.check_access(r).await?;
        }
        Req::CreateHold(r) => {
            let account = r.account_id.clone();
            let h = c.ledger.create_hold(r).await?.into_inner();
            out.new_hold = Some((account, h.hold_id));
        }
        Req::CaptureHold(r) => {
            c.ledger.capture_hold(r).await?;
        }
        Req::GrantCredits(r) => {
            c.ledger.grant_credits(r).await?;
        }
        Req::GetUsageSummary(r) => {
            c.ledger.get_usage_summary(r).await?;
        }
        Req::WatchAccess(r) => {
            // Accepted: the stream's first part ends with a sync point.
            let mut s = c.ledger.watch_access(r).await?.into_inner();
            loop {
                match s.message().await? {
                    Some(u) if u.account_id.is_empty() => break,
                    Some(_) => {}
                    None => {
                        return Err(tonic::Status::internal("stream ended before a sync point"));
                    }
                }
            }
        }
        Req::RecordUsage(r) => {
            c.ledger.record_usage(r).await?;
        }
        Req::RecordUsageBatch(r) => {
            let res = c.ledger.record_usage_batch(r).await?.into_inner();
            out.items = res
                .results
                .into_iter()
                .map(|r| match r.result {
                    Some(lpb::record_usage_batch_result::Result::Ok(_)) => None,
                    Some(lpb::record_usage_batch_result::Result::Error(s)) => {
                        Some((s.code, s.message))
                    }
                    None => Some((-1, "result with neither ok nor error".to_owned())),
                })
                .collect();
        }
        Req::AddCredits(r) => {
            c.ledger.add_credits(r).await?;
        }
        Req::ListEntries(r) => {
            out.token = Some(c.ledger.list_entries(r).await?.into_inner().next_page_token);
        }
        Req::SetBalanceThreshold(r) => {
            c.ledger.set_balance_threshold(r).await?;
        }
        Req::ClearBalanceThreshold(r) => {
            c.ledger.clear_balance_threshold(r).await?;
        }
        Req::AddPaymentMethod(r) => {
            let account = r.account_id.clone();
            let pm = c.payments.add_payment_method(r).await?.into_inner();
            out.new_method = Some((account, pm.payment_method_id));
        }
        Req::ListPaymentMethods(r) => {
            c.payments.list_payment_methods(r).await?;
        }
        Req::SetDefaultPaymentMethod(r) => {
            c.payments.set_default_payment_method(r).await?;
        }
        Req::RemovePaymentMethod(r) => {
            c.payments.remove_payment_method(r).await?;
        }
        Req::Charge(r) => {
            let account = r.account_id.clone();
            let ch = c.payments.charge(r).await?.into_inner();
            out.new_charge = Some((account, ch.charge_id));
        }
        Req::PurchaseCredits(r) => {
            let account = r.account_id.clone();
            let p = c.payments.purchase_credits(r).await?.into_inner();
            if let Some(ch) = p.charge {
                out.new_charge = Some((account, ch.charge_id));
            }
        }
        Req::ListCharges(r) => {
            out.token = Some(
                c.payments
                    .list_charges(r)
                    .await?
                    .into_inner()
                    .next_page_token,
            );
        }
        Req::GetCharge(r) => {
            c.payments.get_charge(r).await?;
        }
        Req::GetAutoRecharge(r) => {
            c.recharge.get_auto_recharge(r).await?;
        }
        Req::SetAutoRecharge(r) => {
            c.recharge.set_auto_recharge(r).await?;
        }
        Req::ListRechargeAttempts(r) => {
            out.token = Some(
                c.recharge
                    .list_recharge_attempts(r)
                    .await?
                    .into_inner()
                    .next_page_token,
            );
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// Judging and reporting.

/// Debug text with long runs of one character folded ("a×70000"), so 70,000-character
/// inputs stay readable in a report.
fn abbreviate(s: &str) -> String {
    let chars: Vec<char> = s.chars().collect();
    let mut out = String::new();
    let mut i = 0;
    while i < chars.len() {
        let mut j = i;
        while j < chars.len() && chars[j] == chars[i] {
            j += 1;
        }
        if j - i > 12 {
            let _ = write!(out, "{}×{}", chars[i], j - i);
        } else {
            out.extend(&chars[i..j]);
        }
        i = j;
    }
    if out.chars().count() > 1500 {
        out = out.chars().take(1500).collect::<String>() + "…";
    }
    out
}

/// Account and object names quoted in a message vary from request to request; for grouping
/// they are all one.
fn blur_quoted(s: &str) -> String {
    let mut out = String::new();
    let mut quoted = false;
    for c in s.chars() {
        if c == '"' {
            if !quoted {
                out.push_str("\"…\"");
            }
            quoted = !quoted;
        } else if !quoted {
            out.push(c);
        }
    }
    out
}

/// What kind of bad input a `why` is: field names with NUL / control character / too
/// long, or the (blurred) value, so that one defect makes one group.
fn why_kind(why: &str) -> String {
    let mut kinds: Vec<String> = why
        .split("; ")
        .filter(|p| !p.is_empty())
        .map(|part| {
            let part = match part.split_once("].") {
                Some((head, rest)) if head.starts_with("items[") => rest,
                _ => part,
            };
            let (field, value) = part.split_once('=').unwrap_or(("id", part));
            let kind = if value.contains("\\0") {
                "NUL".to_owned()
            } else if value.contains("\\u{")
                || value.contains("\\t")
                || value.contains("\\n")
                || value.contains("\\r")
            {
                "control character".to_owned()
            } else if value.contains('×') {
                "too long".to_owned()
            } else {
                blur_numbers(value)
            };
            format!("{field}: {kind}")
        })
        .collect();
    kinds.sort();
    kinds.dedup();
    kinds.join(", ")
}

/// Runs of two or more digits (counters in keys and ids) become `#`.
fn blur_numbers(s: &str) -> String {
    let chars: Vec<char> = s.chars().collect();
    let mut out = String::new();
    let mut i = 0;
    while i < chars.len() {
        let mut j = i;
        while j < chars.len() && chars[j].is_ascii_digit() {
            j += 1;
        }
        if j - i >= 2 {
            out.push('#');
            i = j;
        } else {
            out.push(chars[i]);
            i += 1;
        }
    }
    out
}

fn short(msg: &str) -> String {
    abbreviate(msg).chars().take(300).collect()
}

struct Offence {
    what: &'static str,
    rpc: &'static str,
    /// The known-bad fields of the request, if any.
    why: String,
    input: String,
    got: String,
}

#[derive(Default)]
struct Report {
    offences: Vec<Offence>,
    sent: usize,
    by_code: BTreeMap<String, usize>,
}

fn is_5xx(code: i32) -> bool {
    code == Code::Internal as i32 || code == Code::Unknown as i32
}

impl Report {
    fn add(&mut self, what: &'static str, g: &Gen, got: String) {
        let req = &g.req;
        self.offences.push(Offence {
            what,
            rpc: req.rpc(),
            why: g.whys.join("; "),
            input: abbreviate(&format!("{req:?}")),
            got,
        });
    }

    fn judge_status(
        &mut self,
        g: &Gen,
        class: Class,
        expect: Option<&Expect>,
        code: i32,
        msg: &str,
        item: Option<usize>,
    ) {
        let at = item.map(|i| format!("items[{i}]: ")).unwrap_or_default();
        let code_name = format!("{:?}", Code::from_i32(code));
        if is_5xx(code) {
            self.add(
                "(a) INTERNAL/UNKNOWN status",
                g,
                format!("{at}{code_name}: {}", short(msg)),
            );
            return;
        }
        if class != Class::Bad {
            return;
        }
        let Some(e) = expect else { return };
        if !e.codes.iter().any(|c| *c as i32 == code) {
            self.add(
                "known-invalid input refused with the wrong status",
                g,
                format!(
                    "{at}{code_name}: {} (expected one of {:?})",
                    short(msg),
                    e.codes
                ),
            );
        } else if let Some(f) = e.field
            && code == Code::InvalidArgument as i32
            && !msg.contains(f)
        {
            self.add(
                "INVALID_ARGUMENT does not name the field (§4)",
                g,
                format!(
                    "{at}{code_name}: {} (expected it to name {f:?})",
                    short(msg)
                ),
            );
        }
    }

    /// Returns whether the request was (wholly or, for a batch, partly) accepted.
    fn judge(&mut self, g: &Gen, res: &Result<Result<Reply, tonic::Status>, ()>) -> bool {
        self.sent += 1;
        let res = match res {
            Err(()) => {
                self.add(
                    "no answer within the timeout",
                    g,
                    format!("{CALL_TIMEOUT:?}"),
                );
                return false;
            }
            Ok(r) => r,
        };
        match res {
            Err(s) => {
                *self.by_code.entry(format!("{:?}", s.code())).or_default() += 1;
                self.judge_status(
                    g,
                    g.class,
                    g.expect.as_ref(),
                    s.code() as i32,
                    s.message(),
                    None,
                );
                if let Req::RecordUsageBatch(b) = &g.req
                    && !is_5xx(s.code() as i32)
                    && (1..=1000).contains(&b.items.len())
                    && g.items.iter().any(|i| i.0 != Class::Bad)
                {
                    self.add(
                        "batch failed as a whole instead of per item (R21)",
                        g,
                        format!("{:?}: {}", s.code(), short(s.message())),
                    );
                }
                false
            }
            Ok(reply) => {
                *self.by_code.entry("Ok".to_owned()).or_default() += 1;
                if let Req::RecordUsageBatch(_) = &g.req {
                    if reply.items.len() != g.items.len() {
                        self.add(
                            "batch answered a different number of items",
                            g,
                            format!("{} results for {} items", reply.items.len(), g.items.len()),
                        );
                        return true;
                    }
                    let mut any_ok = false;
                    for (i, (r, (class, expect))) in reply.items.iter().zip(&g.items).enumerate() {
                        match r {
                            None => {
                                any_ok = true;
                                if *class == Class::Bad {
                                    self.add(
                                        "known-invalid batch item accepted",
                                        g,
                                        format!("items[{i}] ok"),
                                    );
                                    // Blame the item, not the whole batch.
                                    let prefix = format!("items[{i}].");
                                    if let Some(o) = self.offences.last_mut() {
                                        o.why = g
                                            .whys
                                            .iter()
                                            .filter(|w| w.starts_with(&prefix))
                                            .cloned()
                                            .collect::<Vec<_>>()
                                            .join("; ");
                                    }
                                }
                            }
                            Some((code, msg)) => {
                                self.judge_status(g, *class, expect.as_ref(), *code, msg, Some(i))
                            }
                        }
                    }
                    return any_ok;
                }
                if g.class == Class::Bad {
                    self.add("known-invalid request accepted", g, "OK".to_owned());
                }
                true
            }
        }
    }

    /// The offences grouped by what went wrong, each group with one example.
    fn render(&self) -> String {
        let mut groups: BTreeMap<(String, String, String), (usize, &Offence)> = BTreeMap::new();
        for o in &self.offences {
            // Group on the answer with quoted input and digits blurred.
            let mut blurred = blur_numbers(&o.got);
            if let Some(i) = blurred.find("(got ") {
                blurred.truncate(i);
            }
            let blurred = blur_quoted(&blurred);
            let why = why_kind(&o.why);
            let e = groups
                .entry((
                    o.what.to_owned(),
                    o.rpc.to_owned(),
                    format!("{why} | {}", blurred.chars().take(120).collect::<String>()),
                ))
                .or_insert((0, o));
            e.0 += 1;
        }
        let mut s = String::new();
        for ((what, rpc, _), (n, o)) in &groups {
            let _ = writeln!(
                s,
                "- [{what}] {rpc} ×{n} — bad: {}\n    e.g. got: {}\n    input: {}",
                why_kind(&o.why),
                o.got,
                o.input.chars().take(400).collect::<String>()
            );
        }
        s
    }
}

// ---------------------------------------------------------------------------------------
// State of the three databases.

struct Dbs {
    ledger: PgConnection,
    payments: PgConnection,
    recharge: PgConnection,
}

type Snapshot = BTreeMap<String, (i64, String)>;

const NOT_STATE: &str = "('outbox', 'processed_events', '_sqlx_migrations')";

async fn digest(conn: &mut PgConnection, db: &str, out: &mut Snapshot) {
    let tables: Vec<String> = sqlx::query_scalar(&format!(
        "SELECT tablename::text FROM pg_tables WHERE schemaname = 'public'
         AND tablename NOT IN {NOT_STATE} AND tablename NOT LIKE 'sandbox%' ORDER BY 1"
    ))
    .fetch_all(&mut *conn)
    .await
    .unwrap();
    for t in tables {
        let row: (i64, String) = sqlx::query_as(&format!(
            "SELECT count(*), coalesce(md5(string_agg(x::text, '|' ORDER BY x::text)), '') FROM \"{t}\" x"
        ))
        .fetch_one(&mut *conn)
        .await
        .unwrap();
        out.insert(format!("{db}.{t}"), row);
    }
}

impl Dbs {
    async fn open(sys: &System) -> Dbs {
        Dbs {
            ledger: sys.ledger.db().await,
            payments: sys.payments.db().await,
            recharge: sys.recharge_db().await,
        }
    }

    async fn snapshot(&mut self) -> Snapshot {
        let mut s = Snapshot::new();
        digest(&mut self.ledger, "ledger", &mut s).await;
        digest(&mut self.payments, "payments", &mut s).await;
        digest(&mut self.recharge, "recharge", &mut s).await;
        s
    }

    /// Work the daemons still have to do on their own (events to relay, charges to
    /// settle or credit, top-ups in flight, re-checks scheduled).
    async fn in_flight(&mut self) -> i64 {
        let l: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
            .fetch_one(&mut self.ledger)
            .await
            .unwrap();
        let p: i64 = sqlx::query_scalar(
            "SELECT (SELECT count(*) FROM outbox) + (SELECT count(*) FROM charges
               WHERE status IN ('PROCESSING', 'PENDING')
                  OR (purpose = 'PURCHASE' AND status = 'SUCCEEDED' AND ledger_entry_id IS NULL))",
        )
        .fetch_one(&mut self.payments)
        .await
        .unwrap();
        let r: i64 = sqlx::query_scalar(
            "SELECT (SELECT count(*) FROM outbox)
                  + (SELECT count(*) FROM attempts WHERE status IN ('PENDING', 'CHARGING'))
                  + (SELECT count(*) FROM settings WHERE enabled AND retry_at IS NOT NULL)",
        )
        .fetch_one(&mut self.recharge)
        .await
        .unwrap();
        l + p + r
    }

    /// Waits until the system has nothing left to do by itself and two snapshots a moment
    /// apart agree; `None` if that does not happen within `wait`.
    async fn quiet(&mut self, sys: &System, wait: Duration) -> Option<Snapshot> {
        let deadline = Instant::now() + wait;
        loop {
            let a = self.snapshot().await;
            let busy =
                self.in_flight().await + i64::from(queue_depth(&sys.recharge_opts.queue).await);
            tokio::time::sleep(Duration::from_millis(300)).await;
            let busy2 = self.in_flight().await;
            let b = self.snapshot().await;
            if busy == 0 && busy2 == 0 && a == b {
                return Some(b);
            }
            if Instant::now() > deadline {
                return None;
            }
        }
    }
}

fn diff(before: &Snapshot, after: &Snapshot) -> Vec<String> {
    let mut out = Vec::new();
    for (k, a) in after {
        match before.get(k) {
            Some(b) if b == a => {}
            Some(b) => out.push(format!(
                "{k}: {} rows -> {} rows (content changed)",
                b.0, a.0
            )),
            None => out.push(format!("{k}: appeared")),
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// The system under attack.

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

async fn card(c: &mut Clients, account: &str, number: &str, make_default: bool) -> String {
    c.payments
        .add_payment_method(ppb::AddPaymentMethodRequest {
            account_id: account.into(),
            method: Some(ppb::add_payment_method_request::Method::Card(
                ppb::CardDetails {
                    number: number.into(),
                    exp_month: 12,
                    exp_year: 2034,
                    cvc: "123".into(),
                },
            )),
            make_default,
            processor_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .payment_method_id
}

async fn create(c: &mut Clients, id: &str, mode: lpb::BillingMode) {
    c.ledger
        .create_account(lpb::CreateAccountRequest {
            account_id: id.into(),
            billing_mode: mode as i32,
            display_name: format!("{id} Inc."),
        })
        .await
        .unwrap();
}

async fn purchase(
    c: &mut Clients,
    account: &str,
    amount: &str,
    key: &str,
) -> ppb::PurchaseCreditsResponse {
    c.payments
        .purchase_credits(raw::purchase(account, amount, key))
        .await
        .unwrap()
        .into_inner()
}

/// Four accounts covering the money paths: a prepaid customer with a card, credits and
/// auto-recharge on; one whose default is a bank account (ACH) with a card on file; one
/// that never purchased; a contract account.
async fn seed_accounts(c: &mut Clients) -> (Vec<String>, Vec<(String, String)>) {
    let mut methods = Vec::new();
    create(c, "acme", lpb::BillingMode::Prepaid).await;
    methods.push((
        "acme".to_owned(),
        card(c, "acme", "4242424242424242", true).await,
    ));
    purchase(c, "acme", "500.00", "seed-acme-1").await;
    c.recharge
        .set_auto_recharge(rpb::SetAutoRechargeRequest {
            account_id: "acme".into(),
            enabled: true,
            threshold: "50".into(),
            target: "200".into(),
            monthly_limit: String::new(),
        })
        .await
        .unwrap();

    create(c, "bankco", lpb::BillingMode::Prepaid).await;
    methods.push((
        "bankco".to_owned(),
        card(c, "bankco", "5555555555554444", true).await,
    ));
    purchase(c, "bankco", "100.00", "seed-bankco-1").await;
    let bank = c
        .payments
        .add_payment_method(ppb::AddPaymentMethodRequest {
            account_id: "bankco".into(),
            method: Some(ppb::add_payment_method_request::Method::UsBankAccount(
                ppb::UsBankAccountDetails {
                    routing_number: "110000000".into(),
                    account_number: "000123456789".into(),
                    holder_name: "Bank Co".into(),
                },
            )),
            make_default: true,
            processor_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    methods.push(("bankco".to_owned(), bank.payment_method_id));

    create(c, "newbie", lpb::BillingMode::Prepaid).await;
    create(c, "bigcorp", lpb::BillingMode::Contract).await;
    let core = ["acme", "bankco", "newbie", "bigcorp"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    (core, methods)
}

async fn serving(addr: std::net::SocketAddr, service: &str) -> Result<(), String> {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    let mut h = tonic_health::pb::health_client::HealthClient::new(ch);
    let r = h
        .check(tonic_health::pb::HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
        .into_inner();
    if r.status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32 {
        Ok(())
    } else {
        Err(format!("status {}", r.status))
    }
}

/// (d): `accounts.balance` against the journal, per account.
async fn balances_off_journal(db: &mut PgConnection) -> Vec<String> {
    let rows: Vec<(String, Decimal, Decimal)> = sqlx::query_as(
        "SELECT a.account_id, a.balance,
                COALESCE(sum(CASE e.kind WHEN 'CREDIT' THEN e.amount ELSE -e.amount END), 0)
         FROM accounts a LEFT JOIN entries e USING (account_id)
         GROUP BY a.account_id, a.balance ORDER BY 1",
    )
    .fetch_all(db)
    .await
    .unwrap();
    rows.into_iter()
        .filter(|(_, b, j)| b != j)
        .map(|(a, b, j)| format!("{a}: balance {b} but journal sums to {j}"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_clients_never_get_internal_errors_and_rejected_requests_change_nothing_spec4_r21_r22()
 {
    let seed: u64 = env_or("HOSTILE_SEED", DEFAULT_SEED);
    let total: usize = env_or("HOSTILE_REQUESTS", DEFAULT_REQUESTS);
    eprintln!(
        "hostile: HOSTILE_SEED={seed} HOSTILE_REQUESTS={total} \
         (replay: HOSTILE_SEED={seed} cargo test -p credits-tests --test hostile)"
    );
    let started = Instant::now();
    let sys = System::start(1).await;
    let mut c = Clients::connect(&sys).await;
    let (core, methods) = seed_accounts(&mut c).await;
    let mut world = World::new(seed, core, methods);
    let mut dbs = Dbs::open(&sys).await;
    let mut report = Report::default();

    let per_round = total.div_ceil(ROUNDS);
    let invalid_per_round = per_round * INVALID_SHARE_PERCENT / 100;
    let mixed_per_round = per_round - invalid_per_round;
    let (mut runs_checked, mut runs_skipped, mut checked_requests) = (0, 0, 0);

    for round in 0..ROUNDS {
        for _ in 0..mixed_per_round {
            let mode = match world.rng.below(100) {
                0..45 => Mode::Valid,
                45..75 => Mode::OneBad,
                _ => Mode::Chaos,
            };
            let g = world.generate(mode);
            let res = tokio::time::timeout(CALL_TIMEOUT, send(&mut c, &g.req))
                .await
                .map_err(|_| ());
            report.judge(&g, &res);
            if let Ok(Ok(reply)) = &res {
                world.learn(&g.req, reply);
            }
        }

        // (b): a run of known-invalid requests on a quiet system, a snapshot around each.
        let Some(mut before) = dbs.quiet(&sys, Duration::from_secs(20)).await else {
            eprintln!(
                "hostile: round {round}: the system did not go quiet; run of invalid requests skipped"
            );
            runs_skipped += 1;
            continue;
        };
        runs_checked += 1;
        let mut settled = true;
        for _ in 0..invalid_per_round {
            if !settled {
                break;
            }
            let kind = world.rng.below(KINDS);
            let g = world.gen_kind(kind, Mode::OneBad);
            assert_eq!(g.class, Class::Bad, "generator: {:?}", g.req);
            let res = tokio::time::timeout(CALL_TIMEOUT, send(&mut c, &g.req))
                .await
                .map_err(|_| ());
            let accepted = report.judge(&g, &res);
            if let Ok(Ok(reply)) = &res {
                world.learn(&g.req, reply);
            }
            checked_requests += 1;
            let after = dbs.snapshot().await;
            let changed = diff(&before, &after);
            if !changed.is_empty() {
                // An accepted one is already reported as accepted; (b) is about refusals.
                if !accepted {
                    report.add("(b) rejected request changed rows", &g, changed.join("; "));
                }
            }
            before = after;
            if accepted || !changed.is_empty() {
                // What it set going (an event, a top-up) must not be blamed on the next
                // request: start again from a quiet system.
                match dbs.quiet(&sys, Duration::from_secs(20)).await {
                    Some(s) => before = s,
                    None => settled = false,
                }
            }
        }
        if !settled {
            eprintln!("hostile: round {round}: did not go quiet again; rest of the run skipped");
            continue;
        }
        // Effects that arrive later (an event relayed, a top-up started) count too.
        tokio::time::sleep(Duration::from_millis(400)).await;
        let after = dbs.snapshot().await;
        let changed = diff(&before, &after);
        if !changed.is_empty() {
            report.offences.push(Offence {
                what: "(b) rows changed after a run of only rejected requests",
                rpc: "(run)",
                input: format!("round {round}"),
                why: String::new(),
                got: changed.join("; "),
            });
        }
    }
    assert!(
        runs_checked > runs_skipped,
        "the system went quiet for only {runs_checked} of {ROUNDS} runs: (b) was barely checked"
    );

    // (c): every daemon task still running and serving.
    let mut dead = Vec::new();
    if sys.ledger.task.is_finished() {
        dead.push("ledger task ended".to_owned());
    }
    if sys.payments.task.is_finished() {
        dead.push("payments task ended".to_owned());
    }
    for (i, r) in sys.recharge.iter().enumerate() {
        if r.task.is_finished() {
            dead.push(format!("recharge[{i}] task ended"));
        }
    }
    for (addr, svc) in [
        (sys.ledger.addr, "credits.ledger.v1.LedgerService"),
        (sys.payments.addr, "credits.payments.v1.PaymentsService"),
        (
            sys.recharge[0].addr,
            "credits.recharge.v1.AutoRechargeService",
        ),
    ] {
        for s in [svc, ""] {
            if let Err(e) = serving(addr, s).await {
                dead.push(format!("{svc} health({s:?}): {e}"));
            }
        }
    }
    for d in dead {
        report.offences.push(Offence {
            what: "(c) daemon no longer running/serving",
            rpc: "(health)",
            input: String::new(),
            why: String::new(),
            got: d,
        });
    }

    // (d): balance = sum of journal, once the system has settled.
    let _ = dbs.quiet(&sys, Duration::from_secs(20)).await;
    for m in balances_off_journal(&mut dbs.ledger).await {
        report.offences.push(Offence {
            what: "(d) balance differs from the journal",
            rpc: "(ledger db)",
            input: String::new(),
            why: String::new(),
            got: m,
        });
    }

    let elapsed = started.elapsed();
    eprintln!(
        "hostile: {} requests in {elapsed:.1?}; answers by status: {:?}; {runs_checked} quiet runs \
         ({checked_requests} requests snapshot-checked), {runs_skipped} skipped; {} accounts, \
         {} methods, {} charges, {} holds known",
        report.sent,
        report.by_code,
        world.accounts.len(),
        world.methods.len(),
        world.charges.len(),
        world.holds.len(),
    );

    // Stop the daemons (a panic there is one more finding, not a lost report).
    if let Err(e) = tokio::spawn(sys.stop()).await {
        report.offences.push(Offence {
            what: "(c) a daemon did not stop cleanly",
            rpc: "(shutdown)",
            input: String::new(),
            why: String::new(),
            got: format!("{e}"),
        });
    }

    if !report.offences.is_empty() {
        let rendered = report.render();
        let path =
            std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("hostile-{seed}.txt"));
        let mut full = String::new();
        for o in &report.offences {
            let _ = writeln!(
                full,
                "[{}] {}\n  bad:   {}\n  got:   {}\n  input: {}",
                o.what, o.rpc, o.why, o.got, o.input
            );
        }
        let _ = std::fs::write(&path, &full);
        panic!(
            "{} offences in {} requests (HOSTILE_SEED={seed}; every one in {}):\n{rendered}",
            report.offences.len(),
            report.sent,
            path.display()
        );
    }
}

// ---------------------------------------------------------------------------------------
// Focused checks.

async fn ledger_with_credit(account: &str, amount: &str) -> (Ledger, LedgerServiceClient<Channel>) {
    let ledger = Ledger::start().await;
    let mut c = ledger.client().await;
    c.create_account(lpb::CreateAccountRequest {
        account_id: account.into(),
        billing_mode: lpb::BillingMode::Prepaid as i32,
        display_name: String::new(),
    })
    .await
    .unwrap();
    c.add_credits(lpb::AddCreditsRequest {
        reference: "ch_seed".into(),
        ..raw::credit(account, amount, lpb::CreditSource::Purchase, "seed")
    })
    .await
    .unwrap();
    (ledger, c)
}

/// R21: one caller's bad item never fails another caller's request. 100 well-formed
/// RecordUsage calls race with callers sending a NUL in `description`; group commit puts
/// them in the same batches, and every well-formed one must still be recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_callers_nul_never_fails_another_callers_usage_in_group_commit_r21() {
    let (ledger, c) = ledger_with_credit("racer", "1000").await;
    let mut calls = Vec::new();
    for i in 0..130 {
        let mut c = c.clone();
        // Three calls in every thirteen (30 of 130, interleaved) are hostile.
        let hostile = i % 13 == 3 || i % 13 == 7 || i % 13 == 11;
        let req = if hostile {
            usage(
                "racer",
                "0.5",
                &format!("bad-{i}"),
                &format!("nul\0in description {i}"),
            )
        } else {
            usage("racer", "1.25", &format!("good-{i}"), "chat completions")
        };
        calls.push(tokio::spawn(async move {
            (hostile, c.record_usage(req).await.map(|r| r.into_inner()))
        }));
    }
    let mut good_failures = Vec::new();
    let mut bad_answers = Vec::new();
    let (mut good_ok, mut bad_n) = (0, 0);
    for call in calls {
        let (hostile, res) = call.await.unwrap();
        match (hostile, res) {
            (false, Ok(_)) => good_ok += 1,
            (false, Err(s)) => good_failures.push(format!("{:?}: {}", s.code(), s.message())),
            (true, res) => {
                bad_n += 1;
                match res {
                    Err(s)
                        if s.code() == Code::InvalidArgument
                            && s.message().contains("description") => {}
                    Err(s) => bad_answers.push(format!("{:?}: {}", s.code(), s.message())),
                    Ok(_) => bad_answers.push("OK (a NUL was accepted)".to_owned()),
                }
            }
        }
    }
    let mut db = ledger.db().await;
    let (balance, entries): (Decimal, i64) = sqlx::query_as(
        "SELECT a.balance, (SELECT count(*) FROM entries e WHERE e.account_id = a.account_id)
         FROM accounts a WHERE account_id = 'racer'",
    )
    .fetch_one(&mut db)
    .await
    .unwrap();
    let task_alive = !ledger.task.is_finished();
    ledger.stop().await;

    let mut problems = Vec::new();
    if good_ok != 100 {
        problems.push(format!(
            "{} of 100 well-formed RecordUsage calls failed: {:?}",
            100 - good_ok,
            dedup(&good_failures)
        ));
    }
    if !bad_answers.is_empty() {
        problems.push(format!(
            "{} of {bad_n} NUL-description calls were not INVALID_ARGUMENT naming description: {:?}",
            bad_answers.len(),
            dedup(&bad_answers)
        ));
    }
    let expected: Decimal = Decimal::from(1000) - Decimal::new(125, 2) * Decimal::from(good_ok);
    if balance != expected || entries != 1 + good_ok as i64 {
        problems.push(format!(
            "balance {balance} with {entries} entries; expected {expected} with {} entries",
            1 + good_ok
        ));
    }
    if !task_alive {
        problems.push("the ledger task ended".to_owned());
    }
    assert!(
        problems.is_empty(),
        "R21 group-commit isolation:\n{}",
        problems.join("\n")
    );
}

fn dedup(v: &[String]) -> Vec<String> {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for s in v {
        *counts.entry(s.as_str()).or_default() += 1;
    }
    counts
        .into_iter()
        .map(|(s, n)| format!("{n}× {s}"))
        .collect()
}

/// R21: a batch answers per item; one item with a NUL fails alone, the others are recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nul_item_fails_alone_in_its_usage_batch_r21() {
    let (ledger, mut c) = ledger_with_credit("batcher", "100").await;
    let items = vec![
        usage("batcher", "1", "b-1", "ok one"),
        usage("batcher", "2", "b-2", "ok two"),
        usage("batcher", "4", "b-3", "bad\0item"),
        usage("batcher", "8", "b-4", "ok four"),
    ];
    let res = c
        .record_usage_batch(lpb::RecordUsageBatchRequest { items })
        .await;
    let balance = c
        .get_account(lpb::GetAccountRequest {
            account_id: "batcher".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .balance;
    ledger.stop().await;
    let results = match res {
        Ok(r) => r.into_inner().results,
        Err(s) => panic!(
            "the whole batch failed with {:?}: {} — expected per-item results (R21)",
            s.code(),
            s.message()
        ),
    };
    assert_eq!(results.len(), 4);
    use lpb::record_usage_batch_result::Result as R;
    for (i, r) in results.iter().enumerate() {
        match (i, &r.result) {
            (2, Some(R::Error(s))) => {
                assert_eq!(s.code, Code::InvalidArgument as i32, "items[2]: {s:?}");
                assert!(s.message.contains("description"), "items[2]: {s:?}");
            }
            (2, other) => panic!("items[2] (NUL) answered {other:?}"),
            (_, Some(R::Ok(_))) => {}
            (_, other) => panic!("items[{i}] (well-formed) answered {other:?}"),
        }
    }
    assert_eq!(balance, "89.00");
}

/// R22: a whole-cents amount written with trailing zeros is the same amount, for
/// validation, storage and idempotency comparison, on the real money paths.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailing_zero_amounts_are_the_same_amount_on_money_paths_r22() {
    let sys = System::start(1).await;
    let mut c = Clients::connect(&sys).await;
    create(&mut c, "zeros", lpb::BillingMode::Prepaid).await;
    card(&mut c, "zeros", "4242424242424242", true).await;
    let mut problems = Vec::new();

    let p = c
        .payments
        .purchase_credits(ppb::PurchaseCreditsRequest {
            account_id: "zeros".into(),
            amount: "25.000".into(),
            payment_method_id: String::new(),
            idempotency_key: "buy-1".into(),
        })
        .await;
    match p {
        Ok(p) => {
            let p = p.into_inner();
            let ch = p.charge.unwrap();
            if ch.amount != "25.00" || p.balance != "25.00" {
                problems.push(format!(
                    "PurchaseCredits \"25.000\": charge {} balance {}",
                    ch.amount, p.balance
                ));
            }
            // Same key, same amount spelled "25.00": the first result, not ALREADY_EXISTS.
            match c
                .payments
                .purchase_credits(raw::purchase("zeros", "25.00", "buy-1"))
                .await
            {
                Ok(again)
                    if again.get_ref().charge.as_ref().map(|c| &c.charge_id)
                        == Some(&ch.charge_id) => {}
                Ok(again) => problems.push(format!(
                    "replay as \"25.00\" made another charge: {:?}",
                    again.into_inner().charge
                )),
                Err(s) => problems.push(format!(
                    "replay as \"25.00\": {:?}: {}",
                    s.code(),
                    s.message()
                )),
            }
        }
        Err(s) => problems.push(format!(
            "PurchaseCredits \"25.000\": {:?}: {}",
            s.code(),
            s.message()
        )),
    }

    match c
        .payments
        .charge(ppb::ChargeRequest {
            account_id: "zeros".into(),
            amount: "40.010".into(),
            payment_method_id: String::new(),
            idempotency_key: "charge-1".into(),
            description: "dedicated endpoint".into(),
            top_up: false,
        })
        .await
    {
        Ok(ch) if ch.get_ref().amount == "40.01" => {}
        Ok(ch) => problems.push(format!(
            "Charge \"40.010\" charged {}",
            ch.into_inner().amount
        )),
        Err(s) => problems.push(format!(
            "Charge \"40.010\": {:?}: {}",
            s.code(),
            s.message()
        )),
    }

    match c
        .recharge
        .set_auto_recharge(rpb::SetAutoRechargeRequest {
            account_id: "zeros".into(),
            enabled: true,
            threshold: "10.000".into(),
            target: "50.000".into(),
            monthly_limit: String::new(),
        })
        .await
    {
        Ok(s) if s.get_ref().threshold == "10.00" && s.get_ref().target == "50.00" => {}
        Ok(s) => {
            let s = s.into_inner();
            problems.push(format!(
                "SetAutoRecharge \"10.000\"/\"50.000\" stored {}/{}",
                s.threshold, s.target
            ));
        }
        Err(s) => problems.push(format!(
            "SetAutoRecharge \"10.000\"/\"50.000\": {:?}: {}",
            s.code(),
            s.message()
        )),
    }
    sys.stop().await;
    assert!(problems.is_empty(), "R22:\n{}", problems.join("\n"));
}
