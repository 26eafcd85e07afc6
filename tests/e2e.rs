//! End to end: the real `credits-ledger`, `credits-payments`, `credits-recharge` and
//! `credits` binaries as processes, driven only through gRPC (with `credits-client`) and
//! RabbitMQ like an outside client. Every product rule R1–R14 is walked at least once, each
//! rule (or small group of rules) in its own test with its own daemons, so one failure
//! does not hide the rules after it. Every test ends with every daemon exiting 0 on
//! SIGTERM and no test card number in any daemon's log (R14).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use credits_common::grpc::lazy_channel;
use credits_proto::ledger::v1 as lpb;
use credits_proto::ledger::v1::ledger_service_client::LedgerServiceClient;
use credits_tests::api::{
    Access, Api, AttemptStatus, BillingMode, Code, DisabledReason, EntryKind, UsageCategory,
    UsageRecord, acct, key, money,
};
use credits_tests::procs::{Daemons, Proc, bin, free_port, wait_healthy};
use credits_tests::{EventTap, eventually, http_get, pg_base, unique};

const WAIT: Duration = Duration::from_secs(30);

/// The sandbox cards the tests use: none may ever reach a log (R14).
const CARD_NUMBERS: [&str; 2] = ["4242424242424242", "4000000000000002"];

async fn start() -> (Daemons, Api) {
    let d = Daemons::start().await;
    let c = d.api();
    (d, c)
}

/// R14 and a clean shutdown, for every test: each daemon exits 0 on SIGTERM and no card
/// number reached its log. Returns the logs (ledger, payments, recharge).
async fn stop(d: Daemons) -> [String; 3] {
    let logs = d.stop().await;
    for log in &logs {
        assert!(
            CARD_NUMBERS.iter().all(|n| !log.contains(n)),
            "card number in a daemon log"
        );
    }
    logs
}

/// A prepaid account with a Visa as its default.
async fn with_card(c: &Api, id: &str) -> credits_tests::api::PaymentMethod {
    c.create_account(id, BillingMode::Prepaid).await;
    let visa = c.add_card(id, "4242424242424242", false).await;
    assert!(visa.is_default);
    visa
}

/// The daemons, and "acme" [`with_card`] that bought `amount` (key "p1").
async fn start_with_acme(amount: &str) -> (Daemons, Api) {
    let (d, c) = start().await;
    with_card(&c, "acme").await;
    c.buy("acme", amount, "p1").await;
    (d, c)
}

/// Asserts that enabling auto-recharge on `id` (below `threshold` up to `target`) is
/// refused with `code`.
async fn enable_refused(c: &Api, id: &str, threshold: &str, target: &str, code: Code) {
    let refused = c.enable_recharge(id, threshold, target).await;
    let err = refused.expect_err("enabling auto-recharge is refused");
    assert_eq!(err.code(), code, "{err}");
}

#[tokio::test]
async fn every_rpc_needs_the_token_and_the_first_purchase_opens_access_r1_r3() {
    let (d, c) = start().await;

    // Auth: every RPC but health needs the bearer token.
    let anon = Api::connect(&d.ledger_url, &d.payments_url, &d.recharge_url, None);
    let err = anon.ledger().get_account(&acct("x")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    // R3: no access before the first purchase; purchases are at least $5.00.
    c.create_account("acme", BillingMode::Prepaid).await;
    let a = c.access("acme").await;
    assert!(!a.allowed);
    assert_eq!(a.access, Access::PendingFirstPurchase);
    let visa = c.add_card("acme", "4242424242424242", false).await;
    assert!(visa.is_default);
    assert_eq!(
        c.try_buy("acme", "4.99", "p0").await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    // R1: whole cents for charges, up to 9 decimals in the ledger; never exponents.
    assert_eq!(
        c.try_buy("acme", "5.001", "p0").await.unwrap_err().code(),
        Code::InvalidArgument
    );
    // Raw prost: the typed client refuses an exponent before sending; the service must too.
    let mut raw = LedgerServiceClient::new(lazy_channel(&d.ledger_url, Some(&d.token)).unwrap());
    assert_eq!(
        raw.record_usage(lpb::RecordUsageRequest {
            account_id: "acme".into(),
            category: lpb::UsageCategory::Other as i32,
            amount: "1e-3".into(),
            idempotency_key: "bad".into(),
            description: String::new(),
        })
        .await
        .unwrap_err()
        .code(),
        Code::InvalidArgument
    );
    let bought = c.buy("acme", "25.00", "p1").await;
    assert_eq!(bought.balance, Some(money("25.00")));
    assert!(c.access("acme").await.allowed);
    stop(d).await;
}

#[tokio::test]
async fn the_same_key_returns_the_first_purchase_and_refuses_another_r12() {
    let (d, c) = start().await;
    with_card(&c, "acme").await;
    let bought = c.buy("acme", "25.00", "p1").await;
    // R12: the same key returns the first result; a different request is refused.
    let again = c.try_buy("acme", "25.00", "p1").await.unwrap();
    assert_eq!(again.charge.charge_id, bought.charge.charge_id);
    assert_eq!(
        c.try_buy("acme", "26.00", "p1").await.unwrap_err().code(),
        Code::AlreadyExists
    );
    assert_eq!(c.balance("acme").await, money("25.00"));
    stop(d).await;
}

#[tokio::test]
async fn usage_in_every_category_is_priced_in_fractions_of_a_cent_and_counted_r1_r2() {
    let (d, c) = start_with_acme("25.00").await;
    // R2 + R1: usage in every category, priced in fractions of a cent.
    for (i, cat) in [
        UsageCategory::ApiRequests,
        UsageCategory::DedicatedEndpoints,
        UsageCategory::FineTuning,
        UsageCategory::Evaluations,
        UsageCategory::Other,
    ]
    .into_iter()
    .enumerate()
    {
        let r = c
            .ledger()
            .record_usage(&UsageRecord {
                account_id: acct("acme"),
                category: cat,
                amount: money("0.000125"),
                idempotency_key: key(&format!("cat{i}")),
                description: String::new(),
            })
            .await
            .unwrap();
        assert_eq!(r.entry.kind, EntryKind::Usage(cat));
    }
    assert_eq!(c.balance("acme").await, money("24.999375"));

    // Metrics are served: the ledger's own, and per RPC its rate by status code and its
    // latency histogram (docs/operations.md).
    assert!(
        c.ledger().get_account(&acct("nobody")).await.is_err(),
        "an unknown account, for a NOT_FOUND"
    );
    let metrics = http_get(&d.metrics_url, "/metrics", None).await;
    assert!(
        metrics.contains("credits_ledger_usage_entries_total"),
        "{metrics}"
    );
    let ledger = "service=\"credits.ledger.v1.LedgerService\"";
    for line in [
        format!("credits_grpc_requests_total{{{ledger},method=\"RecordUsage\",code=\"OK\"}}"),
        format!("credits_grpc_requests_total{{{ledger},method=\"GetAccount\",code=\"NOT_FOUND\"}}"),
        format!(
            "credits_grpc_request_duration_seconds_bucket{{{ledger},method=\"RecordUsage\",le=\"0.005\"}}"
        ),
    ] {
        assert!(metrics.contains(&line), "{line} in\n{metrics}");
    }
    stop(d).await;
}

#[tokio::test]
async fn crossing_below_the_threshold_tops_up_once_to_exactly_the_target_r6_r7_r8() {
    let (d, c) = start_with_acme("25.00").await;
    let mut tap = EventTap::bind(&d.exchange, "#").await;
    // R6: settings are validated; R7 + R8: crossing below 10 tops up once to exactly 50.
    enable_refused(&c, "acme", "10", "12", Code::InvalidArgument).await;
    c.enable_recharge("acme", "10", "50").await.unwrap();
    c.use_credits("acme", "15.01", "cross").await; // 9.99
    let a = c.settled_attempts("acme", 1).await;
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].amount, money("40.01"));
    assert_eq!(c.balance("acme").await, money("50.00"));
    let crossed = tap.expect("ledger.balance.threshold_crossed", WAIT).await;
    assert_eq!(crossed["data"]["balance_after"], "9.99");
    tap.expect("recharge.attempt.succeeded", WAIT).await;
    stop(d).await;
}

#[tokio::test]
async fn usage_that_outruns_a_top_up_still_ends_at_or_above_the_threshold_r9() {
    let (d, c) = start_with_acme("50.00").await;
    c.enable_recharge("acme", "10", "50").await.unwrap();
    // R9: usage outruns a top-up: the balance still ends at or above the threshold.
    c.use_credits("acme", "41", "r9a").await;
    c.use_credits("acme", "45", "r9b").await;
    eventually(WAIT, "R9 top-ups", || async {
        let b = c.balance("acme").await;
        let a = c.attempts("acme").await;
        let idle = a.iter().all(|a| a.status == AttemptStatus::Succeeded);
        (idle && b >= money("10")).then_some(())
    })
    .await;
    stop(d).await;
}

#[tokio::test]
async fn histories_are_newest_first_and_paged_r13() {
    let (d, c) = start_with_acme("25.00").await;
    c.buy("acme", "5.00", "p2").await;
    c.use_credits("acme", "1", "u1").await;
    c.use_credits("acme", "2", "u2").await;
    // R13: histories are newest first and paged.
    let page = c
        .ledger()
        .list_entries(&acct("acme"), 2, None)
        .await
        .unwrap();
    assert_eq!(page.items.len(), 2);
    assert!(!page.is_last());
    let next = c
        .ledger()
        .list_entries(&acct("acme"), 2, page.next_page_token.as_deref())
        .await
        .unwrap();
    assert!(next.items[0].created_at.timestamp() <= page.items[1].created_at.timestamp());
    assert!(
        !c.payments()
            .list_charges(&acct("acme"), 1, None)
            .await
            .unwrap()
            .is_last()
    );
    stop(d).await;
}

#[tokio::test]
async fn a_bank_account_as_default_turns_auto_recharge_off_and_it_stays_off_r10() {
    let (d, c) = start_with_acme("25.00").await;
    let mut tap = EventTap::bind(&d.exchange, "#").await;
    c.enable_recharge("acme", "10", "50").await.unwrap();
    // R10: a bank account as default turns auto-recharge off and it stays off.
    let ach = c.add_bank("acme", true).await;
    assert!(ach.is_default);
    let off = tap.expect("recharge.settings.disabled", WAIT).await;
    assert_eq!(off["data"]["reason"], "DEFAULT_PAYMENT_METHOD_NOT_CARD");
    enable_refused(&c, "acme", "10", "50", Code::FailedPrecondition).await;
    stop(d).await;
}

#[tokio::test]
async fn usage_past_zero_is_recorded_suspends_and_credits_reactivate_r4() {
    let (d, c) = start().await;
    let mut tap = EventTap::bind(&d.exchange, "#").await;
    let visa = with_card(&c, "acme").await;
    c.buy("acme", "25.00", "p1").await;
    // The bank account is the default while the balance runs out (as after R10).
    c.add_bank("acme", true).await;
    // R4: usage past zero is recorded; access is suspended, and comes back with credits.
    let b = c.balance("acme").await;
    let over = (b + money("1")).to_wire();
    let r = c.use_credits("acme", &over, "r4").await;
    assert_eq!(r.balance, money("-1.00"));
    assert!(!r.allowed);
    tap.expect("ledger.account.suspended", WAIT).await;
    c.set_default("acme", &visa.payment_method_id).await;
    c.buy("acme", "5.00", "p2").await;
    assert!(c.access("acme").await.allowed);
    tap.expect("ledger.account.reactivated", WAIT).await;
    stop(d).await;
}

#[tokio::test]
async fn contract_accounts_are_never_suspended_and_get_no_auto_recharge_r5() {
    let (d, c) = start().await;
    // R5: contract accounts are never suspended and get no auto-recharge.
    c.create_account("bigco", BillingMode::Contract).await;
    let r = c
        .ledger()
        .record_usage(&UsageRecord {
            account_id: acct("bigco"),
            category: UsageCategory::FineTuning,
            amount: money("500"),
            idempotency_key: key("k"),
            description: String::new(),
        })
        .await
        .unwrap();
    assert!(r.allowed);
    assert_eq!(r.balance, money("-500.00"));
    c.add_card("bigco", "4242424242424242", true).await;
    enable_refused(&c, "bigco", "10", "50", Code::FailedPrecondition).await;
    stop(d).await;
}

#[tokio::test]
async fn three_declined_top_ups_turn_auto_recharge_off_r11() {
    let (d, c) = start().await;
    // R11: three declined top-ups turn auto-recharge off with REPEATED_FAILURES.
    c.create_account("broke", BillingMode::Prepaid).await;
    c.add_card("broke", "4000000000000002", true).await;
    c.enable_recharge("broke", "10", "50").await.unwrap();
    let failed = c.settled_attempts("broke", 3).await;
    assert!(
        failed
            .iter()
            .all(|a| a.failure_code.as_deref() == Some("card_declined"))
    );
    let s = eventually(WAIT, "auto-recharge off", || async {
        let s = c.recharge().get_auto_recharge(&acct("broke")).await.ok()?;
        (!s.enabled).then_some(s)
    })
    .await;
    assert_eq!(s.disabled_reason, DisabledReason::RepeatedFailures);
    stop(d).await;
}

#[tokio::test]
async fn card_numbers_never_reach_the_logs_and_every_daemon_exits_cleanly_r14() {
    let (d, c) = start_with_acme("25.00").await;
    c.add_card("acme", "4000000000000002", true).await;
    let declined = c.try_buy("acme", "10.00", "p2").await.unwrap();
    assert!(declined.entry.is_none());
    // R14: the card numbers never reached the logs (checked by `stop`); every daemon
    // exits 0 on SIGTERM.
    let logs = stop(d).await;
    assert!(
        logs[1].contains("payment method added"),
        "the payments log was captured"
    );
}

#[tokio::test]
async fn credits_up_runs_all_four_and_the_demo_tells_the_story() {
    let ports = [
        free_port(),
        free_port(),
        free_port(),
        free_port(),
        free_port(),
    ];
    let addr = |p: u16| format!("127.0.0.1:{p}");
    let prefix = unique("credits_t_up");
    let queue = unique("credits.recharge.up");
    let exchange = unique("credits.events.up");
    let up = Proc::spawn(
        "credits-up",
        "credits",
        &[
            "up",
            "--pg-url",
            &pg_base(),
            "--db-prefix",
            &prefix,
            "--exchange",
            &exchange,
            "--queue",
            &queue,
            "--ledger-addr",
            &addr(ports[0]),
            "--payments-addr",
            &addr(ports[1]),
            "--recharge-addr",
            &addr(ports[2]),
            "--portal-addr",
            &addr(ports[3]),
            "--portal-http-addr",
            &addr(ports[4]),
            "--metrics-addr",
            "off",
        ],
        &[],
    );
    let urls: Vec<String> = ports
        .iter()
        .map(|p| format!("http://127.0.0.1:{p}"))
        .collect();
    wait_healthy(&urls[0], "credits.ledger.v1.LedgerService", &up).await;
    wait_healthy(&urls[1], "credits.payments.v1.PaymentsService", &up).await;
    wait_healthy(&urls[2], "credits.recharge.v1.AutoRechargeService", &up).await;
    wait_healthy(&urls[3], "credits.portal.v1.PortalService", &up).await;
    assert!(up.logs().contains("credits is up"), "banner printed");

    let cli = |args: &[&str]| {
        let mut cmd = std::process::Command::new(bin("credits"));
        cmd.args([
            "--ledger",
            &urls[0],
            "--payments",
            &urls[1],
            "--recharge",
            &urls[2],
            "--portal",
            &urls[3],
        ])
        .args(args);
        cmd.output().expect("run credits")
    };
    let demo = cli(&["demo", "--account", "demo-e2e"]);
    let stdout = String::from_utf8_lossy(&demo.stdout);
    assert!(
        demo.status.success(),
        "demo failed: {stdout}\n{}",
        String::from_utf8_lossy(&demo.stderr)
    );
    assert!(stdout.contains("Bought $25.00"), "{stdout}");
    assert!(stdout.contains("charged the card once: $40.01"), "{stdout}");
    assert!(stdout.contains("balance now 50.00"), "{stdout}");
    assert!(stdout.contains("held 45.00, available 5.00"), "{stdout}");
    assert!(
        stdout.contains("auto-recharge charged $45.00 (target − available, R17)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("balance 51.80, available 51.80"),
        "{stdout}"
    );
    assert!(
        stdout.contains("reason DEFAULT_PAYMENT_METHOD_NOT_CARD"),
        "{stdout}"
    );

    // Operator commands: JSON output and exit codes scripts can rely on.
    let show = cli(&["accounts", "show", "demo-e2e", "--json"]);
    assert!(show.status.success());
    let v: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    assert_eq!(v["balance"], "51.80");
    assert_eq!(v["held"], "0.00");
    assert_eq!(v["access"], "ACTIVE");
    let holds = cli(&["holds", "list", "demo-e2e"]);
    assert!(String::from_utf8_lossy(&holds.stdout).contains("CAPTURED"));
    assert_eq!(
        cli(&["holds", "capture", "demo-e2e", "not-a-hold", "1"])
            .status
            .code(),
        Some(3),
        "a malformed hold id is INVALID_ARGUMENT"
    );
    let table = cli(&["recharge", "attempts", "demo-e2e"]);
    assert!(String::from_utf8_lossy(&table.stdout).contains("SUCCEEDED"));
    assert_eq!(cli(&["accounts", "show", "nobody"]).status.code(), Some(4));
    assert_eq!(
        cli(&["usage", "record", "demo-e2e", "12,50"]).status.code(),
        Some(3)
    );
    assert_eq!(
        cli(&["usage", "record"]).status.code(),
        Some(2),
        "usage errors are clap's 2"
    );
    assert_eq!(
        cli(&["purchase", "demo-e2e", "1.00"]).status.code(),
        Some(5)
    );
    // R29/R30 from the CLI: a grant (drawn before the purchased credits), the usage
    // summary, and the whole journal as CSV that sums to the balance.
    let granted = cli(&[
        "grants",
        "add",
        "demo-e2e",
        "2.50",
        "--reason",
        "Support credit",
        "--expires-in-days",
        "30",
        "--key",
        "cli-grant",
        "--json",
    ]);
    assert!(
        granted.status.success(),
        "{}",
        String::from_utf8_lossy(&granted.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&granted.stdout).unwrap();
    assert_eq!(v["category_or_source"], "GRANT");
    assert_eq!(v["balance"], "54.30");
    assert!(
        cli(&["usage", "record", "demo-e2e", "1", "--key", "after-grant"])
            .status
            .success()
    );
    let listed = cli(&["grants", "list", "demo-e2e", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(v[0]["reason"], "Support credit");
    assert_eq!(v[0]["remaining"], "1.50", "usage drew the grant first: {v}");
    assert_eq!(
        cli(&[
            "grants",
            "add",
            "demo-e2e",
            "1",
            "--reason",
            "x",
            "--expires",
            "yesterday"
        ])
        .status
        .code(),
        Some(3),
        "a bad expiry is INVALID_ARGUMENT"
    );
    let summary = cli(&["usage", "summary", "demo-e2e", "--last", "2", "--csv"]);
    let text = String::from_utf8_lossy(&summary.stdout);
    assert!(summary.status.success(), "{text}");
    assert!(text.starts_with("start,category,amount,count\n"), "{text}");
    assert!(text.contains(",API_REQUESTS,"), "{text}");
    let export = cli(&["accounts", "export", "demo-e2e"]);
    let csv = String::from_utf8_lossy(&export.stdout);
    assert!(export.status.success());
    assert_eq!(
        credits_tests::api::csv_amount_sum(&csv),
        "53.30".parse::<rust_decimal::Decimal>().unwrap(),
        "{csv}"
    );

    // R20: `credits portal-session` prints a link that opens the account's billing page.
    let session = cli(&["portal-session", "demo-e2e"]);
    assert!(session.status.success());
    let link = String::from_utf8_lossy(&session.stdout).trim().to_owned();
    let page = addr(ports[4]);
    let path = link
        .strip_prefix(&format!("http://{page}"))
        .unwrap_or_else(|| panic!("{link}"));
    // Two hops, as a browser takes them: the first sets a hop cookie and moves on by
    // itself; the second (from the page) opens the session.
    let first = http_get(&page, path, None).await;
    let hop = first
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: "))
        .and_then(|c| c.split(';').next())
        .unwrap_or_else(|| panic!("no hop cookie: {first}"))
        .to_owned();
    let next = first
        .split("url=")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap_or_else(|| panic!("no next hop: {first}"))
        .replace("&amp;", "&");
    let opened = http_get(&page, &next, Some(&hop)).await;
    assert!(
        opened.lines().next().unwrap_or_default().contains(" 200 ")
            && opened.contains("url=/billing"),
        "{opened}"
    );
    let cookie = opened
        .lines()
        .filter_map(|l| l.strip_prefix("set-cookie: "))
        .find(|c| c.starts_with("credits_portal="))
        .and_then(|c| c.split(';').next())
        .unwrap_or_else(|| panic!("no cookie: {opened}"))
        .to_owned();
    let billing = http_get(&page, "/billing", Some(&cookie)).await;
    assert!(
        billing.lines().next().unwrap_or_default().contains(" 200 "),
        "{billing}"
    );
    assert!(billing.contains("Billing settings") && billing.contains("demo-e2e"));
    assert!(
        billing.contains("$51.80"),
        "the demo's balance is on the page"
    );
    assert_eq!(cli(&["portal-session", "nobody"]).status.code(), Some(4));
    // R28: `credits portal-revoke` ends that session.
    let revoke = cli(&["portal-revoke", "demo-e2e"]);
    assert!(revoke.status.success());
    assert!(
        String::from_utf8_lossy(&revoke.stdout).starts_with("1 billing-page session"),
        "{}",
        String::from_utf8_lossy(&revoke.stdout)
    );
    let after = http_get(&page, "/billing", Some(&cookie)).await;
    assert!(
        after.lines().next().unwrap_or_default().contains(" 403 "),
        "{after}"
    );
    let status = up.stop().await;
    assert!(status.success(), "credits up exits 0 on SIGTERM");
    credits_tests::delete_queues(&queue).await;
    credits_tests::delete_queues(&format!("{exchange}.unrouted")).await;
}

/// One raw gRPC call to any path (an empty message each way), with or without a token: its
/// status code.
async fn raw_call(url: &str, path: &str, token: Option<&str>) -> Code {
    let channel = lazy_channel(url, token).unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let codec: tonic_prost::ProstCodec<(), ()> = tonic_prost::ProstCodec::default();
    let path = http::uri::PathAndQuery::try_from(path.to_owned()).unwrap();
    match grpc.unary(tonic::Request::new(()), path, codec).await {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

/// R28: calls refused for their credentials, and calls to methods the server does not
/// have, add no metric series — the finding was 300 such calls making 5,400 new lines.
#[tokio::test]
async fn refused_and_made_up_calls_add_no_metric_series_r28() {
    let (d, _c) = start_with_acme("25.00").await;
    let series = |text: &str| {
        text.lines()
            .filter(|l| l.starts_with("credits_grpc_"))
            .count()
    };
    let real = "/credits.ledger.v1.LedgerService/GetAccount";
    // One of each kind first: their fixed series ("refused", "unknown") appear once.
    assert_eq!(
        raw_call(&d.ledger_url, "/scan.v1.S/M", None).await,
        Code::Unauthenticated
    );
    assert_eq!(
        raw_call(
            &d.ledger_url,
            real,
            Some("wrong-token-0123456789abcdef0123")
        )
        .await,
        Code::Unauthenticated
    );
    assert_eq!(
        raw_call(&d.ledger_url, "/scan.v1.S/M", Some(&d.token)).await,
        Code::Unimplemented
    );
    let before = http_get(&d.metrics_url, "/metrics", None).await;
    for i in 0..100 {
        let made_up = format!("/scan{i}.v1.Svc{i}/Method{i}");
        assert_eq!(
            raw_call(&d.ledger_url, &made_up, None).await,
            Code::Unauthenticated
        );
        assert_eq!(
            raw_call(&d.ledger_url, &made_up, Some(&d.token)).await,
            Code::Unimplemented
        );
        let wrong = format!("wrong-token-{i:04}-0123456789abcdef0123");
        assert_eq!(
            raw_call(&d.ledger_url, real, Some(&wrong)).await,
            Code::Unauthenticated
        );
    }
    let after = http_get(&d.metrics_url, "/metrics", None).await;
    assert_eq!(series(&before), series(&after), "new series:\n{after}");
    assert!(
        !after.contains("scan"),
        "a made-up name became a label:\n{after}"
    );
    for line in [
        "credits_grpc_requests_total{service=\"refused\",method=\"refused\",code=\"UNAUTHENTICATED\"}",
        "credits_grpc_requests_total{service=\"unknown\",method=\"unknown\",code=\"UNIMPLEMENTED\"}",
    ] {
        assert!(after.contains(line), "{line} in\n{after}");
    }
    stop(d).await;
}
