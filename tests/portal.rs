//! The billing portal (R20) in a real browser: headless Chromium driven over the DevTools
//! protocol against an in-process portal in front of the three real services (their own
//! databases and exchange, the machine's PostgreSQL and RabbitMQ). Screenshots of the
//! main states are saved under each test's temp dir (printed on failure and with
//! `--nocapture`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "portal/browser.rs"]
mod browser;

use std::path::PathBuf;
use std::time::Duration;

use browser::Browser;
use credits_client::{ClientConfig, Portal, RetryPolicy};
use credits_tests::System;
use credits_tests::api::{Access, BillingMode, DisabledReason, acct, card, money};

/// A portal in front of `system`, on ports chosen by the OS.
struct PortalUnderTest {
    http: String,
    grpc: String,
    shutdown: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl PortalUnderTest {
    async fn start(system: &System) -> PortalUnderTest {
        Self::start_with(system, None).await
    }

    /// With `stripe_js`: cards through Stripe.js (R24).
    async fn start_with(system: &System, stripe_js: Option<String>) -> PortalUnderTest {
        Self::start_configured(system, |cfg| cfg.stripe_js_url = stripe_js).await
    }

    /// With its configuration changed by `configure`.
    async fn start_configured(
        system: &System,
        configure: impl FnOnce(&mut credits_portal::Config),
    ) -> PortalUnderTest {
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http_url = format!("http://127.0.0.1:{}", http.local_addr().unwrap().port());
        let grpc_url = format!("http://{}", grpc.local_addr().unwrap());
        let client = ClientConfig {
            ledger_url: system.ledger.url(),
            payments_url: system.payments.url(),
            recharge_url: system.recharge[0].url(),
            token: None,
            retry: RetryPolicy::none(),
            ..ClientConfig::local()
        };
        let mut cfg =
            credits_portal::Config::new(client, &http_url, credits_portal::session::Keys::random());
        configure(&mut cfg);
        cfg.database_url =
            credits_common::config::DatabaseUrl::new(credits_tests::fresh_database_url("portal"));
        let shutdown = tokio_util::sync::CancellationToken::new();
        let app = credits_portal::App::build(cfg, &shutdown).await.unwrap();
        let task = tokio::spawn(app.run(grpc, http, shutdown.clone()));
        PortalUnderTest {
            http: http_url,
            grpc: grpc_url,
            shutdown,
            task,
        }
    }

    fn sessions(&self) -> Portal {
        Portal::connect(&self.grpc, None, Duration::from_secs(10)).unwrap()
    }

    async fn session_url(&self, account: &str, ttl: Option<Duration>) -> String {
        self.sessions()
            .create_portal_session(&acct(account), ttl)
            .await
            .unwrap()
            .url
    }

    async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }
}

/// Sleeps until just past `t`.
async fn wait_past(t: chrono::DateTime<chrono::Utc>) {
    let left = (t - chrono::Utc::now()).to_std().unwrap_or_default();
    tokio::time::sleep(left + Duration::from_millis(300)).await;
}

/// One raw HTTP/1.0 exchange: the status line's code, the headers (lower-case names) and
/// the body.
async fn http(
    addr: &str,
    path: &str,
    cookie: Option<&str>,
) -> (u16, Vec<(String, String)>, String) {
    let out = credits_tests::http_get(addr, path, cookie).await;
    parse_response(&out)
}

/// A raw HTTP response: the status line's code, the headers (lower-case names), the body.
fn parse_response(out: &str) -> (u16, Vec<(String, String)>, String) {
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((out, ""));
    let mut lines = head.lines();
    let code = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_lowercase(), v.to_owned()))
        .collect();
    (code, headers, body.to_owned())
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> &'a str {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no {name} header in {headers:?}"))
}

/// The three services with a prepaid account `acme`, and a portal in front of them.
async fn acme_and_portal() -> (System, PortalUnderTest) {
    let system = System::start(1).await;
    system
        .api()
        .create_account("acme", BillingMode::Prepaid)
        .await;
    let portal = PortalUnderTest::start(&system).await;
    (system, portal)
}

async fn stop(portal: PortalUnderTest, system: System) {
    portal.stop().await;
    system.stop().await;
}

/// Fills the open "Add a card" form (expiry 12/2034).
async fn fill_card(b: &mut Browser, number: &str, cvc: &str) {
    b.fill("Card number", number).await;
    b.fill("Expiry month", "12").await;
    b.fill("Expiry year", "2034").await;
    b.fill("CVC", cvc).await;
}

fn screenshots(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(credits_tests::unique(&format!("portal-{test}")));
    std::fs::create_dir_all(&dir).unwrap();
    eprintln!("screenshots of {test}: {}", dir.display());
    dir
}

/// The seed's story, as its customer meets it: open the session, add a card, buy $25,
/// Set thresholds 10 → 50 and Save, see Edit limits, submit an invalid pair and read
/// the error, add a bank account as the default and see auto-recharge turned off with
/// its reason.
#[tokio::test]
async fn the_seed_story_in_a_real_browser_r20() {
    let (system, portal) = acme_and_portal().await;
    let api = system.api();
    let dir = screenshots("story");
    let mut b = Browser::launch(&dir).await;

    let link = portal.session_url("acme", None).await;
    assert!(
        link.starts_with(&format!("{}/session?token=", portal.http)),
        "{link}"
    );
    // The customer arrives from the platform's own site, another origin: a cross-site
    // navigation, after which a SameSite=Strict cookie must still reach the page.
    b.goto(&format!("data:text/html,<a href=\"{link}\">Billing</a>"))
        .await;
    b.submit("Billing").await;
    b.wait_for_path("/billing").await;
    // The token is traded for the cookie and leaves the address bar.
    assert_eq!(b.url().await, format!("{}/billing", portal.http));
    // The cookie is HttpOnly; the page has no script at all (it works with scripts off).
    assert_eq!(b.eval("document.cookie").await, "");
    assert_eq!(b.eval("document.scripts.length").await, 0);
    assert!(b.text().await.contains("Billing settings"));
    assert_eq!(b.text_of("balance").await.unwrap(), "$0.00");
    assert_eq!(b.text_of("min-purchase").await.unwrap(), "$5.00");
    assert!(b.has_button("Set thresholds").await);
    assert!(!b.has_button("Edit limits").await);
    b.screenshot("1-new-account").await;

    // A card, by its labels (a sandbox test number).
    b.open("Add a card").await;
    fill_card(&mut b, "4242 4242 4242 4242", "123").await;
    b.check("Make this card the default payment method", true)
        .await;
    b.submit("Add card").await;
    assert!(b.text().await.contains("Card added."), "{}", b.text().await);
    let methods = api.methods("acme").await;
    assert_eq!(methods.len(), 1);
    assert!(methods[0].is_default);
    assert!(b.text().await.contains("ending 4242"));

    // Buy $25.
    b.fill("Amount (USD)", "25").await;
    b.submit("Add credits").await;
    assert!(
        b.text().await.contains("Credits added."),
        "{}",
        b.text().await
    );
    assert_eq!(b.text_of("balance").await.unwrap(), "$25.00");
    assert_eq!(api.balance("acme").await, money("25.00"));
    assert_eq!(api.account("acme").await.access, Access::Active);
    let entries = b.text_of("entries").await.unwrap();
    assert!(entries.contains("+$25.00"), "{entries}");

    // Below the minimum purchase: the error, in words, next to the amount; nothing bought.
    b.fill("Amount (USD)", "3").await;
    b.submit("Add credits").await;
    let err = b.error_at("credits-amount").await;
    assert!(err.contains("at least $5.00"), "{err}");
    assert_eq!(b.value("Amount (USD)").await, "3");
    assert_eq!(api.balance("acme").await, money("25.00"));
    assert_eq!(api.charges("acme").await.len(), 1);

    // Set thresholds 10 → 50 and Save.
    b.open("Set thresholds").await;
    b.check("Enable automatic credit purchases", true).await;
    b.fill("When balance goes below", "10").await;
    b.fill("Bring credit balance up to", "50").await;
    b.screenshot("2-set-thresholds").await;
    b.submit("Save").await;
    assert!(b.text().await.contains("Auto-recharge settings saved."));
    assert!(b.has_button("Edit limits").await);
    assert!(!b.has_button("Set thresholds").await);
    let state = b.text_of("recharge-state").await.unwrap();
    assert!(
        state.contains("$10.00") && state.contains("$50.00"),
        "{state}"
    );
    let r = api.recharge_settings("acme").await;
    assert!(r.enabled);
    assert_eq!(
        (r.threshold, r.target),
        (Some(money("10.00")), Some(money("50.00")))
    );
    b.screenshot("3-auto-recharge-on").await;

    // An invalid pair: the error next to the field it concerns; nothing stored.
    b.open("Edit limits").await;
    assert_eq!(b.value("When balance goes below").await, "10.00");
    b.fill("When balance goes below", "50").await;
    b.fill("Bring credit balance up to", "40").await;
    b.submit("Save").await;
    let err = b.error_at("recharge-target").await;
    assert!(err.contains("greater than threshold"), "{err}");
    assert_eq!(b.value("Bring credit balance up to").await, "40");
    b.screenshot("4-invalid-pair").await;
    let r = api.recharge_settings("acme").await;
    assert_eq!(
        (r.threshold, r.target),
        (Some(money("10.00")), Some(money("50.00")))
    );

    // A bank account as the default turns auto-recharge off, and the page says why.
    b.open("Add a US bank account").await;
    b.fill("Account holder name", "Jane Roe").await;
    b.fill("Routing number", "110000000").await;
    b.fill("Account number", "000123456789").await;
    b.check("Make this bank account the default payment method", true)
        .await;
    b.submit("Add bank account").await;
    assert!(b.text().await.contains("Bank account added."));
    let reason = b
        .text_of("recharge-reason")
        .await
        .expect("the reason auto-recharge is off");
    assert!(reason.contains("bank account"), "{reason}");
    assert!(
        b.text_of("recharge-state")
            .await
            .unwrap()
            .starts_with("Off")
    );
    let r = api.recharge_settings("acme").await;
    assert!(!r.enabled);
    assert_eq!(
        r.disabled_reason,
        DisabledReason::DefaultPaymentMethodNotCard
    );
    b.screenshot("5-turned-off-by-bank-default").await;

    // Card numbers never reach the page again, not even the one just typed.
    assert!(!b.html().await.contains("4242424242424242"));

    b.close().await;
    stop(portal, system).await;
}

/// Another account's data and methods are out of reach; a form without the CSRF token
/// changes nothing; an expired session is refused; a display name is shown as text.
#[tokio::test]
async fn a_session_reaches_only_its_own_account_until_it_expires_r20() {
    let system = System::start(1).await;
    let api = system.api();
    let evil = "<script>document.title='owned'</script><img src=x onerror=alert(1)>";
    api.ledger()
        .create_account(&acct("acme"), BillingMode::Prepaid, evil)
        .await
        .unwrap();
    api.create_account("other", BillingMode::Prepaid).await;
    let other_card = api
        .payments()
        .add_payment_method(&acct("other"), &card("4242424242424242"), true)
        .await
        .unwrap();
    let portal = PortalUnderTest::start(&system).await;
    let dir = screenshots("isolation");
    let mut b = Browser::launch(&dir).await;
    b.open_session(&portal.session_url("acme", None).await)
        .await;

    // The display name is text, not markup: no script ran, no element was injected.
    assert_eq!(b.text_of("display-name").await.unwrap(), evil);
    assert_eq!(b.eval("document.scripts.length").await, 0);
    assert_eq!(b.eval("document.images.length").await, 0);
    assert_eq!(b.eval("document.title").await, "Billing settings");
    b.screenshot("escaped-name").await;

    // The page names no account anywhere the customer could change it.
    assert!(!b.html().await.contains("other"));
    // Another account's method, with a valid CSRF token: refused, and still there.
    let csrf = b.input("csrf").await;
    b.post_form(
        "/billing/methods/remove",
        &[
            ("csrf", &csrf),
            ("payment_method_id", &other_card.payment_method_id),
        ],
    )
    .await;
    assert!(
        b.text().await.contains("not on this account"),
        "{}",
        b.text().await
    );
    b.post_form(
        "/billing/methods/default",
        &[
            ("csrf", &csrf),
            ("payment_method_id", &other_card.payment_method_id),
        ],
    )
    .await;
    assert!(b.text().await.contains("not on this account"));
    let others = api.methods("other").await;
    assert_eq!(others.len(), 1);
    assert!(others[0].is_default);

    // No CSRF token, or another one: refused before anything is looked at.
    let refused = "could not be accepted";
    b.post_form("/billing/credits", &[("amount", "25"), ("key", "k1")])
        .await;
    assert!(b.text().await.contains(refused), "{}", b.text().await);
    let forged: [(&str, &[(&str, &str)]); 2] = [
        (
            "/billing/auto-recharge",
            &[
                ("csrf", "AAAA"),
                ("enabled", "on"),
                ("threshold", "10"),
                ("target", "50"),
            ],
        ),
        (
            "/billing/methods/card",
            &[
                ("number", "4242424242424242"),
                ("exp_month", "12"),
                ("exp_year", "2034"),
                ("cvc", "123"),
            ],
        ),
    ];
    for (action, fields) in forged {
        b.post_form(action, fields).await;
        assert!(b.text().await.contains(refused), "{action}");
    }
    b.screenshot("csrf-refused").await;
    assert!(api.methods("acme").await.is_empty());
    assert!(api.charges("acme").await.is_empty());
    assert!(api.recharge_settings("acme").await.threshold.is_none());

    // A link token changed to name another account is refused.
    let link = portal.session_url("acme", None).await;
    let forged = link.replacen(".acme.", ".other.", 1);
    let mut other = Browser::launch(&dir.join("second")).await;
    other.goto(&forged).await;
    assert!(other.text_of("balance").await.is_none());
    assert!(
        other.text().await.contains("not valid"),
        "{}",
        other.text().await
    );
    other.goto(&format!("{}/billing", portal.http)).await;
    assert!(other.text().await.contains("not valid"));
    assert!(!other.text().await.contains("other Inc."));

    // An expired link is refused; a session whose time ran out ends.
    let short = portal
        .sessions()
        .create_portal_session(&acct("acme"), Some(Duration::from_secs(3)))
        .await
        .unwrap();
    other.open_session(&short.url).await;
    assert_eq!(other.text_of("balance").await.unwrap(), "$0.00");
    wait_past(short.expires_at).await;
    other.goto(&format!("{}/billing", portal.http)).await;
    assert!(
        other.text_of("balance").await.is_none(),
        "{}",
        other.text().await
    );
    other.goto(&short.url).await;
    assert!(
        other.text().await.contains("expired"),
        "{}",
        other.text().await
    );
    other.screenshot("expired").await;

    other.close().await;
    b.close().await;
    stop(portal, system).await;
}

/// `CreatePortalSession` checks what it is asked (SPEC §4): unknown account NOT_FOUND,
/// bad id or ttl INVALID_ARGUMENT naming the field.
#[tokio::test]
async fn create_portal_session_validates_its_request() {
    let (system, portal) = acme_and_portal().await;
    let s = portal.sessions();
    let ok = s
        .create_portal_session(&acct("acme"), Some(Duration::from_secs(86_400)))
        .await
        .unwrap();
    let left = ok.expires_at - chrono::Utc::now();
    assert!(left > chrono::Duration::seconds(86_390) && left <= chrono::Duration::seconds(86_400));
    let default = s.create_portal_session(&acct("acme"), None).await.unwrap();
    let left = default.expires_at - chrono::Utc::now();
    assert!(left > chrono::Duration::seconds(3590) && left <= chrono::Duration::seconds(3600));

    let e = s
        .create_portal_session(&acct("nobody"), None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), credits_client::Code::NotFound, "{e}");
    assert!(e.message().contains("account_id"), "{e}");
    let e = s
        .create_portal_session(&acct("acme"), Some(Duration::from_secs(86_401)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), credits_client::Code::InvalidArgument, "{e}");
    assert!(e.message().starts_with("ttl_seconds:"), "{e}");
    // A raw request with an id the typed client would refuse.
    let mut raw = credits_proto::portal::v1::portal_service_client::PortalServiceClient::connect(
        portal.grpc.clone(),
    )
    .await
    .unwrap();
    let e = raw
        .create_portal_session(credits_proto::portal::v1::CreatePortalSessionRequest {
            account_id: "a b\0".into(),
            ttl_seconds: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().starts_with("account_id:"), "{}", e.message());
    stop(portal, system).await;
}

/// What every response carries (CSP, no framing, no caching, no referrer), what the
/// session cookie is (HttpOnly, SameSite=Strict, for the session's life), and that the
/// server itself refuses a cookie past its expiry, whatever the browser keeps.
#[tokio::test]
async fn responses_carry_strict_headers_and_the_cookie_ends_with_the_session_r20() {
    let (system, portal) = acme_and_portal().await;
    let (code, headers, body) = http(&portal.http, "/billing", None).await;
    assert_eq!(code, 403);
    assert!(body.contains("not valid"));
    let csp = header(&headers, "content-security-policy");
    for part in [
        "default-src 'none'",
        "style-src 'self'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(part), "{csp}");
    }
    assert_eq!(header(&headers, "x-frame-options"), "DENY");
    assert_eq!(header(&headers, "cache-control"), "no-store");
    assert_eq!(header(&headers, "referrer-policy"), "no-referrer");
    assert_eq!(header(&headers, "x-content-type-options"), "nosniff");

    let session = portal
        .sessions()
        .create_portal_session(&acct("acme"), Some(Duration::from_secs(2)))
        .await
        .unwrap();
    let (code, set, body) = open_link_full(&portal, &session.url, None).await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("url=/billing"), "{body}");
    let set = set.expect("a session cookie");
    let set = set.as_str();
    for part in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age="] {
        assert!(set.contains(part), "{set}");
    }
    let max_age: i64 = set
        .split("Max-Age=")
        .nth(1)
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&max_age), "{set}");
    let cookie = set.split(';').next().unwrap().to_owned();
    let (code, _, body) = http(&portal.http, "/billing", Some(&cookie)).await;
    assert_eq!(code, 200);
    assert!(body.contains("Billing settings"));
    // The same cookie twice (one planted beside ours) is refused, not guessed between.
    let (code, _, _) = http(
        &portal.http,
        "/billing",
        Some(&format!("{cookie}; {cookie}")),
    )
    .await;
    assert_eq!(code, 403);
    wait_past(session.expires_at).await;
    let (code, _, body) = http(&portal.http, "/billing", Some(&cookie)).await;
    assert_eq!(code, 403);
    assert!(body.contains("expired"), "{body}");
    stop(portal, system).await;
}

/// Add credits tells a declined card in words at the amount; a double submit of one form
/// buys once; a refused card is never echoed back into the page.
#[tokio::test]
async fn add_credits_says_declined_and_a_double_submit_buys_once_r20() {
    let (system, portal) = acme_and_portal().await;
    let api = system.api();
    api.add_card("acme", "4000000000000002", true).await; // the sandbox declines it
    let dir = screenshots("declined");
    let mut b = Browser::launch(&dir).await;
    b.open_session(&portal.session_url("acme", None).await)
        .await;

    b.fill("Amount (USD)", "25").await;
    b.submit("Add credits").await;
    let err = b.error_at("credits-amount").await;
    assert!(err.contains("declined"), "{err}");
    assert!(!b.text().await.contains("Payment started"));
    assert_eq!(api.balance("acme").await, money("0.00"));
    b.screenshot("declined").await;

    // A refused card (its CVC) is shown again without the number typed.
    b.open("Add a card").await;
    fill_card(&mut b, "5555555555554444", "1").await;
    b.submit("Add card").await;
    let err = b.error_at("card-cvc").await;
    assert!(err.contains("3 or 4 digits"), "{err}");
    assert!(!b.html().await.contains("5555555555554444"));
    assert_eq!(b.value("Card number").await, "");
    assert_eq!(b.value("Expiry year").await, "2034");

    // One form submitted twice (a double click, a resubmit after a timeout): one purchase.
    api.add_card("acme", "4242424242424242", true).await;
    b.goto(&format!("{}/billing", portal.http)).await;
    let (csrf, key) = (b.input("csrf").await, b.input("key").await);
    for _ in 0..2 {
        b.post_form(
            "/billing/credits",
            &[("csrf", &csrf), ("key", &key), ("amount", "25")],
        )
        .await;
        assert!(
            b.text().await.contains("Credits added."),
            "{}",
            b.text().await
        );
    }
    assert_eq!(api.balance("acme").await, money("25.00"));
    let charges = api.charges("acme").await;
    assert_eq!(charges.len(), 2, "one declined, one bought: {charges:?}");
    b.close().await;
    stop(portal, system).await;
}

/// Types a card into Stripe's card element (the emulator's Stripe.js: plain inputs named by
/// their placeholders; a two-digit year).
async fn fill_stripe_card(b: &mut Browser, number: &str) {
    for (field, value) in [
        ("number", number),
        ("exp_month", "12"),
        ("exp_year", "31"),
        ("cvc", "123"),
        ("postal_code", "10001"),
    ] {
        let js = format!(
            "(() => {{ const i = document.querySelector('#card-element input[placeholder={field}]'); \
               if (!i) throw new Error('no {field} in the card element'); i.focus(); i.value = {}; \
               i.dispatchEvent(new Event('input', {{bubbles: true}})); return true; }})()",
            serde_json::json!(value)
        );
        b.eval(&js).await;
    }
}

/// R24/R25 in a real browser against the emulator's Stripe.js: the card is typed into
/// Stripe's element and only a `pm_…` reaches our origin (every request the page sent is
/// watched); the page's CSP admits that one script origin; a purchase the bank wants
/// confirmed shows **Confirm payment**, the customer passes 3-D Secure in Stripe.js's
/// dialog, and the balance is credited once.
#[tokio::test]
async fn cards_go_to_stripe_js_and_a_payment_is_confirmed_on_the_page_r24_r25() {
    let stripe = credits_tests::stripe::LocalStripe::start().await;
    let system = System::start_stripe(stripe.config()).await;
    system
        .api()
        .create_account("acme", BillingMode::Prepaid)
        .await;
    let js = format!("{}/js.stripe.com/v3/", stripe.base);
    let portal = PortalUnderTest::start_with(&system, Some(js)).await;
    let mut b = Browser::launch(&screenshots("stripe")).await;
    b.watch_requests().await;
    b.open_session(&portal.session_url("acme", None).await)
        .await;
    let addr = portal.http.trim_start_matches("http://").to_owned();
    let (_, headers, _) = http(&addr, "/assets/portal.css", None).await;
    let csp = header(&headers, "content-security-policy").to_owned();
    assert!(
        csp.contains(&format!("script-src 'self' {}", stripe.base)) && !csp.contains("unsafe"),
        "{csp}"
    );
    assert!(
        !b.html().await.contains("name=\"number\""),
        "no card field of ours on the page"
    );

    // A card that needs 3-D Secure, added through Stripe.js (its dialog answered).
    b.open("Add a card").await;
    fill_stripe_card(&mut b, "4000002500003155").await;
    b.submit_through("Add card", Some("Complete authentication"))
        .await;
    assert!(b.text().await.contains("Card added."), "{}", b.text().await);
    let methods = system.api().methods("acme").await;
    assert_eq!(methods.len(), 1);
    assert_eq!(methods[0].last4, "3155");
    b.screenshot("card-added").await;

    // Buy $25: the bank wants the customer.
    b.fill("Amount (USD)", "25").await;
    b.submit("Add credits").await;
    assert!(b.has_button("Confirm payment").await, "{}", b.text().await);
    b.screenshot("confirm-payment").await;
    b.submit_through("Confirm payment", Some("Complete authentication"))
        .await;
    let text = b.text().await;
    assert!(text.contains("Payment confirmed."), "{text}");
    assert_eq!(system.api().balance("acme").await, money("25.00"));
    let credits = system
        .api()
        .entries("acme")
        .await
        .into_iter()
        .filter(|e| e.kind.is_credit())
        .count();
    assert_eq!(credits, 1);
    assert!(!b.has_button("Confirm payment").await);

    // Everything the page sent to our origin: no card number, no CVC; the card form posted
    // only the payment method id.
    let ours = b.requests_to(&portal.http).await;
    assert!(!ours.is_empty());
    for (method, url, body) in &ours {
        assert!(
            !body.contains("4000002500003155") && !body.contains("3155") && !body.contains("cvc"),
            "{method} {url} carried card data: {body}"
        );
    }
    let added: Vec<_> = ours
        .iter()
        .filter(|(_, url, _)| url.ends_with("/billing/methods/card-token"))
        .collect();
    assert_eq!(added.len(), 1, "{ours:?}");
    assert!(added[0].2.contains("processor_token=pm_"), "{}", added[0].2);
    b.close().await;
    stop(portal, system).await;
}

/// One raw HTTP/1.0 form POST: the status code, headers and body.
async fn http_post(
    addr: &str,
    path: &str,
    cookie: Option<&str>,
    form: &[(&str, &str)],
) -> (u16, Vec<(String, String)>, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = addr.trim_start_matches("http://");
    let body: String = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(form)
        .finish();
    let cookie = cookie
        .map(|c| format!("Cookie: {c}\r\n"))
        .unwrap_or_default();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!(
            "POST {path} HTTP/1.0\r\nHost: {addr}\r\n{cookie}Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    parse_response(&out)
}

/// Opens `url` (a session link) over raw HTTP as a browser does: the first hop arrives
/// from elsewhere (no session cookie: it is `SameSite=Strict`), the second from the page
/// itself, with the hop cookie and `cookie` (the browser's session cookie, if any). The
/// final status, the session cookie it set (`name=value`), and the body.
async fn open_link(
    portal: &PortalUnderTest,
    url: &str,
    cookie: Option<&str>,
) -> (u16, Option<String>, String) {
    let (code, set, body) = open_link_full(portal, url, cookie).await;
    (
        code,
        set.map(|s| s.split(';').next().unwrap().to_owned()),
        body,
    )
}

/// [`open_link`], with the session cookie's whole `Set-Cookie` value.
async fn open_link_full(
    portal: &PortalUnderTest,
    url: &str,
    cookie: Option<&str>,
) -> (u16, Option<String>, String) {
    let path = url.strip_prefix(&portal.http).unwrap();
    let (code, headers, body) = http(&portal.http, path, None).await;
    if code != 200 {
        return (code, None, body);
    }
    assert!(
        !headers
            .iter()
            .any(|(k, v)| k == "set-cookie" && v.starts_with("credits_portal=")),
        "the first hop opened a session"
    );
    let hop = header(&headers, "set-cookie")
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let next = body
        .split("url=")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap()
        .replace("&amp;", "&");
    let cookies = match cookie {
        Some(c) => format!("{hop}; {c}"),
        None => hop,
    };
    let (code, headers, body) = http(&portal.http, &next, Some(&cookies)).await;
    let set = headers
        .iter()
        .find(|(k, v)| k == "set-cookie" && v.starts_with("credits_portal="))
        .map(|(_, v)| v.clone());
    (code, set, body)
}

/// The CSRF token of the page a cookie opens.
async fn csrf_of(portal: &PortalUnderTest, cookie: &str) -> String {
    let (code, _, body) = http(&portal.http, "/billing", Some(cookie)).await;
    assert_eq!(code, 200, "{body}");
    body.split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .expect("a csrf field")
        .to_owned()
}

/// R28: a link works once and for at most 15 minutes; a page session can be signed out
/// and revoked (`RevokePortalSessions`), on every replica alike; a link for another
/// account opened while a session is open asks first — a cross-site page cannot make the
/// switch (login CSRF: the victim adding a card to the attacker's account).
#[tokio::test]
async fn links_are_single_use_sessions_end_and_switching_accounts_asks_first_r28() {
    let (system, portal) = acme_and_portal().await;
    system
        .api()
        .create_account("evil", BillingMode::Prepaid)
        .await;

    // Single use, and a link lives at most 15 minutes whatever the session's ttl.
    let s = portal
        .sessions()
        .create_portal_session(&acct("acme"), Some(Duration::from_secs(86_400)))
        .await
        .unwrap();
    let exp: i64 = s
        .url
        .rsplit("token=")
        .next()
        .unwrap()
        .split('.')
        .nth(2)
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        exp <= chrono::Utc::now().timestamp() + 900,
        "the link lives past 15 minutes"
    );
    assert!(
        s.expires_at.timestamp() > chrono::Utc::now().timestamp() + 86_000,
        "the session keeps its ttl"
    );
    let (code, acme_cookie, _) = open_link(&portal, &s.url, None).await;
    assert_eq!(code, 200);
    let acme_cookie = acme_cookie.expect("a cookie");
    let (code, again, body) = open_link(&portal, &s.url, None).await;
    assert_eq!(code, 403, "{body}");
    assert!(again.is_none());
    assert!(body.contains("already used"), "{body}");

    // A link made to skip the first hop (pointing at /session/continue from elsewhere)
    // has no hop cookie: refused, nothing opened.
    let direct =
        portal
            .session_url("evil", None)
            .await
            .replacen("/session?", "/session/continue?", 1);
    let (code, headers, _) = http(
        &portal.http,
        direct.strip_prefix(&portal.http).unwrap(),
        Some(&acme_cookie),
    )
    .await;
    assert_eq!(code, 403);
    assert!(
        !headers
            .iter()
            .any(|(k, v)| k == "set-cookie" && v.starts_with("credits_portal="))
    );
    // Another account's link while acme's session is open — arriving from another site,
    // where the session cookie is not sent — is asked about on the second hop, not switched.
    let evil_link = portal.session_url("evil", None).await;
    let (code, set, body) = open_link(&portal, &evil_link, Some(&acme_cookie)).await;
    assert_eq!(code, 200);
    assert!(set.is_none(), "switched without asking");
    assert!(
        body.contains("Switch account?") && body.contains("acme") && body.contains("evil"),
        "{body}"
    );
    let (_, _, page) = http(&portal.http, "/billing", Some(&acme_cookie)).await;
    assert!(page.contains("(acme)"), "still acme's page");
    // The switch form posted without the session's CSRF token (another site's auto-post):
    // refused, nothing switched.
    let token = evil_link.rsplit("token=").next().unwrap();
    let (code, headers, _) = http_post(
        &portal.http,
        "/session",
        Some(&acme_cookie),
        &[("token", token)],
    )
    .await;
    assert_eq!(code, 403);
    assert!(!headers.iter().any(|(k, _)| k == "set-cookie"));
    let (code, _, page) = http(&portal.http, "/billing", Some(&acme_cookie)).await;
    assert_eq!(code, 200);
    assert!(page.contains("(acme)"));
    // Confirmed by the customer (with the session's token): switched, acme's session over.
    let csrf = csrf_of(&portal, &acme_cookie).await;
    let (code, headers, _) = http_post(
        &portal.http,
        "/session",
        Some(&acme_cookie),
        &[("token", token), ("csrf", &csrf)],
    )
    .await;
    assert_eq!(code, 200);
    let evil_cookie = header(&headers, "set-cookie")
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let (_, _, page) = http(&portal.http, "/billing", Some(&evil_cookie)).await;
    assert!(page.contains("(evil)"));
    let (code, _, body) = http(&portal.http, "/billing", Some(&acme_cookie)).await;
    assert_eq!(code, 403, "the replaced session ended");
    assert!(body.contains("ended"), "{body}");

    // Sign out: the cookie is cleared, and replaying it is refused.
    let csrf = csrf_of(&portal, &evil_cookie).await;
    let (code, headers, body) = http_post(
        &portal.http,
        "/billing/sign-out",
        Some(&evil_cookie),
        &[("csrf", &csrf)],
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert!(header(&headers, "set-cookie").contains("Max-Age=0"));
    let (code, _, _) = http(&portal.http, "/billing", Some(&evil_cookie)).await;
    assert_eq!(code, 403);
    // Signing out needs the CSRF token like every form.
    let (_, fresh, _) = open_link(&portal, &portal.session_url("evil", None).await, None).await;
    let fresh = fresh.unwrap();
    let (code, _, _) = http_post(&portal.http, "/billing/sign-out", Some(&fresh), &[]).await;
    assert_eq!(code, 403);
    assert_eq!(http(&portal.http, "/billing", Some(&fresh)).await.0, 200);

    // Revocation: every live session of the account ends, and its unused links too.
    let unused = portal.session_url("evil", None).await;
    let revoked = portal
        .sessions()
        .revoke_portal_sessions(&acct("evil"))
        .await
        .unwrap();
    assert_eq!(revoked, 1);
    assert_eq!(http(&portal.http, "/billing", Some(&fresh)).await.0, 403);
    let (code, _, _) = open_link(&portal, &unused, None).await;
    assert_eq!(code, 403, "an unused link of a revoked account");
    assert_eq!(
        portal
            .sessions()
            .revoke_portal_sessions(&acct("evil"))
            .await
            .unwrap(),
        0
    );
    stop(portal, system).await;
}

/// Reads from `s` until the server closes it (or `within` passes): what it sent.
async fn read_until_closed(s: &mut tokio::net::TcpStream, within: Duration) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(String::from_utf8_lossy(&out).into_owned()),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => return None,
        }
    }
}

/// R28: the page does not wait on slow clients forever — a request head dribbled in
/// (slowloris), a connection left idle, a body that never comes — and serves a bounded
/// number of connections; each page session and each address has a request budget.
#[tokio::test]
async fn the_page_times_out_slow_clients_bounds_connections_and_rate_limits_r28() {
    use tokio::io::AsyncWriteExt;
    let (system, _) = {
        let system = System::start(1).await;
        system
            .api()
            .create_account("acme", BillingMode::Prepaid)
            .await;
        (system, ())
    };
    let limits = credits_common::http::HttpLimits {
        header_read: Duration::from_secs(1),
        request: Duration::from_secs(2),
        max_connections: 64,
    };
    let portal = PortalUnderTest::start_configured(&system, |cfg| {
        cfg.http_limits = limits;
        cfg.rate_per_minute = 5;
    })
    .await;
    let addr = portal.http.trim_start_matches("http://").to_owned();
    // A head that never ends: closed.
    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .unwrap();
    assert!(
        read_until_closed(&mut slow, Duration::from_secs(10))
            .await
            .is_some(),
        "a half-sent request head held its connection"
    );
    // A kept-alive connection left idle after its answer: closed.
    let mut idle = tokio::net::TcpStream::connect(&addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let answered = read_until_closed(&mut idle, Duration::from_secs(10))
        .await
        .expect("an idle kept-alive connection stayed open");
    assert!(answered.starts_with("HTTP/1.1 200"), "{answered}");
    // A body that never comes: 408.
    let mut body = tokio::net::TcpStream::connect(&addr).await.unwrap();
    body.write_all(
        b"POST /billing/credits HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\namount=5",
    )
    .await
    .unwrap();
    let answer = read_until_closed(&mut body, Duration::from_secs(10))
        .await
        .expect("a request whose body never came held its connection");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");

    // A page session's budget (5 a minute here): then 429, and nothing else is done.
    let link = portal.session_url("acme", None).await;
    let (_, cookie, _) = open_link(&portal, &link, None).await;
    let cookie = cookie.unwrap();
    for _ in 0..5 {
        assert_eq!(http(&portal.http, "/billing", Some(&cookie)).await.0, 200);
    }
    let (code, headers, _) = http(&portal.http, "/billing", Some(&cookie)).await;
    assert_eq!(code, 429);
    assert_eq!(header(&headers, "retry-after"), "60");
    // Link opens from one address: one used above, four more, then 429.
    for _ in 0..4 {
        let (code, _, _) = http(&portal.http, "/session?token=junk", None).await;
        assert_eq!(code, 403);
    }
    assert_eq!(http(&portal.http, "/session?token=junk", None).await.0, 429);
    portal.stop().await;

    // At most `max_connections` at once: a third waits until one of two ends.
    let portal = PortalUnderTest::start_configured(&system, |cfg| {
        cfg.http_limits = credits_common::http::HttpLimits {
            header_read: Duration::from_secs(30),
            request: Duration::from_secs(30),
            max_connections: 2,
        };
    })
    .await;
    let addr = portal.http.trim_start_matches("http://").to_owned();
    let first = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let second = tokio::net::TcpStream::connect(&addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut third = tokio::net::TcpStream::connect(&addr).await.unwrap();
    third
        .write_all(b"GET /healthz HTTP/1.0\r\n\r\n")
        .await
        .unwrap();
    assert!(
        read_until_closed(&mut third, Duration::from_secs(1))
            .await
            .is_none(),
        "a third connection was served beside two"
    );
    drop(first);
    drop(second);
    let answer = read_until_closed(&mut third, Duration::from_secs(10))
        .await
        .expect("served once a connection ended");
    assert!(
        answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200"),
        "{answer}"
    );
    portal.stop().await;
    system.stop().await;
}

/// R29/R30 on the page, as the customer meets it: the last 30 days as a chart by category,
/// the forecast in words (the same arithmetic as the unit tests' fixed clock, at the
/// page's own clock), the grants in the order usage draws them with what is left, a
/// printable receipt for a paid charge (and none for another account's), and the whole
/// history as a CSV that sums to the balance and never hands a spreadsheet a formula.
#[tokio::test]
async fn the_page_shows_usage_a_forecast_grants_receipts_and_a_csv_r29_r30() {
    use credits_client::{CreditsToGrant, UsageCategory, UsageRecord};
    let (system, portal) = acme_and_portal().await;
    let api = system.api();
    api.add_card("acme", "4242424242424242", true).await;
    // Three weeks of history: each day's usage is posted, then everything moves a day back
    // in the ledger's database (the journal's append-only guard lifted for this alone), as
    // if it had been posted a day earlier.
    api.buy("acme", "100", "history").await;
    let mut db = system.ledger.db().await;
    for day in 0..21u32 {
        for (category, base) in [
            (UsageCategory::ApiRequests, 1.2),
            (UsageCategory::FineTuning, 0.6),
            (UsageCategory::Evaluations, 0.3),
        ] {
            let amount = base * (1.0 + f64::from((day * 7) % 5) / 4.0);
            api.ledger()
                .record_usage(&UsageRecord {
                    account_id: acct("acme"),
                    category,
                    amount: money(&format!("{amount:.2}")),
                    idempotency_key: credits_tests::api::key(&format!(
                        "d{day}-{}",
                        category.as_str()
                    )),
                    description: String::new(),
                })
                .await
                .unwrap();
        }
        for sql in [
            "ALTER TABLE entries DISABLE TRIGGER entries_no_update",
            "UPDATE entries SET created_at = created_at - interval '1 day'",
            "ALTER TABLE entries ENABLE TRIGGER entries_no_update",
            "UPDATE accounts SET roll_hour = roll_hour - interval '1 day' WHERE roll_hour IS NOT NULL",
            "UPDATE usage_rollups SET hour = hour - interval '1000 days'",
            "UPDATE usage_rollups SET hour = hour + interval '999 days'",
        ] {
            sqlx::query(sql).execute(&mut db).await.unwrap();
        }
    }
    let bought = api.buy("acme", "40", "buy-1").await;
    api.ledger()
        .grant_credits(&CreditsToGrant {
            account_id: acct("acme"),
            amount: money("5"),
            idempotency_key: credits_tests::api::key("welcome"),
            reason: "Welcome credit".into(),
            expires_at: Some(chrono::Utc::now() + chrono::Duration::days(10)),
            priority: 0,
        })
        .await
        .unwrap();
    for (i, (category, amount, description)) in [
        (UsageCategory::ApiRequests, "2.10", "=cmd|' /C calc'!A0"),
        (
            UsageCategory::FineTuning,
            "1.40",
            "job \"ft-1\", <b>bold</b>",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        api.ledger()
            .record_usage(&UsageRecord {
                account_id: acct("acme"),
                category,
                amount: money(amount),
                idempotency_key: credits_tests::api::key(&format!("u{i}")),
                description: description.into(),
            })
            .await
            .unwrap();
    }
    api.enable_recharge("acme", "10", "50").await.unwrap();
    // Another account's paid charge, for the receipt that must not show.
    api.create_account("other", BillingMode::Prepaid).await;
    api.add_card("other", "4242424242424242", true).await;
    let theirs = api.buy("other", "7", "buy-other").await;

    let dir = screenshots("usage");
    let mut b = Browser::launch(&dir).await;
    b.open_session(&portal.session_url("acme", None).await)
        .await;
    // The forecast: the last 7 × 24 hours' usage (from the ledger's summary) over 7 days,
    // from the available balance to the $10.00 threshold — the arithmetic the unit tests
    // check on a fixed clock, here at the page's clock.
    let now = chrono::Utc::now();
    let (from, to) = credits_portal::usage::average_range(now);
    let last_7: rust_decimal::Decimal = api
        .ledger()
        .usage_summary(&acct("acme"), from, to, credits_client::Granularity::Day)
        .await
        .unwrap()
        .iter()
        .map(|p| p.amount.as_decimal())
        .sum();
    let available = api.account("acme").await.available_balance;
    let expected = credits_portal::usage::forecast_text(
        &credits_portal::usage::forecast(
            now,
            available,
            credits_portal::usage::Level::Threshold(money("10")),
            credits_client::Money::new(last_7),
        ),
        now,
    );
    assert!(
        expected.contains(
            "/day, your available balance reaches your $10.00 auto-recharge threshold around"
        ),
        "{expected}"
    );
    assert_eq!(b.text_of("forecast").await.unwrap(), expected);
    // 22 days with usage (three weeks back and today), stacked by category; the legend
    // totals each category over the 30 days.
    let bars = b
        .eval("new Set([...document.querySelectorAll('#usage-chart rect')].map(r => r.getAttribute('x'))).size")
        .await;
    assert_eq!(bars, 22, "days with a bar");
    let (chart_from, chart_to) = credits_portal::usage::chart_range(now);
    let month = api
        .ledger()
        .usage_summary(
            &acct("acme"),
            chart_from,
            chart_to,
            credits_client::Granularity::Day,
        )
        .await
        .unwrap();
    let legend = b.text_of("usage-legend").await.unwrap();
    for (category, label) in [
        (UsageCategory::ApiRequests, "API requests"),
        (UsageCategory::FineTuning, "Fine-tuning"),
        (UsageCategory::Evaluations, "Evaluations"),
        (UsageCategory::Other, "Other"),
    ] {
        let total: rust_decimal::Decimal = month
            .iter()
            .filter(|p| p.category == category)
            .map(|p| p.amount.as_decimal())
            .sum();
        let shown = credits_portal::page::dollars(&credits_client::Money::new(total));
        assert!(
            legend.contains(&format!("{label} {shown}")),
            "{legend} lacks {label} {shown}"
        );
    }
    // Usage drew the grant first: $1.50 of $5.00 left, expiring in 10 days.
    let grants = b.text_of("grants").await.unwrap();
    assert!(
        grants.contains("Grant: Welcome credit$1.50$5.00"),
        "{grants:?}"
    );
    // Markup in a description is text.
    assert!(b.text().await.contains("job \"ft-1\", <b>bold</b>"));
    b.screenshot("usage-forecast-grants").await;
    if let Ok(to) = std::env::var("CREDITS_README_SCREENSHOTS") {
        std::fs::copy(
            dir.join("usage-forecast-grants.png"),
            format!("{to}/billing-usage.png"),
        )
        .unwrap();
    }

    // The receipt of the purchase, from the charges table.
    b.submit("Receipt").await;
    b.wait_for_path(&format!("/billing/receipts/{}", bought.charge.charge_id))
        .await;
    assert_eq!(
        b.text_of("receipt-number").await.unwrap(),
        bought.charge.charge_id
    );
    assert_eq!(b.text_of("receipt-amount").await.unwrap(), "$40.00 USD");
    assert!(
        b.text_of("receipt-method")
            .await
            .unwrap()
            .contains("ending 4242"),
    );
    b.screenshot("receipt").await;
    // Another account's charge, or a made-up id: no receipt.
    for id in [
        theirs.charge.charge_id.as_str(),
        "ch_nope",
        "..%2F..%2Fbilling",
    ] {
        b.goto(&format!("{}/billing/receipts/{id}", portal.http))
            .await;
        assert!(
            b.text()
                .await
                .contains("There is no receipt for this payment"),
            "{id}"
        );
    }
    b.close().await;

    // The CSV, as the download link fetches it with the session's cookie.
    let session = portal
        .sessions()
        .create_portal_session(&acct("acme"), None)
        .await
        .unwrap();
    let (_, set, _) = open_link_full(&portal, &session.url, None).await;
    let cookie = set.unwrap().split(';').next().unwrap().to_owned();
    let (code, headers, body) = http(&portal.http, "/billing/history.csv", Some(&cookie)).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(header(&headers, "content-type"), "text/csv; charset=utf-8");
    assert!(
        header(&headers, "content-disposition").contains("credits-history-acme.csv"),
        "{headers:?}"
    );
    let lines: Vec<&str> = body.lines().collect();
    assert_eq!(lines[0], credits_client::csv::ENTRIES_HEADER);
    assert_eq!(lines.len(), 1 + 1 + 63 + 4, "{body}");
    assert_eq!(
        credits_tests::api::csv_amount_sum(&body),
        api.balance("acme").await.as_decimal(),
        "{body}"
    );
    assert!(body.contains("\"'=cmd|' /C calc'!A0\""), "{body}");
    assert!(body.contains("\"job \"\"ft-1\"\", <b>bold</b>\""), "{body}");
    // Without a session: nothing.
    let (code, _, body) = http(&portal.http, "/billing/history.csv", None).await;
    assert_eq!(code, 403, "{body}");
    stop(portal, system).await;
}
