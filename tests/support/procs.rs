//! The real binaries as processes, for the end-to-end suite: built once per test run,
//! started on free ports with their own databases, exchange and queue, logs to files.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

use tokio::process::{Child, Command};

use tonic_health::pb::health_check_response::ServingStatus;

use crate::{AMQP_URL, health_status, pg_base, unique};

/// Path of a workspace binary, building the binaries once if needed. CI builds them before
/// the tests and sets `CREDITS_BINS_BUILT`, so no test runs a nested cargo build there.
pub fn bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        // target/<profile>/deps/<test-binary> → target/<profile>
        let exe = std::env::current_exe().expect("current exe");
        let dir = exe
            .parent()
            .and_then(|p| p.parent())
            .expect("target dir")
            .to_path_buf();
        if std::env::var_os("CREDITS_BINS_BUILT").is_some() {
            return dir;
        }
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut cmd = std::process::Command::new(cargo);
        cmd.current_dir(&workspace)
            .args(["build", "--quiet", "--bins"]);
        if dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build --bins");
        assert!(status.success(), "cargo build --bins failed");
        dir
    });
    dir.join(name)
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A daemon process; SIGTERM on `stop`, killed if dropped.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, binary: &str, args: &[&str], env: &[(&str, String)]) -> Proc {
        let log = std::env::temp_dir().join(format!("{}.log", unique(name)));
        let file = std::fs::File::create(&log).expect("log file");
        let mut cmd = Command::new(bin(binary));
        cmd.args(args)
            .env("RUST_LOG", "info")
            .env("LOG_FORMAT", "text")
            .env_remove("DATABASE_URL")
            .stdout(Stdio::from(file.try_clone().expect("log")))
            .stderr(Stdio::from(file))
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {binary}: {e}"));
        Proc {
            name: name.to_owned(),
            child,
            log,
        }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then the exit status (killed after 15 s).
    pub async fn stop(mut self) -> std::process::ExitStatus {
        if let Some(pid) = self.child.id() {
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await;
        }
        match tokio::time::timeout(Duration::from_secs(15), self.child.wait()).await {
            Ok(Ok(s)) => s,
            _ => {
                let _ = self.child.kill().await;
                panic!(
                    "{} did not stop on SIGTERM; log:\n{}",
                    self.name,
                    self.logs()
                );
            }
        }
    }
}

/// Waits until a gRPC server's health service answers SERVING.
pub async fn wait_healthy(url: &str, service: &str, proc: &Proc) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while health_status(url, service).await != Some(ServingStatus::Serving) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} never became healthy; log:\n{}",
            proc.name,
            proc.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The three daemons as separate processes.
pub struct Daemons {
    pub ledger: Proc,
    pub payments: Proc,
    pub recharge: Proc,
    pub ledger_url: String,
    pub payments_url: String,
    pub recharge_url: String,
    pub metrics_url: String,
    pub exchange: String,
    pub queue: String,
    pub token: String,
}

impl Daemons {
    pub async fn start() -> Daemons {
        let exchange = unique("credits.events.e2e");
        let queue = unique("credits.recharge.e2e");
        // R28: at least 32 characters.
        let token = unique("tok-0123456789abcdef0123");
        let (lp, pp, rp, mp) = (free_port(), free_port(), free_port(), free_port());
        let common = |db: &str| {
            vec![
                (
                    "DATABASE_URL",
                    format!("{}/{}", pg_base(), unique(&format!("credits_t_e2e_{db}"))),
                ),
                ("AMQP_URL", AMQP_URL.to_owned()),
                ("CREDITS_EXCHANGE", exchange.clone()),
                ("CREDITS_AUTH_TOKEN", token.clone()),
                ("METRICS_ADDR", "off".to_owned()),
            ]
        };
        let mut env = common("ledger");
        env.push(("LEDGER_LISTEN_ADDR", format!("127.0.0.1:{lp}")));
        env.push(("METRICS_ADDR", format!("127.0.0.1:{mp}")));
        let ledger = Proc::spawn("ledger", "credits-ledger", &[], &env);
        let mut env = common("payments");
        env.push(("PAYMENTS_LISTEN_ADDR", format!("127.0.0.1:{pp}")));
        env.push(("LEDGER_URL", format!("http://127.0.0.1:{lp}")));
        env.push(("SANDBOX_ACH_SETTLE_MS", "1000".to_owned()));
        env.push(("PAYMENTS_PROCESSOR", "sandbox".to_owned()));
        let payments = Proc::spawn("payments", "credits-payments", &[], &env);
        let mut env = common("recharge");
        env.push(("RECHARGE_LISTEN_ADDR", format!("127.0.0.1:{rp}")));
        env.push(("LEDGER_URL", format!("http://127.0.0.1:{lp}")));
        env.push(("PAYMENTS_URL", format!("http://127.0.0.1:{pp}")));
        env.push(("RECHARGE_QUEUE", queue.clone()));
        env.push(("RECHARGE_RETRY_AFTER_FAILURE_SECS", "1".to_owned()));
        let recharge = Proc::spawn("recharge", "credits-recharge", &[], &env);
        let d = Daemons {
            ledger,
            payments,
            recharge,
            ledger_url: format!("http://127.0.0.1:{lp}"),
            payments_url: format!("http://127.0.0.1:{pp}"),
            recharge_url: format!("http://127.0.0.1:{rp}"),
            metrics_url: format!("127.0.0.1:{mp}"),
            exchange,
            queue,
            token,
        };
        wait_healthy(&d.ledger_url, "credits.ledger.v1.LedgerService", &d.ledger).await;
        wait_healthy(
            &d.payments_url,
            "credits.payments.v1.PaymentsService",
            &d.payments,
        )
        .await;
        wait_healthy(
            &d.recharge_url,
            "credits.recharge.v1.AutoRechargeService",
            &d.recharge,
        )
        .await;
        d
    }

    /// The typed client, with the daemons' token.
    pub fn api(&self) -> crate::api::Api {
        crate::api::Api::connect(
            &self.ledger_url,
            &self.payments_url,
            &self.recharge_url,
            Some(&self.token),
        )
    }

    /// SIGTERM to each; every one must exit 0. Returns the three logs.
    pub async fn stop(self) -> [String; 3] {
        let logs = [
            self.ledger.logs(),
            self.payments.logs(),
            self.recharge.logs(),
        ];
        for p in [self.recharge, self.payments, self.ledger] {
            let name = p.name.clone();
            let log = p.logs();
            let status = p.stop().await;
            assert!(
                status.success(),
                "{name} exited with {status:?}; log:\n{log}"
            );
        }
        crate::delete_queues(&self.queue).await;
        crate::delete_queues(&format!("{}.unrouted", self.exchange)).await;
        logs
    }
}
