//! `credits-chaos`: a bounded soak that runs every daemon as its own process (two ledgers,
//! two payments, two recharge workers), drives usage and purchases on prepaid accounts with
//! auto-recharge, injects faults — `kill -9` and restart, RabbitMQ connection kills and
//! broker restarts, PostgreSQL connection terminations, a slow processor, poison messages,
//! and long ones: the ledger or the broker down for a minute or more, the recharge queue
//! deleted, a recharge replica frozen past its lease or running with a wrong auth token —
//! then stops the faults, waits for quiescence, and checks the money invariants, printing
//! each figure. Exits non-zero if any invariant fails. The seed is printed for replay.
//!
//! `--processor stripe` runs the same soak against `localstripe` (the Stripe emulator):
//! cards added as Stripe tokens, charges through a proxy that replays idempotency keys as
//! Stripe does and loses answers, webhooks delivered late, twice and out of order,
//! refunds and disputes made at the processor — and two more invariants (12, 13) that tie
//! the processor's records to the ledger ([`stripe`]).

#![allow(clippy::print_stdout)] // the report is this tool's output

mod check;
mod faults;
mod ha;
mod procs;
mod rng;
mod stripe;
mod workload;

use std::time::{Duration, Instant};

use clap::Parser;

use crate::faults::{Durations, FaultCounts};
use crate::procs::{Daemon, Spec, sh};
use crate::rng::Rng;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "credits-chaos",
    about = "Fault-injection soak with invariant checks"
)]
pub struct Args {
    /// Seconds of workload under faults.
    #[arg(long, default_value_t = 120)]
    pub duration: u64,
    /// Seed for the workload and the fault schedule (random when omitted; always printed).
    #[arg(long)]
    pub seed: Option<u64>,
    #[arg(long, default_value_t = 200)]
    pub accounts: usize,
    /// Concurrent workload callers.
    #[arg(long, default_value_t = 12)]
    pub workers: usize,
    /// Mean milliseconds between faults.
    #[arg(long, default_value_t = 3000)]
    pub fault_every_ms: u64,
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432")]
    pub pg_url: String,
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    pub amqp_url: String,
    /// Seconds to wait for quiescence after the faults stop.
    #[arg(long, default_value_t = 180)]
    pub settle: u64,
    /// Keep the databases and logs for inspection.
    #[arg(long)]
    pub keep: bool,
    /// The processor payments charges through: the built-in `sandbox`, or `stripe` against
    /// `localstripe` (started by the harness on a free port).
    #[arg(long, default_value = "sandbox", value_parser = ["sandbox", "stripe"])]
    pub processor: String,
    /// Run over a PostgreSQL failover pair and a three-node RabbitMQ cluster (started with
    /// `deploy/ha/postgres up` and `deploy/ha/rabbitmq up` when not running; `--pg-url`
    /// and `--amqp-url` are theirs) and inject machine-loss faults instead: the primary
    /// killed, paused past the failover timeout, or cut off from the network (its
    /// namespace's link down), a broker node killed ([`ha`]).
    #[arg(long)]
    pub ha: bool,
}

impl Args {
    pub fn stripe(&self) -> bool {
        self.processor == "stripe"
    }
}

/// The Stripe side of a `--processor stripe` run.
pub struct StripeSide {
    pub emulator: stripe::Emulator,
    pub proxy: stripe::Proxy,
    pub relay: stripe::Relay,
}

pub struct Cluster {
    pub run: String,
    /// Two ledger replicas on one database: payments, recharge and the workload's callers
    /// of replica `i` use ledger `i`, so postings, holds and access checks interleave
    /// across replicas. The ledger outage fault takes down `ledger[0]`.
    pub ledger: Vec<Daemon>,
    pub payments: Vec<Daemon>,
    pub recharge: Vec<Daemon>,
    pub exchange: String,
    pub queue: String,
    pub dbs: [String; 3],
    /// The bearer token every daemon requires and sends (`CREDITS_AUTH_TOKEN`): running
    /// with auth on is what production does, and what the token-mismatch fault breaks.
    pub token: String,
    /// Each payments replica's webhook endpoint (Stripe runs).
    pub webhook_urls: Vec<String>,
    pub stripe: Option<StripeSide>,
}

impl Cluster {
    pub fn all(&mut self) -> Vec<&mut Daemon> {
        let mut v: Vec<&mut Daemon> = self.ledger.iter_mut().collect();
        v.extend(self.payments.iter_mut());
        v.extend(self.recharge.iter_mut());
        v
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// The processor settings of a payments replica: the sandbox, or Stripe through the
/// harness's proxy with webhooks received on `http_port`.
fn processor_env(proxy: Option<&str>, http_port: u16) -> Vec<(&'static str, String)> {
    // Both processors answer in well under a second here: a refund left by a killed
    // replica is resumed within the settle window.
    let mut env = vec![
        ("REFUND_LEASE_SECS", "20".to_owned()),
        ("PAYMENTS_HTTP_ADDR", format!("127.0.0.1:{http_port}")),
    ];
    env.extend(match proxy {
        Some(base) => vec![
            ("PAYMENTS_PROCESSOR", "stripe".to_owned()),
            ("STRIPE_SECRET_KEY", stripe::SECRET_KEY.to_owned()),
            ("STRIPE_PUBLISHABLE_KEY", stripe::PUBLISHABLE_KEY.to_owned()),
            ("STRIPE_WEBHOOK_SECRET", stripe::WEBHOOK_SECRET.to_owned()),
            ("STRIPE_API_BASE", base.to_owned()),
        ],
        None => vec![
            ("SANDBOX_ACH_SETTLE_MS", "1000".to_owned()),
            ("PAYMENTS_PROCESSOR", "sandbox".to_owned()),
        ],
    });
    env
}

fn cluster(a: &Args, run: &str, logdir: &std::path::Path, proxy: Option<&str>) -> Cluster {
    let base = a.pg_url.trim_end_matches('/');
    let dbs = [
        format!("{run}_ledger"),
        format!("{run}_payments"),
        format!("{run}_recharge"),
    ];
    let exchange = format!("credits.events.{run}");
    let queue = format!("credits.recharge.{run}");
    let token = uuid::Uuid::new_v4().simple().to_string();
    let common = |db: &str| {
        vec![
            ("DATABASE_URL".to_owned(), format!("{base}/{db}")),
            ("AMQP_URL".to_owned(), a.amqp_url.clone()),
            ("CREDITS_EXCHANGE".to_owned(), exchange.clone()),
            ("DB_MAX_CONNECTIONS".to_owned(), "10".to_owned()),
            ("CREDITS_AUTH_TOKEN".to_owned(), token.clone()),
            // Events no queue takes here (charges, attempts, access changes) are parked
            // soon, so the outboxes drain; crossings lost while the recharge queue is
            // deleted are found by the reconciler.
            ("OUTBOX_PARK_AFTER_SECS".to_owned(), "3".to_owned()),
        ]
    };
    // A daemon on a free port: the common settings, its listen address, then `extra`.
    let daemon = |name: &str, binary: &str, db: &str, listen: &str, extra: Vec<(&str, String)>| {
        let port = free_port();
        let mut env = common(db);
        env.push((listen.to_owned(), format!("127.0.0.1:{port}")));
        env.extend(extra.into_iter().map(|(k, v)| (k.to_owned(), v)));
        let (name, binary) = (name.to_owned(), binary.to_owned());
        Daemon::new(
            Spec {
                name,
                binary,
                env,
                port,
            },
            logdir,
        )
    };
    let ledger: Vec<Daemon> = ["ledger-a", "ledger-b"]
        .into_iter()
        .map(|name| {
            daemon(
                name,
                "credits-ledger",
                &dbs[0],
                "LEDGER_LISTEN_ADDR",
                vec![],
            )
        })
        .collect();
    let mut webhook_urls = Vec::new();
    let payments: Vec<Daemon> = ["payments-a", "payments-b"]
        .into_iter()
        .zip(&ledger)
        .map(|(name, ledger)| {
            let http_port = free_port();
            webhook_urls.push(format!("http://127.0.0.1:{http_port}/webhooks/stripe"));
            let mut env = vec![("LEDGER_URL", ledger.url())];
            env.extend(processor_env(proxy, http_port));
            daemon(
                name,
                "credits-payments",
                &dbs[1],
                "PAYMENTS_LISTEN_ADDR",
                env,
            )
        })
        .collect();
    let recharge = ["recharge-a", "recharge-b"]
        .into_iter()
        .zip(payments.iter().zip(&ledger))
        .map(|(name, (payments, ledger))| {
            daemon(
                name,
                "credits-recharge",
                &dbs[2],
                "RECHARGE_LISTEN_ADDR",
                vec![
                    ("LEDGER_URL", ledger.url()),
                    ("PAYMENTS_URL", payments.url()),
                    ("RECHARGE_QUEUE", queue.clone()),
                    ("RECHARGE_RETRY_AFTER_FAILURE_SECS", "2".into()),
                    (
                        "RECHARGE_LEASE_SECS",
                        faults::RECHARGE_LEASE.as_secs().to_string(),
                    ),
                    ("RECHARGE_RECONCILE_SECS", "3".into()),
                ],
            )
        })
        .collect();
    Cluster {
        run: run.to_owned(),
        ledger,
        payments,
        recharge,
        exchange,
        queue,
        dbs,
        token,
        webhook_urls,
        stripe: None,
    }
}

/// Waits until a daemon's health service says SERVING.
async fn healthy(url: &str, service: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(ch) = tonic::transport::Endpoint::from_shared(url.to_owned())
            .map(|e| e.connect_timeout(Duration::from_secs(1)))
            && let Ok(ch) = ch.connect().await
        {
            let mut h = tonic_health::pb::health_client::HealthClient::new(ch);
            if let Ok(r) = h
                .check(tonic_health::pb::HealthCheckRequest {
                    service: service.to_owned(),
                })
                .await
                && r.into_inner().status
                    == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
            {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

async fn all_healthy(c: &Cluster) -> bool {
    let mut ok = true;
    for l in &c.ledger {
        ok &= healthy(&l.url(), "credits.ledger.v1.LedgerService").await;
    }
    for p in &c.payments {
        ok &= healthy(&p.url(), "credits.payments.v1.PaymentsService").await;
    }
    for r in &c.recharge {
        ok &= healthy(&r.url(), "credits.recharge.v1.AutoRechargeService").await;
    }
    ok
}

#[tokio::main]
async fn main() {
    let mut a = Args::parse();
    if a.ha {
        match ha::up().await {
            Ok((pg, mq)) => {
                println!(
                    "ha topology: PostgreSQL {pg}, RabbitMQ {}",
                    credits_common::db::redact_url(&mq)
                );
                if let Err(e) = ha::create_probe_table(&pg).await {
                    println!("chaos: harness error: cannot write to the pair's primary: {e:#}");
                    std::process::exit(2);
                }
                a.pg_url = pg;
                a.amqp_url = mq;
            }
            Err(e) => {
                println!("chaos: harness error: the ha topology did not start: {e:#}");
                std::process::exit(2);
            }
        }
    }
    let seed = a.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    println!(
        "credits-chaos: seed {seed} (replay with --seed {seed}), {} s, {} accounts, {} workers",
        a.duration, a.accounts, a.workers
    );
    let code = match run(&a, seed).await {
        Ok(true) => {
            println!("chaos: all invariants held");
            0
        }
        Ok(false) => {
            println!("chaos: INVARIANTS FAILED (seed {seed})");
            1
        }
        Err(e) => {
            println!("chaos: harness error: {e:#} (seed {seed})");
            2
        }
    };
    std::process::exit(code);
}

async fn run(a: &Args, seed: u64) -> anyhow::Result<bool> {
    let mut rng = Rng::new(seed);
    let run = format!(
        "chaos_{seed:x}_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..6]
    );
    let logdir = std::env::temp_dir().join(&run);
    std::fs::create_dir_all(&logdir)?;
    println!("logs in {}", logdir.display());
    // A run interrupted in the middle of a broker outage leaves the app stopped.
    sh("rabbitmqctl", &["-q", "start_app"]).await;
    let (emulator, proxy) = if a.stripe() {
        let emulator = stripe::Emulator::start(&logdir).await?;
        let proxy = stripe::Proxy::start(&emulator.api.base, rng.fork()).await?;
        println!(
            "localstripe on {}, the processor proxy on {}",
            emulator.api.base, proxy.url
        );
        (Some(emulator), Some(proxy))
    } else {
        (None, None)
    };
    let mut c = cluster(a, &run, &logdir, proxy.as_ref().map(|p| p.url.as_str()));
    if let (Some(emulator), Some(proxy)) = (emulator, proxy) {
        let relay = stripe::Relay::start(c.webhook_urls.clone(), rng.fork()).await?;
        emulator
            .api
            .post(
                "/_config/webhooks/chaos",
                &[
                    ("url", relay.url.clone()),
                    ("secret", stripe::WEBHOOK_SECRET.to_owned()),
                ],
            )
            .await?;
        c.stripe = Some(StripeSide {
            emulator,
            proxy,
            relay,
        });
    }
    for d in c.all() {
        d.start()?;
    }
    anyhow::ensure!(
        all_healthy(&c).await,
        "daemons did not become healthy; see {}",
        logdir.display()
    );

    let t0 = Instant::now();
    let clients = workload::Clients::new(&c)?;
    // Invariant 16 (R31): a gateway's cache of every account on ledger A, through its faults.
    let applied: check::Applied = Default::default();
    let cache = {
        let applied = applied.clone();
        credits_client::AccessCache::start(
            clients.ledger[0].clone(),
            credits_client::AccessCacheConfig {
                on_update: Some(std::sync::Arc::new(move |u, _| {
                    let resets = check::CACHE_RESETS.load(std::sync::atomic::Ordering::Relaxed);
                    if let Ok(mut m) = applied.lock() {
                        m.entry(u.account_id.as_str().to_owned())
                            .or_default()
                            .push((resets, u.seq));
                    }
                })),
                on_reset: Some(std::sync::Arc::new(|| {
                    check::CACHE_RESETS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                })),
                ..Default::default()
            },
        )
    };
    check::bind_alerts(&a.amqp_url, &c.exchange, &c.queue).await?;
    let api = c.stripe.as_ref().map(|s| s.emulator.api.clone());
    let accounts = workload::setup(&clients, a.accounts, &mut rng, api.as_ref()).await?;
    println!(
        "[{:6.1}s] set up {} accounts ({} with declining cards, {} that will switch to ACH, {} with cards that need 3-D Secure)",
        t0.elapsed().as_secs_f32(),
        accounts.len(),
        accounts
            .iter()
            .filter(|x| x.kind == workload::Kind::Declining)
            .count(),
        accounts
            .iter()
            .filter(|x| x.kind == workload::Kind::AchSwitcher)
            .count(),
        accounts
            .iter()
            .filter(|x| x.kind == workload::Kind::ThreeDs)
            .count()
    );

    let durations = Durations::for_run(a.duration);
    if !a.ha {
        println!(
            "long faults: ledger outage {:.1} s, broker outage {:.1} s, wrong token {:.1} s, recharge replica paused {:.0} s (lease {} s); each forced once at the start",
            durations.ledger_outage.as_secs_f32(),
            durations.broker_outage.as_secs_f32(),
            durations.token_mismatch.as_secs_f32(),
            durations.recharge_pause.as_secs_f32(),
            faults::RECHARGE_LEASE.as_secs()
        );
    }
    let mut faults = FaultCounts::default();
    for key in [
        "ledger.balance.threshold_crossed",
        "payments.payment_method.default_changed",
    ] {
        workload::publish_poison(&a.amqp_url, &c.exchange, key).await?;
        faults.poison += 1;
    }
    let until = Instant::now() + Duration::from_secs(a.duration);
    let load = tokio::spawn(workload::drive(
        clients.clone(),
        accounts.clone(),
        a.workers,
        rng.fork(),
        until,
        api.clone(),
    ));
    // The processor's own faults, each forced once early (a short run may not roll them):
    // answers lost after the work for 6 s, then the processor down for 3 s.
    if let Some(s) = &c.stripe {
        let proxy = s.proxy.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            println!(
                "[{:6.1}s] fault: processor loses a third of its answers for 6 s (the work done); forced once",
                t0.elapsed().as_secs_f32()
            );
            proxy.lose_answers_for(Duration::from_secs(6));
            tokio::time::sleep(Duration::from_secs(10)).await;
            println!(
                "[{:6.1}s] fault: processor down (503) for 3 s; forced once",
                t0.elapsed().as_secs_f32()
            );
            proxy.down_for(Duration::from_secs(3));
        });
    }
    let dashboard = c.stripe.as_ref().map(|s| {
        tokio::spawn(stripe::dashboard(
            s.emulator.api.clone(),
            s.relay.clone(),
            rng.fork(),
            until,
        ))
    });
    let ha_run = if a.ha {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let probe = ha::probe_access(&clients, &accounts, cache.clone(), stop.clone());
        let probe_account = accounts[0].id.clone();
        let r = ha::inject(
            &mut c,
            &a.pg_url,
            &clients.ledger,
            &probe_account,
            rng.fork(),
            until,
            t0,
        )
        .await;
        stop.store(true, std::sync::atomic::Ordering::Release);
        Some((r, probe.await?))
    } else {
        faults::inject(&mut c, a, rng.fork(), until, &mut faults, t0, durations).await;
        None
    };
    let report = load.await?;
    let dashboard = match dashboard {
        Some(d) => Some(d.await?),
        None => None,
    };
    if let Some(s) = &c.stripe {
        s.proxy.heal();
    }
    // Faults are over: the broker runs, every daemon runs.
    sh("rabbitmqctl", &["-q", "start_app"]).await;
    for d in c.all() {
        if d.child
            .as_mut()
            .is_none_or(|ch| ch.try_wait().ok().flatten().is_some())
        {
            let _ = d.restart().await;
        }
    }
    println!(
        "[{:6.1}s] faults stopped: {faults}",
        t0.elapsed().as_secs_f32()
    );
    println!("workload: {report}");
    if let Some((r, av)) = &ha_run {
        println!("{r}");
        println!("ha {av}");
    }
    if let (Some(s), Some(d)) = (&c.stripe, &dashboard) {
        use std::sync::atomic::Ordering::Relaxed;
        let (p, r) = (s.proxy.stats(), s.relay.stats());
        println!(
            "processor: {} calls forwarded, {} answered again from an idempotency key, {} refused as a key in flight (409), {} answers lost, {} refused while down; \
             dashboard: {} refunds, {} disputes ({} closed won, {} lost); webhooks: {} from the emulator + {} made here, {} sent twice, {} deliveries, {} failed and sent again",
            p.forwarded.load(Relaxed),
            p.replayed.load(Relaxed),
            p.in_use.load(Relaxed),
            p.lost_answers.load(Relaxed),
            p.refused_down.load(Relaxed),
            d.refunds,
            d.disputes.len(),
            d.disputes
                .iter()
                .filter(|x| x.closed_won == Some(true))
                .count(),
            d.disputes
                .iter()
                .filter(|x| x.closed_won == Some(false))
                .count(),
            r.received.load(Relaxed),
            r.synthetic.load(Relaxed),
            r.duplicated.load(Relaxed),
            r.delivered.load(Relaxed),
            r.failed_deliveries.load(Relaxed),
        );
    }

    let ok = check::settle_and_check(
        a,
        &c,
        &accounts,
        &report,
        faults.poison,
        t0,
        dashboard.as_ref(),
    )
    .await?;
    let ok = check::check_cache(a, &c, &cache, &applied).await? && ok;
    let ok = match &ha_run {
        Some((r, _)) if !r.ok() => {
            println!("ha: FAILED: split brain or a fault that did not recover");
            false
        }
        _ => ok,
    };
    drop(cache);

    let mut clean = true;
    for d in c.all() {
        if let Err(e) = d.stop().await {
            println!("{}: {e} (its log: {})", d.spec.name, d.log.display());
            clean = false;
        }
    }
    println!("daemons stopped cleanly on SIGTERM: {clean}");
    // A daemon that did not stop cleanly keeps the logs that say why.
    if !a.keep && ok && clean {
        check::drop_all(&a.pg_url, &c.dbs, &a.amqp_url, &c.queue, &c.exchange).await;
        let _ = std::fs::remove_dir_all(&logdir);
    } else {
        println!(
            "kept databases {:?} and logs in {}",
            c.dbs,
            logdir.display()
        );
    }
    Ok(ok && clean)
}
