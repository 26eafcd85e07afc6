//! R14: the full card number and CVC never reach the database or the logs. This binary
//! captures every log line of an in-process ledger and payments daemon at TRACE level.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::sync::{Arc, Mutex};

use credits_tests::api::{Api, BillingMode, CardDetails, NewPaymentMethod, acct};
use credits_tests::{Ledger, NOBODY, Payments, PaymentsOptions, pg_base};

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn full_card_number_and_cvc_are_never_stored_or_logged_r14() {
    let capture = Capture::default();
    let writer = capture.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .init();

    let ledger = Ledger::start().await;
    let payments = Payments::start(PaymentsOptions::for_ledger(&ledger)).await;
    let c = Api::connect(&ledger.url(), &payments.url(), NOBODY, None);
    c.create_account("acme", BillingMode::Prepaid).await;
    let number = "5555555555554444";
    let cvc = "7391";
    let card = |number: &str| {
        NewPaymentMethod::Card(CardDetails {
            number: number.into(),
            exp_month: 9,
            exp_year: 2031,
            cvc: cvc.into(),
        })
    };
    let pm = c.add_method("acme", card(number), true).await;
    assert_eq!(pm.last4, "4444");
    c.buy("acme", "10.00", "b").await;
    // A bad card goes through validation and error paths too.
    let _ = c
        .payments()
        .add_payment_method(&acct("acme"), &card("5555555555554445"), false)
        .await
        .unwrap_err();
    let payments_db = payments.database_url.clone();
    payments.stop().await;
    ledger.stop().await;

    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("payment method added"),
        "the capture saw the daemon's logs"
    );
    assert!(
        !logs.contains(number) && !logs.contains("5555555555554445"),
        "card number in logs"
    );
    // Four digits occur in timestamps by chance; a logged CVC would be a quoted value or
    // sit on a line naming it.
    assert!(!logs.contains(&format!("\"{cvc}\"")), "CVC in logs");
    assert!(
        !logs
            .lines()
            .any(|l| l.to_lowercase().contains("cvc") && l.contains(cvc)),
        "CVC in logs"
    );

    let db_name = payments_db.rsplit('/').next().unwrap();
    let host = pg_base();
    let dump = std::process::Command::new("pg_dump")
        .arg(format!("{host}/{db_name}"))
        .output()
        .expect("pg_dump");
    assert!(
        dump.status.success(),
        "{}",
        String::from_utf8_lossy(&dump.stderr)
    );
    let dump = String::from_utf8_lossy(&dump.stdout);
    assert!(dump.contains("4444"), "the dump holds the method (last 4)");
    assert!(!dump.contains(number), "card number in the database");
    // COPY rows are tab-separated: a stored CVC would be a whole field.
    assert!(
        !dump.contains(&format!("\t{cvc}\t")) && !dump.contains(&format!("\t{cvc}\n")),
        "CVC in the database"
    );
}
