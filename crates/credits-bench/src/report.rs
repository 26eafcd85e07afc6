//! Output: a table on stdout, JSON, and the Markdown report with the ratios to the targets.

use serde_json::{Value, json};

use crate::Args;
use crate::load::Stats;

fn find<'a>(r: &'a [Stats], name: &str) -> Option<&'a Stats> {
    r.iter().find(|s| s.name == name)
}

/// (label, value, target, met)
pub fn ratios(r: &[Stats]) -> Vec<(String, String, String, bool)> {
    let mut out = Vec::new();
    let tp = |n: &str| find(r, n).map(|s| s.throughput);
    if let (Some(c), Some(p)) = (tp("usage-spread"), tp("pgbench-spread")) {
        let x = c / p;
        out.push((
            "usage-spread / pgbench".into(),
            format!("{x:.2}×"),
            "≥ 1.5×".into(),
            x >= 1.5,
        ));
    }
    if let (Some(c), Some(p)) = (tp("usage-spread"), tp("ceiling-ledger-batch")) {
        out.push((
            "usage-spread / ceiling (the ledger's batch SQL in pgbench)".into(),
            format!("{:.2}×", c / p),
            "—".into(),
            true,
        ));
    }
    if let (Some(c), Some(p)) = (tp("usage-spread"), tp("ceiling-set-based")) {
        let x = c / p;
        out.push((
            "usage-spread / set-based ceiling".into(),
            format!("{x:.2}×"),
            "≥ 0.6×".into(),
            x >= 0.6,
        ));
    }
    if let (Some(c), Some(p)) = (tp("stream-usage"), tp("ceiling-ledger-batch")) {
        let x = c / p;
        out.push((
            "stream-usage (one stream) / ceiling (the ledger's batch SQL)".into(),
            format!("{x:.2}×"),
            "≥ 0.8×".into(),
            x >= 0.8,
        ));
    }
    if let (Some(c), Some(p)) = (tp("usage-hot"), tp("pgbench-hot")) {
        out.push((
            "usage-hot / pgbench-hot (information)".into(),
            format!("{:.2}×", c / p),
            "—".into(),
            true,
        ));
    }
    if let (Some(h), Some(s)) = (tp("usage-hot"), tp("usage-spread")) {
        let x = h / s;
        out.push((
            "usage-hot / usage-spread".into(),
            format!("{x:.2}×"),
            "≥ 0.5×".into(),
            x >= 0.5,
        ));
    }
    if let (Some(c), Some(s)) = (find(r, "check-access"), tp("usage-spread")) {
        let x = c.throughput / s;
        out.push((
            "check-access / usage-spread".into(),
            format!("{x:.2}×"),
            "≥ 3×".into(),
            x >= 3.0,
        ));
        out.push((
            "check-access p99".into(),
            format!("{:.2} ms", c.p99_ms),
            "≤ 5 ms".into(),
            c.p99_ms <= 5.0,
        ));
    }
    if let (Some(c), Some(h)) = (find(r, "check-access"), find(r, "health-check")) {
        let x = c.throughput / h.throughput;
        out.push((
            "check-access / health-check (a no-op RPC)".into(),
            format!("{x:.2}×"),
            "≥ 0.8×".into(),
            x >= 0.8,
        ));
    }
    if let Some(rc) = find(r, "recharge-latency") {
        out.push((
            "recharge-latency p99".into(),
            format!("{:.1} ms", rc.p99_ms),
            "≤ 250 ms".into(),
            rc.p99_ms <= 250.0,
        ));
        out.push((
            "recharge charges = crossings".into(),
            rc.note.clone(),
            "equal".into(),
            rc.note.contains("(equal)"),
        ));
    }
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
    md.push_str(&format!("- run: concurrency {}, {} s per scenario, {} accounts (usage-spread), {} accounts (recharge-latency), batches of {}\n\n", a.concurrency, a.duration, a.accounts, a.recharge_accounts, a.batch));
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
