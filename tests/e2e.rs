//! End to end: the real `credits-ledger`, `credits-payments`, `credits-recharge` and
//! `credits` binaries as processes, driven only through gRPC and RabbitMQ like an outside
//! client. Walks every product rule R1–R14 at least once.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use credits_common::grpc::{AuthChannel, lazy_channel};
use credits_proto::ledger::v1 as lpb;
use credits_proto::ledger::v1::ledger_service_client::LedgerServiceClient;
use credits_proto::payments::v1 as ppb;
use credits_proto::payments::v1::payments_service_client::PaymentsServiceClient;
use credits_proto::recharge::v1 as rpb;
use credits_proto::recharge::v1::auto_recharge_service_client::AutoRechargeServiceClient;
use credits_tests::procs::{Daemons, Proc, bin, free_port, wait_healthy};
use credits_tests::{EventTap, eventually, pg_base, unique};
use tonic::Code;

const WAIT: Duration = Duration::from_secs(30);

struct C {
    l: LedgerServiceClient<AuthChannel>,
    p: PaymentsServiceClient<AuthChannel>,
    r: AutoRechargeServiceClient<AuthChannel>,
}

fn clients(d: &Daemons) -> C {
    let t = Some(d.token.as_str());
    C {
        l: LedgerServiceClient::new(lazy_channel(&d.ledger_url, t).unwrap()),
        p: PaymentsServiceClient::new(lazy_channel(&d.payments_url, t).unwrap()),
        r: AutoRechargeServiceClient::new(lazy_channel(&d.recharge_url, t).unwrap()),
    }
}

fn card(number: &str) -> Option<ppb::add_payment_method_request::Method> {
    Some(ppb::add_payment_method_request::Method::Card(
        ppb::CardDetails {
            number: number.into(),
            exp_month: 12,
            exp_year: 2034,
            cvc: "123".into(),
        },
    ))
}

fn bank() -> Option<ppb::add_payment_method_request::Method> {
    Some(ppb::add_payment_method_request::Method::UsBankAccount(
        ppb::UsBankAccountDetails {
            routing_number: "110000000".into(),
            account_number: "000123456789".into(),
            holder_name: "Jane Roe".into(),
        },
    ))
}

fn usage(
    id: &str,
    category: lpb::UsageCategory,
    amount: &str,
    key: &str,
) -> lpb::RecordUsageRequest {
    lpb::RecordUsageRequest {
        account_id: id.into(),
        category: category as i32,
        amount: amount.into(),
        idempotency_key: key.into(),
        description: String::new(),
    }
}

fn purchase(id: &str, amount: &str, key: &str) -> ppb::PurchaseCreditsRequest {
    ppb::PurchaseCreditsRequest {
        account_id: id.into(),
        amount: amount.into(),
        payment_method_id: String::new(),
        idempotency_key: key.into(),
    }
}

fn enable(id: &str, threshold: &str, target: &str) -> rpb::SetAutoRechargeRequest {
    rpb::SetAutoRechargeRequest {
        account_id: id.into(),
        enabled: true,
        threshold: threshold.into(),
        target: target.into(),
    }
}

async fn balance(c: &mut C, id: &str) -> String {
    c.l.get_account(lpb::GetAccountRequest {
        account_id: id.into(),
    })
    .await
    .unwrap()
    .into_inner()
    .balance
}

async fn attempts(c: &mut C, id: &str) -> Vec<rpb::RechargeAttempt> {
    c.r.list_recharge_attempts(rpb::ListRechargeAttemptsRequest {
        account_id: id.into(),
        page_size: 100,
        page_token: String::new(),
    })
    .await
    .unwrap()
    .into_inner()
    .attempts
}

async fn settled(c: &C, id: &str, n: usize) -> Vec<rpb::RechargeAttempt> {
    eventually(WAIT, "attempts to settle", || {
        let mut c = C {
            l: c.l.clone(),
            p: c.p.clone(),
            r: c.r.clone(),
        };
        let id = id.to_owned();
        async move {
            let a = attempts(&mut c, &id).await;
            let done = a.iter().all(|a| {
                a.status == rpb::AttemptStatus::Succeeded as i32
                    || a.status == rpb::AttemptStatus::Failed as i32
            });
            (done && a.len() >= n).then_some(a)
        }
    })
    .await
}

async fn create(c: &mut C, id: &str, mode: lpb::BillingMode) {
    c.l.create_account(lpb::CreateAccountRequest {
        account_id: id.into(),
        billing_mode: mode as i32,
        display_name: String::new(),
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn every_product_rule_holds_across_real_processes() {
    let d = Daemons::start().await;
    let mut tap = EventTap::bind(&d.exchange, "#").await;
    let mut c = clients(&d);

    // Auth: every RPC but health needs the bearer token.
    let mut anon = LedgerServiceClient::new(lazy_channel(&d.ledger_url, None).unwrap());
    let err = anon
        .get_account(lpb::GetAccountRequest {
            account_id: "x".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    // R3: no access before the first purchase; purchases are at least $5.00.
    create(&mut c, "acme", lpb::BillingMode::Prepaid).await;
    let a =
        c.l.check_access(lpb::CheckAccessRequest {
            account_id: "acme".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!a.allowed);
    assert_eq!(a.access, lpb::Access::PendingFirstPurchase as i32);
    let visa =
        c.p.add_payment_method(ppb::AddPaymentMethodRequest {
            account_id: "acme".into(),
            method: card("4242424242424242"),
            make_default: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(visa.is_default);
    assert_eq!(
        c.p.purchase_credits(purchase("acme", "4.99", "p0"))
            .await
            .unwrap_err()
            .code(),
        Code::FailedPrecondition
    );
    // R1: whole cents for charges, up to 9 decimals in the ledger; never exponents.
    assert_eq!(
        c.p.purchase_credits(purchase("acme", "5.001", "p0"))
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    assert_eq!(
        c.l.record_usage(usage("acme", lpb::UsageCategory::Other, "1e-3", "bad"))
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    let bought =
        c.p.purchase_credits(purchase("acme", "25.00", "p1"))
            .await
            .unwrap()
            .into_inner();
    assert_eq!(bought.balance, "25.00");
    assert!(
        c.l.check_access(lpb::CheckAccessRequest {
            account_id: "acme".into()
        })
        .await
        .unwrap()
        .into_inner()
        .allowed
    );

    // R12: the same key returns the first result; a different request is refused.
    let again =
        c.p.purchase_credits(purchase("acme", "25.00", "p1"))
            .await
            .unwrap()
            .into_inner();
    assert_eq!(
        again.charge.unwrap().charge_id,
        bought.charge.unwrap().charge_id
    );
    assert_eq!(
        c.p.purchase_credits(purchase("acme", "26.00", "p1"))
            .await
            .unwrap_err()
            .code(),
        Code::AlreadyExists
    );
    assert_eq!(balance(&mut c, "acme").await, "25.00");

    // R2 + R1: usage in every category, priced in fractions of a cent.
    for (i, cat) in [
        lpb::UsageCategory::ApiRequests,
        lpb::UsageCategory::DedicatedEndpoints,
        lpb::UsageCategory::FineTuning,
        lpb::UsageCategory::Evaluations,
        lpb::UsageCategory::Other,
    ]
    .into_iter()
    .enumerate()
    {
        let r =
            c.l.record_usage(usage("acme", cat, "0.000125", &format!("cat{i}")))
                .await
                .unwrap()
                .into_inner();
        assert_eq!(r.entry.unwrap().category, cat as i32);
    }
    assert_eq!(balance(&mut c, "acme").await, "24.999375");

    // R6: settings are validated; R7 + R8: crossing below 10 tops up once to exactly 50.
    assert_eq!(
        c.r.set_auto_recharge(enable("acme", "10", "12"))
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    c.r.set_auto_recharge(enable("acme", "10", "50"))
        .await
        .unwrap();
    c.l.record_usage(usage(
        "acme",
        lpb::UsageCategory::ApiRequests,
        "15.009375",
        "cross",
    ))
    .await
    .unwrap(); // 9.99
    let a = settled(&c, "acme", 1).await;
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].amount, "40.01");
    assert_eq!(balance(&mut c, "acme").await, "50.00");
    let crossed = tap
        .next_of("ledger.balance.threshold_crossed", WAIT)
        .await
        .unwrap();
    assert_eq!(crossed["data"]["balance_after"], "9.99");
    assert!(
        tap.next_of("recharge.attempt.succeeded", WAIT)
            .await
            .is_some()
    );

    // R9: usage outruns a top-up: the balance still ends at or above the threshold.
    c.l.record_usage(usage("acme", lpb::UsageCategory::ApiRequests, "41", "r9a"))
        .await
        .unwrap();
    c.l.record_usage(usage("acme", lpb::UsageCategory::ApiRequests, "45", "r9b"))
        .await
        .unwrap();
    eventually(WAIT, "R9 top-ups", || {
        let mut c = C {
            l: c.l.clone(),
            p: c.p.clone(),
            r: c.r.clone(),
        };
        async move {
            let b: rust_decimal::Decimal = balance(&mut c, "acme").await.parse().unwrap();
            let a = attempts(&mut c, "acme").await;
            let idle = a
                .iter()
                .all(|a| a.status == rpb::AttemptStatus::Succeeded as i32);
            (idle && b >= rust_decimal::Decimal::from(10)).then_some(())
        }
    })
    .await;

    // R13: histories are newest first and paged.
    let page =
        c.l.list_entries(lpb::ListEntriesRequest {
            account_id: "acme".into(),
            page_size: 2,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.entries.len(), 2);
    assert!(!page.next_page_token.is_empty());
    let next =
        c.l.list_entries(lpb::ListEntriesRequest {
            account_id: "acme".into(),
            page_size: 2,
            page_token: page.next_page_token,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        next.entries[0].created_at.as_ref().unwrap().seconds
            <= page.entries[1].created_at.as_ref().unwrap().seconds
    );
    assert!(
        !c.p.list_charges(ppb::ListChargesRequest {
            account_id: "acme".into(),
            page_size: 1,
            page_token: String::new()
        })
        .await
        .unwrap()
        .into_inner()
        .next_page_token
        .is_empty()
    );

    // R10: a bank account as default turns auto-recharge off and it stays off.
    let ach =
        c.p.add_payment_method(ppb::AddPaymentMethodRequest {
            account_id: "acme".into(),
            method: bank(),
            make_default: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(ach.is_default);
    let off = tap
        .next_of("recharge.settings.disabled", WAIT)
        .await
        .unwrap();
    assert_eq!(off["data"]["reason"], "DEFAULT_PAYMENT_METHOD_NOT_CARD");
    assert_eq!(
        c.r.set_auto_recharge(enable("acme", "10", "50"))
            .await
            .unwrap_err()
            .code(),
        Code::FailedPrecondition
    );

    // R4: usage past zero is recorded; access is suspended, and comes back with credits.
    let b: rust_decimal::Decimal = balance(&mut c, "acme").await.parse().unwrap();
    let r =
        c.l.record_usage(usage(
            "acme",
            lpb::UsageCategory::ApiRequests,
            &(b + rust_decimal::Decimal::ONE).to_string(),
            "r4",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.balance, "-1.00");
    assert!(!r.allowed);
    assert!(
        tap.next_of("ledger.account.suspended", WAIT)
            .await
            .is_some()
    );
    c.p.set_default_payment_method(ppb::SetDefaultPaymentMethodRequest {
        account_id: "acme".into(),
        payment_method_id: visa.payment_method_id,
    })
    .await
    .unwrap();
    c.p.purchase_credits(purchase("acme", "5.00", "p2"))
        .await
        .unwrap();
    assert!(
        c.l.check_access(lpb::CheckAccessRequest {
            account_id: "acme".into()
        })
        .await
        .unwrap()
        .into_inner()
        .allowed
    );
    assert!(
        tap.next_of("ledger.account.reactivated", WAIT)
            .await
            .is_some()
    );

    // R5: contract accounts are never suspended and get no auto-recharge.
    create(&mut c, "bigco", lpb::BillingMode::Contract).await;
    let r =
        c.l.record_usage(usage("bigco", lpb::UsageCategory::FineTuning, "500", "k"))
            .await
            .unwrap()
            .into_inner();
    assert!(r.allowed);
    assert_eq!(r.balance, "-500.00");
    c.p.add_payment_method(ppb::AddPaymentMethodRequest {
        account_id: "bigco".into(),
        method: card("4242424242424242"),
        make_default: true,
    })
    .await
    .unwrap();
    assert_eq!(
        c.r.set_auto_recharge(enable("bigco", "10", "50"))
            .await
            .unwrap_err()
            .code(),
        Code::FailedPrecondition
    );

    // R11: three declined top-ups turn auto-recharge off with REPEATED_FAILURES.
    create(&mut c, "broke", lpb::BillingMode::Prepaid).await;
    c.p.add_payment_method(ppb::AddPaymentMethodRequest {
        account_id: "broke".into(),
        method: card("4000000000000002"),
        make_default: true,
    })
    .await
    .unwrap();
    c.r.set_auto_recharge(enable("broke", "10", "50"))
        .await
        .unwrap();
    let failed = settled(&c, "broke", 3).await;
    assert!(failed.iter().all(|a| a.failure_code == "card_declined"));
    let s = eventually(WAIT, "auto-recharge off", || {
        let mut r = c.r.clone();
        async move {
            let s = r
                .get_auto_recharge(rpb::GetAutoRechargeRequest {
                    account_id: "broke".into(),
                })
                .await
                .ok()?
                .into_inner();
            (!s.enabled).then_some(s)
        }
    })
    .await;
    assert_eq!(
        s.disabled_reason,
        rpb::DisabledReason::RepeatedFailures as i32
    );

    // Metrics are served.
    let metrics = http_get(&d.metrics_url, "/metrics").await;
    assert!(
        metrics.contains("credits_ledger_usage_entries_total"),
        "{metrics}"
    );

    // R14: the card numbers never reached the logs; every daemon exits 0 on SIGTERM.
    let logs = d.stop().await;
    for log in &logs {
        assert!(
            !log.contains("4242424242424242") && !log.contains("4000000000000002"),
            "card number in a daemon log"
        );
    }
    assert!(
        logs[1].contains("payment method added"),
        "the payments log was captured"
    );
}

async fn http_get(addr: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test]
async fn credits_up_runs_all_three_and_the_demo_tells_the_story() {
    let ports = [free_port(), free_port(), free_port()];
    let addr = |p: u16| format!("127.0.0.1:{p}");
    let prefix = unique("credits_t_up");
    let queue = unique("credits.recharge.up");
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
            &unique("credits.events.up"),
            "--queue",
            &queue,
            "--ledger-addr",
            &addr(ports[0]),
            "--payments-addr",
            &addr(ports[1]),
            "--recharge-addr",
            &addr(ports[2]),
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
    assert!(
        stdout.contains("reason DEFAULT_PAYMENT_METHOD_NOT_CARD"),
        "{stdout}"
    );

    // Operator commands: JSON output and exit codes scripts can rely on.
    let show = cli(&["accounts", "show", "demo-e2e", "--json"]);
    assert!(show.status.success());
    let v: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    assert_eq!(v["balance"], "50.00");
    assert_eq!(v["access"], "ACTIVE");
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
    let status = up.stop().await;
    assert!(status.success(), "credits up exits 0 on SIGTERM");
    credits_tests::delete_queues(&queue).await;
}
