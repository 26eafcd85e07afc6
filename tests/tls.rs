//! TLS between daemons and for clients: a ledger and a payments daemon serving gRPC over
//! TLS and requiring client certificates (mutual TLS), payments calling the ledger over
//! it, with a CA and certificates generated here (rcgen). A plaintext client and a client
//! without a certificate are refused.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use credits_client::{Client, ClientConfig, RetryPolicy};
use credits_common::tls::Tls;
use credits_tests::api::{BillingMode, acct, card, key, money};
use tokio_util::sync::CancellationToken;

/// A CA, a certificate for the services (localhost, 127.0.0.1) and one for a client,
/// all signed by the CA, written as PEM files under `dir`.
struct Pki {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

fn pki(dir: &Path) -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "credits test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf = |names: Vec<String>, cn: &str| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(names).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf(vec!["localhost".into(), "127.0.0.1".into()], "credits");
    let (client_cert, client_key) = leaf(vec!["client".into()], "client");
    let write = |name: &str, pem: &str| {
        let p = dir.join(name);
        std::fs::write(&p, pem).unwrap();
        p
    };
    Pki {
        ca: write("ca.pem", &ca.pem()),
        server_cert: write("server.pem", &server_cert),
        server_key: write("server.key", &server_key),
        client_cert: write("client.pem", &client_cert),
        client_key: write("client.key", &client_key),
    }
}

async fn listener() -> (tokio::net::TcpListener, String) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://localhost:{}", l.local_addr().unwrap().port());
    (l, url)
}

fn client(url_ledger: &str, url_payments: &str, tls: &Tls) -> Client {
    Client::connect_with_tls(
        ClientConfig {
            ledger_url: url_ledger.to_owned(),
            payments_url: url_payments.to_owned(),
            retry: RetryPolicy::none(),
            ..ClientConfig::local()
        },
        tls,
    )
    .unwrap()
}

#[tokio::test]
async fn daemons_serve_and_call_each_other_over_mutual_tls() {
    let dir = std::env::temp_dir().join(credits_tests::unique("tls"));
    std::fs::create_dir_all(&dir).unwrap();
    let pki = pki(&dir);
    // The daemons use the server certificate both ways (served, and shown to peers).
    let daemon_tls = Tls {
        cert: Some(pki.server_cert.clone()),
        key: Some(pki.server_key.clone()),
        ca: Some(pki.ca.clone()),
    };
    let shutdown = CancellationToken::new();

    let mut lcfg = credits_ledger::Config::new(
        &credits_tests::fresh_database_url("ledger"),
        credits_tests::AMQP_URL,
    );
    lcfg.daemon.exchange = credits_tests::unique("credits.events.tls");
    lcfg.daemon.tls = daemon_tls.clone();
    let ledger = credits_ledger::App::build(lcfg, &shutdown).await.unwrap();
    let (ll, ledger_url) = listener().await;
    let ledger_task = tokio::spawn(ledger.run(ll, shutdown.clone()));

    let mut pcfg = credits_payments::Config::new(
        &credits_tests::fresh_database_url("payments"),
        credits_tests::AMQP_URL,
        &ledger_url,
    );
    pcfg.daemon.exchange = credits_tests::unique("credits.events.tls");
    pcfg.daemon.tls = daemon_tls.clone();
    let payments = credits_payments::App::build(pcfg, &shutdown).await.unwrap();
    let (pl, payments_url) = listener().await;
    let payments_task = tokio::spawn(payments.run(pl, shutdown.clone()));

    // A client with the CA and its own certificate: every call works, and payments
    // credits the ledger over mutual TLS.
    let good = client(
        &ledger_url,
        &payments_url,
        &Tls {
            cert: Some(pki.client_cert.clone()),
            key: Some(pki.client_key.clone()),
            ca: Some(pki.ca.clone()),
        },
    );
    let a = acct("acme");
    good.ledger()
        .create_account(&a, BillingMode::Prepaid, "Acme")
        .await
        .unwrap();
    good.payments()
        .add_payment_method(&a, &card("4242424242424242"), true)
        .await
        .unwrap();
    let bought = good
        .payments()
        .purchase_credits(&a, money("25"), None, &key("tls-1"))
        .await
        .unwrap();
    assert_eq!(
        bought.balance,
        Some(money("25.00")),
        "credited by payments over mTLS"
    );
    assert_eq!(
        good.ledger().get_account(&a).await.unwrap().balance,
        money("25.00")
    );

    // Without a client certificate the handshake is refused (mutual TLS).
    let no_cert = client(
        &ledger_url,
        &payments_url,
        &Tls {
            ca: Some(pki.ca.clone()),
            ..Tls::default()
        },
    );
    let e = no_cert.ledger().get_account(&a).await.unwrap_err();
    assert!(
        matches!(
            e.code(),
            credits_client::Code::Unknown | credits_client::Code::Unavailable
        ),
        "refused at the transport, not answered: {e:?}"
    );
    // Plaintext to a TLS port: refused.
    let plain = client(
        &ledger_url.replace("https://", "http://"),
        &payments_url.replace("https://", "http://"),
        &Tls::default(),
    );
    assert!(plain.ledger().get_account(&a).await.is_err());
    // A certificate without its key is a start-up error naming the settings.
    let half = Tls {
        cert: Some(pki.client_cert.clone()),
        ..Tls::default()
    };
    let e = half.server().unwrap_err().to_string();
    assert!(e.contains("CREDITS_TLS_CERT and CREDITS_TLS_KEY"), "{e}");
    let e = Tls {
        ca: Some(dir.join("missing.pem")),
        ..Tls::default()
    }
    .client()
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("CREDITS_TLS_CA") && e.contains("missing.pem"),
        "{e}"
    );

    shutdown.cancel();
    let _ = tokio::join!(ledger_task, payments_task);
}
