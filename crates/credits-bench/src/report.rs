//! Output: a table on stdout, JSON, and the Markdown report with the ratios to the targets.

use serde_json::{Value, json};

use crate::Args;
use crate::load::Stats;

fn find<'a>(r: &'a [Stats], name: &str) -> Option<&'a Stats> {
    r.iter().find(|s| s.name == name)
}

/// Throughput ratios of two scenarios, reported in this order: (numerator, denominator,
/// label, the least the ratio must be; `None` for information).
const RATIOS: [(&str, &str, &str, Option<f64>); 9] = [
    (
        "usage-spread",
        "pgbench-spread",
        "usage-spread / pgbench",
        Some(1.5),
    ),
    (
        "usage-spread",
        "ceiling-ledger-batch",
        "usage-spread (unary, 64 callers) / ceiling (the ledger's batch SQL in pgbench)",
        Some(0.5),
    ),
    (
        "usage-spread-512",
        "ceiling-ledger-batch",
        "usage-spread-512 (unary, 512 callers) / ceiling",
        None,
    ),
    (
        "recorder-512",
        "ceiling-ledger-batch",
        "recorder-512 (UsageRecorder, 512 callers) / ceiling",
        Some(0.7),
    ),
    (
        "recorder-64",
        "ceiling-ledger-batch",
        "recorder-64 (UsageRecorder, 64 callers) / ceiling",
        None,
    ),
    (
        "usage-spread",
        "ceiling-set-based",
        "usage-spread / set-based ceiling",
        Some(0.6),
    ),
    (
        "stream-usage",
        "ceiling-ledger-batch",
        "stream-usage (one stream) / ceiling (the ledger's batch SQL)",
        Some(0.8),
    ),
    (
        "usage-hot",
        "pgbench-hot",
        "usage-hot / pgbench-hot (information)",
        None,
    ),
    (
        "usage-hot",
        "usage-spread",
        "usage-hot / usage-spread",
        Some(0.5),
    ),
];

/// The row of the throughput ratio `num / den`, when both ran.
fn ratio(
    r: &[Stats],
    (num, den, label, min): (&str, &str, &str, Option<f64>),
) -> Option<(String, String, String, bool)> {
    let x = find(r, num)?.throughput / find(r, den)?.throughput;
    Some((
        label.into(),
        format!("{x:.2}×"),
        min.map_or_else(|| "—".into(), |m| format!("≥ {m}×")),
        min.is_none_or(|m| x >= m),
    ))
}

/// (label, value, target, met)
pub fn ratios(r: &[Stats]) -> Vec<(String, String, String, bool)> {
    let mut out: Vec<_> = RATIOS.into_iter().filter_map(|q| ratio(r, q)).collect();
    let check_access = (
        "check-access",
        "usage-spread",
        "check-access / usage-spread",
        Some(3.0),
    );
    if let (Some(row), Some(c)) = (ratio(r, check_access), find(r, "check-access")) {
        out.push(row);
        out.push((
            "check-access p99".into(),
            format!("{:.2} ms", c.p99_ms),
            "≤ 5 ms".into(),
            c.p99_ms <= 5.0,
        ));
    }
    let health = (
        "check-access",
        "health-check",
        "check-access / health-check (a no-op RPC)",
        Some(0.8),
    );
    out.extend(ratio(r, health));
    if let Some(w) = find(r, "watch-staleness") {
        out.push((
            "AccessCache staleness under usage-spread, p50 / p99".into(),
            format!("{:.1} / {:.1} ms", w.p50_ms, w.p99_ms),
            "p99 ≤ 100 ms".into(),
            w.p99_ms <= 100.0,
        ));
    }
    out.extend(recharge_rows(r));
    let max_rss = r.iter().flat_map(|s| s.rss_mib.iter()).fold(
        std::collections::BTreeMap::<String, f64>::new(),
        |mut m, (n, v)| {
            let e = m.entry(n.clone()).or_insert(0.0);
            *e = e.max(*v);
            m
        },
    );
    for (name, mib) in max_rss {
        out.push((
            format!("{name} resident memory (max)"),
            format!("{mib:.1} MiB"),
            "≤ 64 MB".into(),
            mib * 1.048_576 <= 64.0,
        ));
    }
    out
}

/// The p99 above which an open-loop rate does not count as sustained, ms.
const SUSTAINED_P99_MS: f64 = 1000.0;

/// The open-loop recharge scenarios that ran, with their offered rate, lowest first.
fn open_recharge(r: &[Stats]) -> Vec<(u32, &Stats)> {
    let mut v: Vec<(u32, &Stats)> = r
        .iter()
        .filter_map(|s| {
            let rate = s.name.strip_prefix("recharge-open-")?.parse().ok()?;
            Some((rate, s))
        })
        .collect();
    v.sort_by_key(|(rate, _)| *rate);
    v
}

/// The p99 of a recharge scenario, with its errors (failed crossings, missing top-ups).
fn recharge_p99(s: &Stats) -> String {
    if s.errors == 0 {
        format!("{:.1} ms", s.p99_ms)
    } else {
        format!("{:.1} ms ({} errors)", s.p99_ms, s.errors)
    }
}

/// The recharge rows: the open-loop latencies against their targets, the highest rate
/// sustained, and the burst for information.
fn recharge_rows(r: &[Stats]) -> Vec<(String, String, String, bool)> {
    let mut out = Vec::new();
    let open = open_recharge(r);
    for (rate, s) in &open {
        if *rate == 50 {
            out.push((
                "recharge-open-50 p99 (crossing → top-up credit, 50 crossings/s)".into(),
                recharge_p99(s),
                "≤ 100 ms".into(),
                s.errors == 0 && s.ops > 0 && s.p99_ms <= 100.0,
            ));
        } else {
            out.push((
                format!("recharge p99 at {rate}/s (information)"),
                recharge_p99(s),
                "—".into(),
                true,
            ));
        }
    }
    if !open.is_empty() {
        // Sustained: every crossing went through and was topped up, p99 within 1 s.
        let best = open
            .iter()
            .filter(|(_, s)| s.errors == 0 && s.ops > 0 && s.p99_ms <= SUSTAINED_P99_MS)
            .map(|(rate, _)| *rate)
            .max();
        let rates: Vec<String> = open.iter().map(|(rate, _)| rate.to_string()).collect();
        out.push((
            format!(
                "highest offered rate with recharge p99 ≤ 1 s (of {}/s)",
                rates.join(", ")
            ),
            match best {
                None => "none".into(),
                // Every rate run held: the limit is above the highest.
                Some(b) if Some(b) == open.last().map(|(rate, _)| *rate) => {
                    format!("≥ {b}/s (the highest run)")
                }
                Some(b) => format!("{b}/s"),
            },
            "— (report)".into(),
            true,
        ));
    }
    if let Some(rc) = find(r, "recharge-latency") {
        out.push((
            "recharge-latency p99 (burst: all cross at once; information)".into(),
            recharge_p99(rc),
            "—".into(),
            true,
        ));
        out.push((
            "recharge charges = crossings (burst)".into(),
            rc.note.clone(),
            "equal".into(),
            rc.note.contains("(equal)"),
        ));
    }
    out
}

pub fn print_table(r: &[Stats]) {
    println!(
        "{:<18} {:>12} {:>9} {:>9} {:>9} {:>9} {:>7}  note",
        "scenario", "throughput/s", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "errors"
    );
    for s in r {
        println!(
            "{:<18} {:>12.0} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>7}  {}",
            s.name, s.throughput, s.p50_ms, s.p90_ms, s.p99_ms, s.p999_ms, s.errors, s.note
        );
    }
    for (label, value, target, met) in ratios(r) {
        println!(
            "{label:<40} {value:>24}  target {target:<10} {}",
            if met { "met" } else { "NOT met" }
        );
    }
}

pub fn to_json(a: &Args, r: &[Stats]) -> Value {
    json!({
        "label": a.label,
        "concurrency": a.concurrency,
        "duration_s": a.duration,
        "accounts": a.accounts,
        "results": r,
        "ratios": ratios(r).into_iter().map(|(l, v, t, m)| json!({"what": l, "value": v, "target": t, "met": m})).collect::<Vec<_>>(),
    })
}

fn sh(cmd: &str) -> String {
    std::process::Command::new("sh")
        .args(["-c", cmd])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

pub async fn markdown(a: &Args, r: &[Stats]) -> anyhow::Result<String> {
    let mut md = String::new();
    md.push_str("# Benchmarks\n\n");
    md.push_str("Generated by `scripts/bench` (`credits-bench`); numbers from one run on the machine below.\n");
    md.push_str("Benchmarks are not tests: CI asserts none of these numbers.\n\n");
    md.push_str("## Machine\n\n");
    md.push_str(&format!("- cores: {}\n", sh("nproc")));
    md.push_str(&format!(
        "- memory: {}\n",
        sh("free -h | awk '/Mem:/ {print $2}'")
    ));
    md.push_str(&format!(
        "- CPU: {}\n",
        sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2")
    ));
    md.push_str(&format!("- PostgreSQL: {}\n", sh("psql --version")));
    md.push_str(&format!(
        "- RabbitMQ: {}\n",
        sh("rabbitmqctl version 2>/dev/null | tail -1")
    ));
    md.push_str(&format!("- rustc: {}\n", sh("rustc --version")));
    md.push_str(&format!("- run: concurrency {}, {} s per scenario, {} accounts (usage-spread), {} accounts (recharge-latency, all at once), batches of {}\n", a.concurrency, a.duration, a.accounts, a.recharge_accounts, a.batch));
    md.push_str(&format!(
        "- load: `credits-bench` on {} tokio runtime thread(s) (`TOKIO_WORKER_THREADS`; `scripts/bench` gives it one, `BENCH_THREADS` more), the daemons on one per core\n",
        std::env::var("TOKIO_WORKER_THREADS").unwrap_or_else(|_| "one per core".into())
    ));
    let rates: Vec<String> = open_recharge(r)
        .iter()
        .map(|(rate, _)| rate.to_string())
        .collect();
    if !rates.is_empty() {
        md.push_str(&format!("- recharge-open-<rate>: open loop, one threshold crossing every 1/rate s for {} s at {} crossings/s, each on its own account; latency from the crossing debit's journal entry to the top-up credit's\n", a.duration, rates.join(", ")));
    }
    md.push_str("- events: a queue bound to every routing key (keeping only the newest) stands for a deployment's other consumers, so the outbox relays are not retrying events nobody binds\n");
    md.push('\n');
    md.push_str("## Reproduce\n\n```sh\nscripts/bench            # builds release binaries, starts the three daemons, runs everything\n```\n\n");
    md.push_str("## Results\n\n| scenario | throughput/s | p50 ms | p90 ms | p99 ms | p99.9 ms | errors | note |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |\n");
    for s in r {
        // pgbench reports an average latency only; its percentiles are not measured.
        let pct = |v: f64| {
            if s.name.starts_with("pgbench") || s.name.starts_with("ceiling") {
                "—".to_owned()
            } else {
                format!("{v:.2}")
            }
        };
        md.push_str(&format!(
            "| {} | {:.0} | {:.2} | {} | {} | {} | {} | {} |\n",
            s.name,
            s.throughput,
            s.p50_ms,
            pct(s.p90_ms),
            pct(s.p99_ms),
            pct(s.p999_ms),
            s.errors,
            s.note
        ));
    }
    md.push_str(
        "\n## Against the targets\n\n| what | value | target | met |\n| --- | --- | --- | --- |\n",
    );
    for (l, v, t, m) in ratios(r) {
        md.push_str(&format!(
            "| {l} | {v} | {t} | {} |\n",
            if m { "yes" } else { "**no**" }
        ));
    }
    // The hand-written record of what changed and why survives regenerating the report.
    if let Ok(changes) = std::fs::read_to_string("docs/benchmark-changes.md") {
        md.push('\n');
        md.push_str(&changes);
    }
    md.push_str("\n## Memory\n\n| scenario | resident memory after it |\n| --- | --- |\n");
    for s in r.iter().filter(|s| !s.rss_mib.is_empty()) {
        let m: Vec<String> = s
            .rss_mib
            .iter()
            .map(|(n, v)| format!("{n} {v:.1} MiB"))
            .collect();
        md.push_str(&format!("| {} | {} |\n", s.name, m.join(", ")));
    }
    Ok(md)
}
