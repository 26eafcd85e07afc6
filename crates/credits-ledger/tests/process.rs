//! The `credits-ledger` binary as a process: start-up against an unreachable PostgreSQL, and
//! a clean exit on SIGTERM.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

fn ledger() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_credits-ledger"));
    cmd.env_remove("DATABASE_URL")
        .env("METRICS_ADDR", "off")
        .env("LEDGER_LISTEN_ADDR", "127.0.0.1:0")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

async fn sigterm(pid: u32) {
    let ok = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .await
        .unwrap();
    assert!(ok.success());
}

/// Reads stderr lines until one contains `needle` or `wait` passes.
async fn wait_for_line(
    lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStderr>>,
    needle: &str,
    wait: Duration,
) -> Vec<String> {
    let mut seen = Vec::new();
    let _ = tokio::time::timeout(wait, async {
        while let Ok(Some(line)) = lines.next_line().await {
            let hit = line.contains(needle);
            seen.push(line);
            if hit {
                break;
            }
        }
    })
    .await;
    seen
}

#[tokio::test]
async fn unreachable_postgres_is_named_in_one_line_and_retried() {
    let url = "postgres://credits:hunter2@127.0.0.1:1/credits_ledger";
    let mut child = ledger().env("DATABASE_URL", url).spawn().unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let seen = wait_for_line(&mut lines, "retrying", Duration::from_secs(10)).await;
    let line = seen
        .iter()
        .find(|l| l.contains("cannot reach PostgreSQL"))
        .expect("a line about PostgreSQL");
    assert!(
        line.contains("postgres://credits:***@127.0.0.1:1/credits_ledger"),
        "{line}"
    );
    assert!(
        !seen.iter().any(|l| l.contains("hunter2")),
        "password never logged"
    );
    // Still alive (retrying), not crashed.
    assert!(child.try_wait().unwrap().is_none());
    let seen = wait_for_line(
        &mut lines,
        "cannot reach PostgreSQL",
        Duration::from_secs(10),
    )
    .await;
    assert!(
        seen.iter().any(|l| l.contains("cannot reach PostgreSQL")),
        "it retries"
    );
    sigterm(child.id().unwrap()).await;
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(
        !status.success(),
        "gave up start-up on SIGTERM, reporting it"
    );
}

#[tokio::test]
async fn sigterm_stops_a_running_ledger_cleanly() {
    let base = std::env::var("TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_owned());
    let db = format!(
        "credits_t_ledger_proc_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let mut child = ledger()
        .env("DATABASE_URL", format!("{base}/{db}"))
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let seen = wait_for_line(&mut lines, "ledger listening", Duration::from_secs(30)).await;
    assert!(
        seen.iter().any(|l| l.contains("ledger listening")),
        "{seen:#?}"
    );
    sigterm(child.id().unwrap()).await;
    let seen = wait_for_line(&mut lines, "ledger stopped", Duration::from_secs(15)).await;
    assert!(
        seen.iter().any(|l| l.contains("ledger stopped")),
        "{seen:#?}"
    );
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn zero_or_absurd_settings_are_a_clear_start_up_error_not_a_panic() {
    for (name, value) in [
        ("GROUP_COMMIT_WORKERS", "0"),
        ("GROUP_COMMIT_MAX", "1000000"),
        ("GROUP_COMMIT_PARALLEL", "0"),
        ("DB_MAX_CONNECTIONS", "0"),
        ("OUTBOX_PARK_AFTER_SECS", "-5"),
    ] {
        let out = ledger()
            .env(name, value)
            .stderr(Stdio::piped())
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name}={value} must not start");
        assert_eq!(
            out.status.code(),
            Some(2),
            "{name}={value}: a usage error\n{stderr}"
        );
        assert!(
            stderr.contains(name),
            "{name}={value}: names the setting\n{stderr}"
        );
        assert!(
            !stderr.contains("panicked"),
            "{name}={value}: no panic\n{stderr}"
        );
    }
}
