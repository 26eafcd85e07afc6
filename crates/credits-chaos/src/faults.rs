//! The seeded fault schedule. Short faults (a `kill -9`, a connection kill, a 1–3 s broker
//! restart…) run inline; long ones (the ledger or the broker down for a minute, a recharge
//! replica frozen past its lease or running with a wrong token) leave a timed recovery
//! behind, so the short faults keep coming meanwhile. While a long fault holds a resource,
//! no other fault touches it: a `kill -9` and restart of the frozen replica, or a broker
//! restart in the middle of a broker outage, would end that fault early and test nothing.

use std::time::{Duration, Instant};

use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;

use crate::procs::{Spec, sh};
use crate::rng::Rng;
use crate::{Args, Cluster, check};

/// The recharge workers' attempt lease, passed to them as `RECHARGE_LEASE_SECS`; the
/// pause fault outlasts it.
pub const RECHARGE_LEASE: Duration = Duration::from_secs(10);

#[derive(Default, Debug)]
pub struct FaultCounts {
    pub kill9: u32,
    pub amqp_close_all: u32,
    pub broker_restart: u32,
    pub pg_terminate: u32,
    pub slow_processor: u32,
    pub poison: u32,
    pub ledger_outage: u32,
    pub broker_outage: u32,
    pub queue_delete: u32,
    pub recharge_pause: u32,
    pub token_mismatch: u32,
    /// Per queue deletion: seconds until a daemon had declared the queue again, `None`
    /// when none did within the watch bound.
    pub queue_redeclared_after: Vec<Option<f32>>,
}

impl std::fmt::Display for FaultCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redeclared: Vec<String> = self
            .queue_redeclared_after
            .iter()
            .map(|d| d.map_or("never".to_owned(), |s| format!("{s:.1} s")))
            .collect();
        write!(
            f,
            "kill -9 {}, close_all_connections {}, broker restart {}, pg_terminate {}, slow processor {}, poison {}, \
             ledger outage {}, broker outage {}, recharge queue deleted {} (re-declared after: {}), \
             recharge replica paused past its lease {}, recharge wrong token {}",
            self.kill9,
            self.amqp_close_all,
            self.broker_restart,
            self.pg_terminate,
            self.slow_processor,
            self.poison,
            self.ledger_outage,
            self.broker_outage,
            self.queue_delete,
            if redeclared.is_empty() {
                "-".to_owned()
            } else {
                redeclared.join(", ")
            },
            self.recharge_pause,
            self.token_mismatch,
        )
    }
}

/// How long the long faults last in this run.
#[derive(Clone, Copy, Debug)]
pub struct Durations {
    pub ledger_outage: Duration,
    pub broker_outage: Duration,
    pub token_mismatch: Duration,
    pub recharge_pause: Duration,
}

impl Durations {
    /// Nominal lengths (ledger 60 s, broker 90 s, wrong token 30 s), each capped at a
    /// quarter of the run (but at least 5 s), so a 45 s CI run still injects every one
    /// and has workload left to run against the recovered cluster. The pause is not
    /// scaled: shorter than the lease it would test nothing.
    pub fn for_run(duration_secs: u64) -> Durations {
        let cap =
            Duration::from_millis(duration_secs.saturating_mul(250)).max(Duration::from_secs(5));
        Durations {
            ledger_outage: Duration::from_secs(60).min(cap),
            broker_outage: Duration::from_secs(90).min(cap),
            token_mismatch: Duration::from_secs(30).min(cap),
            recharge_pause: RECHARGE_LEASE + Duration::from_secs(5),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    Kill9,
    AmqpCloseAll,
    BrokerRestart,
    PgTerminate,
    SlowProcessor,
    LedgerOutage,
    BrokerOutage,
    QueueDelete,
    RechargePause,
    TokenMismatch,
}

/// The kinds forced once at the start of the schedule, so even a short run has each.
const FORCED: [Fault; 5] = [
    Fault::LedgerOutage,
    Fault::BrokerOutage,
    Fault::QueueDelete,
    Fault::RechargePause,
    Fault::TokenMismatch,
];

enum Recovery {
    LedgerUp,
    BrokerUp,
    Resume { replica: usize, pid: u32 },
    RightToken(usize),
}

struct Pending {
    since: Instant,
    at: Instant,
    what: Recovery,
}

#[derive(Default)]
struct State {
    pending: Vec<Pending>,
    slow: [bool; 2],
    watchers: Vec<tokio::task::JoinHandle<Option<f32>>>,
}

impl State {
    /// Schedules `what` for `lasting` after the fault began `since`.
    fn recover_after(&mut self, since: Instant, lasting: Duration, what: Recovery) {
        self.pending.push(Pending {
            since,
            at: since + lasting,
            what,
        });
    }

    fn ledger_down(&self) -> bool {
        self.pending
            .iter()
            .any(|p| matches!(p.what, Recovery::LedgerUp))
    }

    fn broker_down(&self) -> bool {
        self.pending
            .iter()
            .any(|p| matches!(p.what, Recovery::BrokerUp))
    }

    fn replica_busy(&self, i: usize) -> bool {
        self.pending.iter().any(|p| match p.what {
            Recovery::Resume { replica, .. } => replica == i,
            Recovery::RightToken(r) => r == i,
            _ => false,
        })
    }

    fn free_replicas(&self, n: usize) -> Vec<usize> {
        (0..n).filter(|i| !self.replica_busy(*i)).collect()
    }
}

fn set_env(spec: &mut Spec, key: &str, value: &str) {
    spec.env.retain(|(k, _)| k != key);
    spec.env.push((key.into(), value.into()));
}

/// One of the ten kinds, weighted: mostly the cheap faults; the long ones rarely, since
/// each holds a resource down for up to a minute and a half.
fn roll(rng: &mut Rng) -> Fault {
    match rng.below(1000) {
        0..420 => Fault::Kill9,
        420..560 => Fault::AmqpCloseAll,
        560..650 => Fault::BrokerRestart,
        650..790 => Fault::PgTerminate,
        790..930 => Fault::SlowProcessor,
        930..950 => Fault::QueueDelete,
        950..965 => Fault::RechargePause,
        965..980 => Fault::TokenMismatch,
        980..990 => Fault::LedgerOutage,
        _ => Fault::BrokerOutage,
    }
}

/// Whether `f` can run now without cutting another fault short. A random long fault must
/// also end before the workload does; the forced ones run regardless (the harness waits
/// for their recovery).
fn possible(
    f: Fault,
    st: &State,
    c: &Cluster,
    d: &Durations,
    left: Duration,
    forced: bool,
) -> bool {
    let fits = |len: Duration| forced || len <= left;
    match f {
        Fault::Kill9 | Fault::PgTerminate | Fault::SlowProcessor => true,
        Fault::AmqpCloseAll | Fault::BrokerRestart | Fault::QueueDelete => !st.broker_down(),
        Fault::LedgerOutage => !st.ledger_down() && fits(d.ledger_outage),
        Fault::BrokerOutage => !st.broker_down() && fits(d.broker_outage),
        Fault::RechargePause => {
            !st.free_replicas(c.recharge.len()).is_empty() && fits(d.recharge_pause)
        }
        Fault::TokenMismatch => {
            !st.free_replicas(c.recharge.len()).is_empty() && fits(d.token_mismatch)
        }
    }
}

fn gap(a: &Args, rng: &mut Rng) -> Duration {
    Duration::from_millis(a.fault_every_ms / 2 + rng.below(a.fault_every_ms.max(2)))
}

/// Injects faults until `until`, then waits for the recoveries still pending (bounded by
/// the longest fault), so the cluster is whole when it returns.
pub async fn inject(
    c: &mut Cluster,
    a: &Args,
    mut rng: Rng,
    until: Instant,
    counts: &mut FaultCounts,
    t0: Instant,
    d: Durations,
) {
    let mut st = State::default();
    // A seeded order, so replays force the same sequence.
    let mut forced = FORCED.to_vec();
    for i in (1..forced.len()).rev() {
        forced.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let mut next_fault = Instant::now() + gap(a, &mut rng);
    loop {
        recover_due(c, &mut st, t0).await;
        let now = Instant::now();
        if now >= until && st.pending.is_empty() {
            break;
        }
        let next_recovery = st.pending.iter().map(|p| p.at).min();
        let wake = match (now < until).then(|| next_fault.min(until)) {
            Some(f) => next_recovery.map_or(f, |r| r.min(f)),
            None => next_recovery.unwrap_or(now),
        };
        tokio::time::sleep_until(tokio::time::Instant::from_std(wake)).await;
        // A recovery due now goes before the next fault: outages should last what they say.
        recover_due(c, &mut st, t0).await;
        let now = Instant::now();
        if now < next_fault || now >= until {
            continue;
        }
        let left = until - now;
        let pick = forced
            .iter()
            .position(|f| possible(*f, &st, c, &d, left, true));
        let fault = match pick {
            Some(i) => forced.remove(i),
            None => {
                // A few tries for one that fits; a terminate is always possible.
                let mut f = Fault::PgTerminate;
                for _ in 0..5 {
                    let r = roll(&mut rng);
                    if possible(r, &st, c, &d, left, false) {
                        f = r;
                        break;
                    }
                }
                f
            }
        };
        inject_one(c, a, &mut rng, fault, &mut st, counts, t0, &d).await;
        next_fault = Instant::now() + gap(a, &mut rng);
    }
    for w in st.watchers {
        counts.queue_redeclared_after.push(w.await.ok().flatten());
    }
}

#[allow(clippy::too_many_arguments)] // the loop's whole state, passed down once
async fn inject_one(
    c: &mut Cluster,
    a: &Args,
    rng: &mut Rng,
    fault: Fault,
    st: &mut State,
    counts: &mut FaultCounts,
    t0: Instant,
    d: &Durations,
) {
    let at = t0.elapsed().as_secs_f32();
    let now = Instant::now();
    match fault {
        Fault::Kill9 => {
            // Not a daemon another fault holds: its recovery expects the same process.
            let n = c.all().len();
            let nr = c.recharge.len();
            let eligible: Vec<usize> = (0..n)
                .filter(|i| {
                    let busy_recharge = *i >= n - nr && st.replica_busy(*i - (n - nr));
                    let ledger_held = *i == 0 && st.ledger_down();
                    !ledger_held && !busy_recharge
                })
                .collect();
            let Some(&i) = eligible.get(rng.below(eligible.len() as u64) as usize) else {
                return;
            };
            let pause = 300 + rng.below(1200);
            let dm = &mut c.all()[i];
            println!(
                "[{at:6.1}s] fault: kill -9 {} (restart in {pause} ms)",
                dm.spec.name
            );
            dm.kill9().await;
            tokio::time::sleep(Duration::from_millis(pause)).await;
            if let Err(e) = dm.restart().await {
                println!("           restart of {} failed: {e}", dm.spec.name);
            }
            counts.kill9 += 1;
        }
        Fault::AmqpCloseAll => {
            println!("[{at:6.1}s] fault: rabbitmqctl close_all_connections");
            sh(
                "rabbitmqctl",
                &["-q", "close_all_connections", "chaos: connection kill"],
            )
            .await;
            counts.amqp_close_all += 1;
        }
        Fault::BrokerRestart => {
            println!("[{at:6.1}s] fault: rabbitmqctl stop_app / start_app");
            sh("rabbitmqctl", &["-q", "stop_app"]).await;
            tokio::time::sleep(Duration::from_millis(1000 + rng.below(2000))).await;
            sh("rabbitmqctl", &["-q", "start_app"]).await;
            counts.broker_restart += 1;
        }
        Fault::PgTerminate => {
            let db = c.dbs[rng.below(3) as usize].clone();
            println!("[{at:6.1}s] fault: pg_terminate_backend on {db}");
            check::terminate_backends(&a.pg_url, &db).await;
            counts.pg_terminate += 1;
        }
        Fault::SlowProcessor if c.stripe.is_some() => {
            if let Some(s) = &c.stripe {
                processor_fault(&s.proxy, rng, at);
            }
            counts.slow_processor += 1;
        }
        Fault::SlowProcessor => {
            let i = rng.below(2) as usize;
            st.slow[i] = !st.slow[i];
            let latency = if st.slow[i] { "400" } else { "0" };
            let dm = &mut c.payments[i];
            set_env(&mut dm.spec, "SANDBOX_LATENCY_MS", latency);
            println!(
                "[{at:6.1}s] fault: {} restarted with processor latency {latency} ms",
                dm.spec.name
            );
            let _ = dm.restart().await;
            counts.slow_processor += 1;
        }
        Fault::LedgerOutage => {
            println!(
                "[{at:6.1}s] fault: ledger unreachable for {:.0} s (kill -9, restarted after the outage)",
                d.ledger_outage.as_secs_f32()
            );
            c.ledger[0].kill9().await;
            st.recover_after(now, d.ledger_outage, Recovery::LedgerUp);
            counts.ledger_outage += 1;
        }
        Fault::BrokerOutage => {
            println!(
                "[{at:6.1}s] fault: RabbitMQ down for {:.0} s (rabbitmqctl stop_app)",
                d.broker_outage.as_secs_f32()
            );
            sh("rabbitmqctl", &["-q", "stop_app"]).await;
            st.recover_after(Instant::now(), d.broker_outage, Recovery::BrokerUp);
            counts.broker_outage += 1;
        }
        Fault::QueueDelete => {
            match delete_queue(&a.amqp_url, &c.queue).await {
                Ok(dropped) => {
                    println!(
                        "[{at:6.1}s] fault: recharge queue {} deleted ({dropped} messages dropped); the daemons must declare it again",
                        c.queue
                    );
                    counts.queue_delete += 1;
                    // Long enough for the consumers' reconnect backoff, and for a broker
                    // outage that may start right after.
                    let bound = Duration::from_secs(60) + d.broker_outage;
                    st.watchers.push(tokio::spawn(watch_redeclare(
                        a.amqp_url.clone(),
                        c.queue.clone(),
                        t0,
                        bound,
                    )));
                }
                Err(e) => println!("[{at:6.1}s] fault: deleting the recharge queue failed: {e}"),
            }
        }
        Fault::RechargePause => {
            let free = st.free_replicas(c.recharge.len());
            let Some(&i) = free.get(rng.below(free.len() as u64) as usize) else {
                return;
            };
            let dm = &c.recharge[i];
            let Some(pid) = dm.child.as_ref().and_then(|ch| ch.id()) else {
                println!(
                    "[{at:6.1}s] fault: {} not running, not paused",
                    dm.spec.name
                );
                return;
            };
            println!(
                "[{at:6.1}s] fault: kill -STOP {} for {:.0} s (lease {} s)",
                dm.spec.name,
                d.recharge_pause.as_secs_f32(),
                RECHARGE_LEASE.as_secs()
            );
            sh("kill", &["-STOP", &pid.to_string()]).await;
            st.recover_after(now, d.recharge_pause, Recovery::Resume { replica: i, pid });
            counts.recharge_pause += 1;
        }
        Fault::TokenMismatch => {
            let free = st.free_replicas(c.recharge.len());
            let Some(&i) = free.get(rng.below(free.len() as u64) as usize) else {
                return;
            };
            let wrong = format!("wrong-{}", c.token);
            let dm = &mut c.recharge[i];
            set_env(&mut dm.spec, "CREDITS_AUTH_TOKEN", &wrong);
            println!(
                "[{at:6.1}s] fault: {} restarted with a wrong CREDITS_AUTH_TOKEN for {:.0} s",
                dm.spec.name,
                d.token_mismatch.as_secs_f32()
            );
            if let Err(e) = dm.restart().await {
                println!("           restart of {} failed: {e}", dm.spec.name);
            }
            st.recover_after(now, d.token_mismatch, Recovery::RightToken(i));
            counts.token_mismatch += 1;
        }
    }
}

/// Ends the long faults whose time is up.
async fn recover_due(c: &mut Cluster, st: &mut State, t0: Instant) {
    let now = Instant::now();
    let (due, rest): (Vec<Pending>, Vec<Pending>) = std::mem::take(&mut st.pending)
        .into_iter()
        .partition(|p| p.at <= now);
    st.pending = rest;
    for p in due {
        let at = t0.elapsed().as_secs_f32();
        let lasted = p.since.elapsed().as_secs_f32();
        match p.what {
            Recovery::LedgerUp => {
                println!("[{at:6.1}s] recover: ledger restarted after {lasted:.1} s down");
                if let Err(e) = c.ledger[0].restart().await {
                    println!("           restart of the ledger failed: {e}");
                }
            }
            Recovery::BrokerUp => {
                println!("[{at:6.1}s] recover: rabbitmqctl start_app after {lasted:.1} s down");
                sh("rabbitmqctl", &["-q", "start_app"]).await;
            }
            Recovery::Resume { replica, pid } => {
                println!(
                    "[{at:6.1}s] recover: kill -CONT {} after {lasted:.1} s paused",
                    c.recharge[replica].spec.name
                );
                sh("kill", &["-CONT", &pid.to_string()]).await;
            }
            Recovery::RightToken(i) => {
                let token = c.token.clone();
                let dm = &mut c.recharge[i];
                set_env(&mut dm.spec, "CREDITS_AUTH_TOKEN", &token);
                println!(
                    "[{at:6.1}s] recover: {} restarted with the right token after {lasted:.1} s",
                    dm.spec.name
                );
                if let Err(e) = dm.restart().await {
                    println!("           restart of {} failed: {e}", dm.spec.name);
                }
            }
        }
    }
}

/// Deletes the queue (with whatever it holds, consumers or not); returns how many messages
/// went with it.
async fn delete_queue(amqp_url: &str, queue: &str) -> anyhow::Result<u32> {
    let conn = credits_common::amqp::connect(amqp_url, "credits-chaos").await?;
    let ch = conn.create_channel().await?;
    let dropped = ch
        .queue_delete(queue.into(), QueueDeleteOptions::default())
        .await?;
    let _ = conn.close(0, "done".into()).await;
    Ok(dropped)
}

/// Polls (passive declare: it never creates the queue) until some daemon has declared the
/// queue again; the delay, or `None` past `bound`.
async fn watch_redeclare(
    amqp_url: String,
    queue: String,
    t0: Instant,
    bound: Duration,
) -> Option<f32> {
    let start = Instant::now();
    while start.elapsed() < bound {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if exists(&amqp_url, &queue).await {
            let after = start.elapsed().as_secs_f32();
            println!(
                "[{:6.1}s] observe: recharge queue declared again {after:.1} s after its deletion",
                t0.elapsed().as_secs_f32()
            );
            return Some(after);
        }
    }
    println!(
        "[{:6.1}s] observe: recharge queue NOT declared again within {:.0} s of its deletion",
        t0.elapsed().as_secs_f32(),
        bound.as_secs_f32()
    );
    None
}

/// Whether the queue exists; false too when the broker cannot be reached.
pub async fn exists(amqp_url: &str, queue: &str) -> bool {
    let Ok(conn) = credits_common::amqp::connect(amqp_url, "credits-chaos").await else {
        return false;
    };
    let found = match conn.create_channel().await {
        Ok(ch) => ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .is_ok(),
        Err(_) => false,
    };
    let _ = conn.close(0, "done".into()).await;
    found
}

/// Stripe runs: one of the processor's own faults, through the harness's proxy.
fn processor_fault(proxy: &crate::stripe::Proxy, rng: &mut Rng, at: f32) {
    match rng.below(3) {
        0 => {
            let slow = proxy.toggle_slow();
            println!(
                "[{at:6.1}s] fault: processor latency {}",
                if slow { "400 ms" } else { "off" }
            );
        }
        1 => {
            let d = Duration::from_millis(2000 + rng.below(4000));
            println!(
                "[{at:6.1}s] fault: processor loses a third of its answers for {:.1} s (the work done)",
                d.as_secs_f32()
            );
            proxy.lose_answers_for(d);
        }
        _ => {
            let d = Duration::from_millis(1000 + rng.below(4000));
            println!(
                "[{at:6.1}s] fault: processor down (503) for {:.1} s",
                d.as_secs_f32()
            );
            proxy.down_for(d);
        }
    }
}
