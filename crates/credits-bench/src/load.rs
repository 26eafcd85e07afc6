//! Closed-loop load: `concurrency` callers, each issuing its next request when the
//! previous one answers, for a fixed duration; latencies into an HDR histogram.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Stats {
    pub name: String,
    pub ops: u64,
    pub errors: u64,
    pub seconds: f64,
    /// Operations per second (for batches: items per second).
    pub throughput: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub note: String,
    /// Resident memory per daemon after the scenario, MiB.
    pub rss_mib: Vec<(String, f64)>,
}

pub fn stats_from(
    name: &str,
    h: &Histogram<u64>,
    ops: u64,
    errors: u64,
    elapsed: Duration,
    per_op_items: u64,
) -> Stats {
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    Stats {
        name: name.to_owned(),
        ops,
        errors,
        seconds: elapsed.as_secs_f64(),
        throughput: (ops * per_op_items) as f64 / elapsed.as_secs_f64(),
        p50_ms: ms(0.50),
        p90_ms: ms(0.90),
        p99_ms: ms(0.99),
        p999_ms: ms(0.999),
        ..Default::default()
    }
}

pub fn histogram() -> Histogram<u64> {
    // 1 µs .. 60 s, 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000, 3)
        .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable!()))
}

/// Runs `op(worker, iteration)` from `concurrency` workers for `duration`.
pub async fn run<F, Fut>(
    name: &str,
    concurrency: usize,
    duration: Duration,
    per_op_items: u64,
    op: F,
) -> Stats
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send,
{
    let op = Arc::new(op);
    let errors = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let op = op.clone();
        let errors = errors.clone();
        let first_error = first_error.clone();
        tasks.push(tokio::spawn(async move {
            let mut h = histogram();
            let mut i = 0u64;
            while Instant::now() < deadline {
                let t = Instant::now();
                match op(w, i).await {
                    Ok(()) => {
                        let _ = h.record(t.elapsed().as_micros().max(1) as u64);
                    }
                    Err(e) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        if let Ok(mut f) = first_error.lock() {
                            f.get_or_insert(e);
                        }
                    }
                }
                i += 1;
            }
            h
        }));
    }
    let mut total = histogram();
    for t in tasks {
        if let Ok(h) = t.await {
            let _ = total.add(&h);
        }
    }
    let elapsed = start.elapsed();
    let mut s = stats_from(
        name,
        &total,
        total.len(),
        errors.load(Ordering::Relaxed),
        elapsed,
        per_op_items,
    );
    if let Ok(f) = first_error.lock()
        && let Some(e) = f.as_ref()
    {
        s.note = format!("first error: {e}");
    }
    s
}

/// Resident memory of a process, MiB (from /proc).
pub fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}
