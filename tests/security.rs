//! Secure by default (R28): what a deployment did not open on purpose stays shut. Each
//! test is one finding of the security review, reproduced against the real binaries or
//! types, and fails without its fix.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use credits_tests::procs::{bin, free_port};

const TOKEN: &str = "0123456789abcdef0123456789abcdef-t";

/// Runs a daemon binary with only `env` (and a database URL nobody listens on: every
/// refusal here comes before any connection), and returns (exited 0, stderr). A binary
/// that started would not exit: it is killed after 20 s and counts as started.
fn run(binary: &str, env: &[(&str, String)]) -> (bool, String) {
    let mut cmd = Command::new(bin(binary));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", "postgres://127.0.0.1:9/none")
        .env("PORTAL_DATABASE_URL", "postgres://127.0.0.1:9/none")
        .env("AMQP_URL", "amqp://127.0.0.1:9/%2f")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            return (
                status.success(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            );
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            return (true, String::from_utf8_lossy(&out.stderr).into_owned());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

fn any_addr() -> String {
    format!("0.0.0.0:{}", free_port())
}

fn lo_addr() -> String {
    format!("127.0.0.1:{}", free_port())
}

/// Finding: with no token configured, every daemon served every RPC on 0.0.0.0.
#[test]
fn a_daemon_without_authentication_refuses_a_non_loopback_address_naming_it_r28() {
    for (binary, listen) in [
        ("credits-ledger", "LEDGER_LISTEN_ADDR"),
        ("credits-payments", "PAYMENTS_LISTEN_ADDR"),
        ("credits-recharge", "RECHARGE_LISTEN_ADDR"),
        ("credits-portal", "PORTAL_LISTEN_ADDR"),
    ] {
        let (ok, err) = run(
            binary,
            &[
                (listen, any_addr()),
                ("METRICS_ADDR", "off".into()),
                ("PORTAL_HTTP_ADDR", lo_addr()),
                ("PAYMENTS_PROCESSOR", "sandbox".into()),
            ],
        );
        assert!(!ok, "{binary} started on 0.0.0.0 without auth");
        assert!(
            err.contains(&format!("{listen}=0.0.0.0")) && err.contains("no authentication"),
            "{binary}: {err}"
        );
        // The metrics endpoint is an address like the others.
        let (ok, err) = run(
            binary,
            &[
                (listen, lo_addr()),
                ("METRICS_ADDR", any_addr()),
                ("PORTAL_HTTP_ADDR", lo_addr()),
                ("PAYMENTS_PROCESSOR", "sandbox".into()),
            ],
        );
        assert!(!ok, "{binary} served metrics on 0.0.0.0 without auth");
        assert!(err.contains("METRICS_ADDR=0.0.0.0"), "{binary}: {err}");
    }
    // The billing page and the webhook endpoint too.
    let (ok, err) = run(
        "credits-portal",
        &[
            ("PORTAL_LISTEN_ADDR", lo_addr()),
            ("PORTAL_HTTP_ADDR", any_addr()),
            ("METRICS_ADDR", "off".into()),
        ],
    );
    assert!(!ok);
    assert!(err.contains("PORTAL_HTTP_ADDR=0.0.0.0"), "{err}");
    let (ok, err) = run(
        "credits-payments",
        &[
            ("PAYMENTS_LISTEN_ADDR", lo_addr()),
            ("METRICS_ADDR", "off".into()),
            ("PAYMENTS_PROCESSOR", "stripe".into()),
            ("STRIPE_SECRET_KEY", "sk_test_x".into()),
            ("STRIPE_PUBLISHABLE_KEY", "pk_test_x".into()),
            ("STRIPE_WEBHOOK_SECRET", "whsec_x".into()),
            ("PAYMENTS_HTTP_ADDR", any_addr()),
        ],
    );
    assert!(!ok);
    assert!(err.contains("PAYMENTS_HTTP_ADDR=0.0.0.0"), "{err}");
}

/// With a token, the same non-loopback address is allowed: the ledger gets as far as its
/// database (which is not there).
#[test]
fn with_a_token_a_non_loopback_address_is_allowed_r28() {
    let (_, err) = run(
        "credits-ledger",
        &[
            ("LEDGER_LISTEN_ADDR", any_addr()),
            ("METRICS_ADDR", "off".into()),
            ("CREDITS_AUTH_TOKEN", TOKEN.into()),
        ],
    );
    assert!(!err.contains("no authentication"), "{err}");
}

fn token_file(text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(credits_tests::unique("tokens"));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("tokens");
    std::fs::write(&f, text).unwrap();
    f
}

/// Finding: a token file holding only a comment turned authentication off silently, and a
/// token with a `#` in it was cut there. Short or unprintable tokens are refused too.
#[test]
fn weak_or_empty_token_settings_refuse_start_up_naming_the_problem_r28() {
    let ledger = |extra: Vec<(&str, String)>| {
        let mut env = vec![
            ("LEDGER_LISTEN_ADDR", lo_addr()),
            ("METRICS_ADDR", "off".to_owned()),
        ];
        env.extend(extra);
        run("credits-ledger", &env)
    };
    let only_comment = token_file("# gateway 0123456789abcdef0123456789abcdef\n\n");
    let (ok, err) = ledger(vec![(
        "CREDITS_AUTH_TOKENS_FILE",
        only_comment.display().to_string(),
    )]);
    assert!(!ok);
    assert!(
        err.contains("CREDITS_AUTH_TOKENS_FILE") && err.contains("lists no token"),
        "{err}"
    );
    let short = token_file("billing short-token\n");
    let (ok, err) = ledger(vec![(
        "CREDITS_AUTH_TOKENS_FILE",
        short.display().to_string(),
    )]);
    assert!(!ok);
    assert!(
        err.contains("line 1") && err.contains("at least 32"),
        "{err}"
    );
    assert!(
        !err.contains("short-token"),
        "the error shows the token: {err}"
    );
    let (ok, err) = ledger(vec![("CREDITS_AUTH_TOKEN", "s3cret".into())]);
    assert!(!ok);
    assert!(
        err.contains("CREDITS_AUTH_TOKEN: a token must be at least 32"),
        "{err}"
    );
    let (ok, err) = ledger(vec![(
        "CREDITS_AUTH_TOKEN",
        "0123456789abcdef 0123456789abcdef".into(),
    )]);
    assert!(!ok);
    assert!(err.contains("printable ASCII"), "{err}");
}

/// Finding: the portal fell back to `CREDITS_AUTH_TOKEN` (internal: it can mint credits).
#[test]
fn the_portal_calls_the_services_with_a_billing_token_only_r28() {
    let portal = |extra: Vec<(&str, String)>| {
        let mut env = vec![
            ("PORTAL_LISTEN_ADDR", lo_addr()),
            ("PORTAL_HTTP_ADDR", lo_addr()),
            ("METRICS_ADDR", "off".to_owned()),
        ];
        env.extend(extra);
        run("credits-portal", &env)
    };
    let (ok, err) = portal(vec![("CREDITS_AUTH_TOKEN", TOKEN.into())]);
    assert!(!ok);
    assert!(err.contains("PORTAL_CLIENT_TOKEN is not set"), "{err}");
    let (ok, err) = portal(vec![
        ("CREDITS_AUTH_TOKEN", TOKEN.into()),
        ("PORTAL_CLIENT_TOKEN", TOKEN.into()),
    ]);
    assert!(!ok);
    assert!(err.contains("may do everything"), "{err}");
    let internal = "internal-0123456789abcdef0123456789ab";
    let billing = "billing-0123456789abcdef0123456789abc";
    let file = token_file(&format!("internal {internal}\nbilling {billing}\n"));
    let (ok, err) = portal(vec![
        ("CREDITS_AUTH_TOKENS_FILE", file.display().to_string()),
        ("PORTAL_CLIENT_TOKEN", internal.into()),
    ]);
    assert!(!ok);
    assert!(err.contains("has the internal role"), "{err}");
    let (ok, err) = portal(vec![
        ("CREDITS_AUTH_TOKENS_FILE", file.display().to_string()),
        (
            "PORTAL_CLIENT_TOKEN",
            "unknown-0123456789abcdef0123456789abc".into(),
        ),
    ]);
    assert!(!ok);
    assert!(err.contains("is not in CREDITS_AUTH_TOKENS_FILE"), "{err}");
    // A billing token starts it (it runs until killed: no database to wait for).
    let (started, err) = portal(vec![
        ("CREDITS_AUTH_TOKENS_FILE", file.display().to_string()),
        ("PORTAL_CLIENT_TOKEN", billing.into()),
    ]);
    assert!(started, "{err}");
    assert!(!err.contains("PORTAL_CLIENT_TOKEN"), "{err}");
}

/// Finding: `Debug` of configuration printed tokens and keys. Every configuration type
/// that has `Debug` is formatted with a planted secret in each secret field; none shows.
/// (The binaries' flag structs have no `Debug` at all.)
#[test]
fn no_debug_output_of_a_configuration_type_shows_a_secret_r28() {
    use credits_common::config::{DaemonConfig, Secret};
    const PLANTED: &str = "PLANTED-0123456789abcdef0123456789";
    let url = |scheme: &str| format!("{scheme}://user:{PLANTED}@host/db?password={PLANTED}");
    let mut daemon = DaemonConfig::new(&url("postgres"), &url("amqp"), "credits-ledger");
    daemon.auth_token = Some(Secret::new(PLANTED));
    let policy =
        credits_common::auth::Policy::new(Some(PLANTED), Some(&format!("billing {PLANTED}-b\n")))
            .unwrap();
    let client = credits_client::ClientConfig {
        token: Some(PLANTED.into()),
        ..credits_client::ClientConfig::local()
    };
    let stripe = credits_payments::stripe::StripeConfig {
        secret_key: Secret::new(PLANTED),
        publishable_key: "pk_test_public".into(),
        webhook_secret: Secret::new(PLANTED),
        api_base: "http://127.0.0.1:9".into(),
    };
    let keys = credits_portal::keys_from(Some(PLANTED), Some(&format!("{PLANTED}-old"))).unwrap();
    let mut portal = credits_portal::Config::new(client.clone(), "http://127.0.0.1:8080", keys);
    portal.auth_token = Some(Secret::new(PLANTED));
    let consumer = credits_recharge::consumer::ConsumerConfig {
        amqp_url: url("amqp"),
        exchange: "x".into(),
        queue: "q".into(),
        prefetch: 1,
        connection_name: "c".into(),
    };
    let shown = [
        format!("{daemon:?}"),
        format!("{policy:?}"),
        format!(
            "{:?}",
            credits_common::auth::AttachToken::new(Some(PLANTED)).unwrap()
        ),
        format!("{client:?}"),
        format!("{stripe:?}"),
        format!("{portal:?}"),
        format!("{consumer:?}"),
        credits_common::db::redact_url(&url("postgres")),
    ];
    for s in shown {
        assert!(!s.contains(PLANTED), "a secret in: {s}");
    }
}
