//! TLS between daemons and for clients: a ledger and a payments daemon serving gRPC over
//! TLS and requiring client certificates (mutual TLS), payments calling the ledger over
//! it, with a CA and certificates generated here (rcgen). A plaintext client and a client
//! without a certificate are refused. And TLS to the stores: PostgreSQL as `sslmode` in
//! the database URL asks, RabbitMQ over `amqps://` with a private CA.

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

impl Pki {
    /// What a daemon uses both ways: the server certificate, served and shown to peers.
    fn daemon(&self) -> Tls {
        Tls {
            cert: Some(self.server_cert.clone()),
            key: Some(self.server_key.clone()),
            ca: Some(self.ca.clone()),
        }
    }

    /// A client with its own certificate and the CA.
    fn client(&self) -> Tls {
        Tls {
            cert: Some(self.client_cert.clone()),
            key: Some(self.client_key.clone()),
            ca: Some(self.ca.clone()),
        }
    }
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

/// A ledger serving gRPC with `tls` on a free port, publishing to `exchange`: its https URL
/// and its task.
async fn tls_ledger(
    tls: &Tls,
    exchange: &str,
    shutdown: &CancellationToken,
) -> (String, tokio::task::JoinHandle<anyhow::Result<()>>) {
    let mut cfg = credits_ledger::Config::new(
        &credits_tests::fresh_database_url("ledger"),
        credits_tests::AMQP_URL,
    );
    cfg.daemon.exchange = exchange.to_owned();
    cfg.daemon.tls = tls.clone();
    let ledger = credits_ledger::App::build(cfg, shutdown).await.unwrap();
    let (l, url) = listener().await;
    (url, tokio::spawn(ledger.run(l, shutdown.clone())))
}

#[tokio::test]
async fn daemons_serve_and_call_each_other_over_mutual_tls() {
    let dir = std::env::temp_dir().join(credits_tests::unique("tls"));
    std::fs::create_dir_all(&dir).unwrap();
    let pki = pki(&dir);
    // The daemons use the server certificate both ways (served, and shown to peers).
    let daemon_tls = pki.daemon();
    let shutdown = CancellationToken::new();
    let exchange = credits_tests::unique("credits.events.tls");

    let (ledger_url, ledger_task) = tls_ledger(&daemon_tls, &exchange, &shutdown).await;

    let mut pcfg = credits_payments::Config::new(
        &credits_tests::fresh_database_url("payments"),
        credits_tests::AMQP_URL,
        &ledger_url,
    );
    pcfg.daemon.exchange = exchange.clone();
    pcfg.daemon.tls = daemon_tls.clone();
    let payments = credits_payments::App::build(pcfg, &shutdown).await.unwrap();
    let (pl, payments_url) = listener().await;
    let payments_task = tokio::spawn(payments.run(pl, shutdown.clone()));

    // A client with the CA and its own certificate: every call works, and payments
    // credits the ledger over mutual TLS.
    let good = client(&ledger_url, &payments_url, &pki.client());
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
    credits_tests::delete_queues(&format!("{exchange}.unrouted")).await;
}

/// `sslmode` in `DATABASE_URL` is honoured: with `require` every connection the ledger
/// holds is TLS, with `disable` none is. (`verify-ca`/`verify-full` with `sslrootcert`
/// verify the server too; the machine's PostgreSQL offers only Debian's self-signed
/// "snakeoil" certificate.)
#[tokio::test]
async fn the_ledger_reaches_postgresql_over_tls_as_its_url_asks() {
    use credits_tests::{Ledger, LedgerOptions, fresh_database_url, pg_base, pg_connect};
    let mut admin = pg_connect(&format!("{}/postgres", pg_base())).await;
    let ssl: String = sqlx::query_scalar("SHOW ssl")
        .fetch_one(&mut admin)
        .await
        .unwrap();
    assert_eq!(
        ssl, "on",
        "needs PostgreSQL with ssl = on (Debian's default)"
    );
    for (mode, want_tls) in [("require", true), ("disable", false)] {
        let base = fresh_database_url("ledger");
        let name = base.rsplit('/').next().unwrap().to_owned();
        let ledger = Ledger::start_with(LedgerOptions {
            database_url: Some(format!("{base}?sslmode={mode}")),
            ..Default::default()
        })
        .await;
        let c = ledger.api();
        c.prepaid("acme", "10").await;
        assert_eq!(c.balance("acme").await, money("10"));
        let (tls, plain): (i64, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl)
             FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) WHERE a.datname = $1",
        )
        .bind(&name)
        .fetch_one(&mut admin)
        .await
        .unwrap();
        if want_tls {
            assert!(tls >= 1 && plain == 0, "{mode}: {tls} TLS, {plain} plain");
        } else {
            assert!(plain >= 1 && tls == 0, "{mode}: {tls} TLS, {plain} plain");
        }
        ledger.stop().await;
    }
}

/// A TLS listener in front of the local RabbitMQ (what a broker's TLS port is to a client):
/// TLS with `cert`/`key`, then bytes piped to 127.0.0.1:5672. Returns the port and how many
/// TLS handshakes it completed.
async fn tls_front_for_rabbitmq(
    cert: &Path,
    key: &Path,
) -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    let key = PrivateKeyDer::from_pem_file(key).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let handshakes = Arc::new(AtomicUsize::new(0));
    let counted = handshakes.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, counted) = (acceptor.clone(), counted.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                counted.fetch_add(1, Ordering::SeqCst);
                if let Ok(mut broker) = tokio::net::TcpStream::connect("127.0.0.1:5672").await {
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut broker).await;
                }
            });
        }
    });
    (port, handshakes)
}

/// `amqps://` with `AMQP_TLS_CA_FILE`: the ledger (the real binary) publishes its events
/// through a TLS connection verified against a private CA, and they reach a consumer.
#[tokio::test]
async fn the_ledger_publishes_over_amqps_verified_by_a_private_ca() {
    use credits_tests::procs::{Proc, free_port, wait_healthy};
    use credits_tests::{EventTap, fresh_database_url, unique};
    let dir = std::env::temp_dir().join(unique("amqps"));
    std::fs::create_dir_all(&dir).unwrap();
    let pki = pki(&dir);
    let (port, handshakes) = tls_front_for_rabbitmq(&pki.server_cert, &pki.server_key).await;
    let exchange = unique("credits.events.amqps");
    let mut tap = EventTap::bind(&exchange, "ledger.#").await;
    let grpc = free_port();
    let ledger = Proc::spawn(
        "ledger-amqps",
        "credits-ledger",
        &[],
        &[
            ("DATABASE_URL", fresh_database_url("ledger")),
            (
                "AMQP_URL",
                format!("amqps://guest:guest@127.0.0.1:{port}/%2f"),
            ),
            ("AMQP_TLS_CA_FILE", pki.ca.display().to_string()),
            ("CREDITS_EXCHANGE", exchange.clone()),
            ("LEDGER_LISTEN_ADDR", format!("127.0.0.1:{grpc}")),
            ("METRICS_ADDR", "off".to_owned()),
        ],
    );
    let url = format!("http://127.0.0.1:{grpc}");
    wait_healthy(&url, "credits.ledger.v1.LedgerService", &ledger).await;
    let c =
        credits_tests::api::Api::connect(&url, credits_tests::NOBODY, credits_tests::NOBODY, None);
    c.prepaid("acme", "10").await;
    let ev = tap
        .next_of(
            "ledger.account.activated",
            std::time::Duration::from_secs(20),
        )
        .await;
    assert!(
        ev.is_some(),
        "the event went out over amqps; log:\n{}",
        ledger.logs()
    );
    assert!(
        handshakes.load(std::sync::atomic::Ordering::SeqCst) >= 1,
        "through the TLS front"
    );
    ledger.stop().await;
    credits_tests::delete_queues(&format!("{exchange}.unrouted")).await;
}

/// R28: the portal over TLS end to end — its page served over TLS (`PORTAL_TLS_CERT`/
/// `KEY`), `PortalService` over mutual TLS, and its own calls to the services (here the
/// ledger, which `CreatePortalSession` asks) over mutual TLS with the same files.
#[tokio::test]
async fn the_portal_serves_its_page_over_tls_and_calls_the_services_over_mutual_tls_r28() {
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    let dir = std::env::temp_dir().join(credits_tests::unique("tls-portal"));
    std::fs::create_dir_all(&dir).unwrap();
    let pki = pki(&dir);
    let daemon_tls = pki.daemon();
    let shutdown = CancellationToken::new();
    let exchange = credits_tests::unique("credits.events.tls");
    let (ledger_url, ledger_task) = tls_ledger(&daemon_tls, &exchange, &shutdown).await;
    let client_tls = pki.client();
    client(&ledger_url, &ledger_url, &client_tls)
        .ledger()
        .create_account(&acct("acme"), BillingMode::Prepaid, "")
        .await
        .unwrap();

    let (gl, portal_url) = listener().await;
    let page = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let page_port = page.local_addr().unwrap().port();
    let mut cfg = credits_portal::Config::new(
        ClientConfig {
            ledger_url: ledger_url.clone(),
            payments_url: ledger_url.clone(),
            recharge_url: ledger_url.clone(),
            retry: RetryPolicy::none(),
            ..ClientConfig::local()
        },
        &format!("https://localhost:{page_port}"),
        credits_portal::session::Keys::random(),
    );
    cfg.tls = daemon_tls.clone();
    // An https page is not local development: PortalService needs a token.
    const TOKEN: &str = "portal-tls-test-token-0123456789abcdef";
    cfg.auth_token = Some(credits_common::config::Secret::new(TOKEN));
    cfg.page_tls = Some((pki.server_cert.clone(), pki.server_key.clone()));
    cfg.database_url =
        credits_common::config::DatabaseUrl::new(credits_tests::fresh_database_url("portal"));
    let portal = credits_portal::App::build(cfg, &shutdown).await.unwrap();
    let portal_task = tokio::spawn(portal.run(gl, page, shutdown.clone()));
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!portal_task.is_finished(), "the portal stopped");

    // PortalService over mutual TLS; the portal asks the ledger over mutual TLS.
    let sessions = credits_client::Portal::connect_with_tls(
        &portal_url,
        Some(TOKEN),
        std::time::Duration::from_secs(10),
        &client_tls,
    )
    .unwrap();
    let s = sessions
        .create_portal_session(&acct("acme"), None)
        .await
        .expect("a session, the ledger asked over mutual TLS");
    assert!(
        s.url
            .starts_with(&format!("https://localhost:{page_port}/session?token="))
    );
    let plain = credits_client::Portal::connect(
        &portal_url.replace("https://", "http://"),
        Some(TOKEN),
        std::time::Duration::from_secs(5),
    )
    .unwrap();
    assert!(
        plain
            .create_portal_session(&acct("acme"), None)
            .await
            .is_err()
    );

    // The page over TLS, verified against the CA.
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(&pki.ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", page_port))
        .await
        .unwrap();
    let mut tls = connector
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .expect("the page's TLS handshake");
    tls.write_all(b"GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out).await;
    let out = String::from_utf8_lossy(&out);
    assert!(
        out.starts_with("HTTP/1.0 200") || out.starts_with("HTTP/1.1 200"),
        "{out}"
    );
    // Plain HTTP to the TLS page gets no page.
    let plain_page =
        credits_tests::http_get(&format!("127.0.0.1:{page_port}"), "/healthz", None).await;
    assert!(!plain_page.contains("200 OK"), "{plain_page}");

    shutdown.cancel();
    let _ = portal_task.await;
    let _ = ledger_task.await;
    credits_tests::delete_queues(&format!("{exchange}.unrouted")).await;
}
