//! `--processor stripe`: the soak against `localstripe` (PyPI), a stateful Stripe emulator,
//! with three pieces of the harness between it and the payments replicas:
//!
//! - [`Proxy`] in front of the emulator's API, which supplies what the emulator lacks and
//!   real Stripe has — `Idempotency-Key` replay (same key, same answer; a key still in
//!   flight answers 409 `idempotency_key_in_use`; the same key with other parameters 400)
//!   and the `customer` filter on `GET /v1/payment_intents` — and injects the processor's
//!   faults: latency, outages (503), and *lost answers* (the work done, the answer dropped,
//!   so payments only learns the outcome by asking again under the same key);
//! - [`Relay`], the webhook endpoint the emulator posts to: every event is delivered late
//!   (0–3 s), a third of them twice, to either payments replica, so events arrive
//!   duplicated and out of order; a delivery that fails (a replica killed) is retried, as
//!   Stripe does;
//! - the **dashboard** ([`dashboard`]): refunds made at the processor and disputes. The
//!   emulator sends no `charge.*` events and has no disputes, so the harness posts those
//!   events itself through the relay, signed like Stripe's (what `stripe trigger` does),
//!   each dispute's `created` and `closed` events at once, in either order.

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::process::{Child, Command};

use crate::rng::Rng;

pub const SECRET_KEY: &str = "sk_test_credits_chaos";
pub const PUBLISHABLE_KEY: &str = "pk_test_credits_chaos";
pub const WEBHOOK_SECRET: &str = "whsec_credits_chaos";

async fn serve(router: Router) -> anyhow::Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    Ok(url)
}

/// The emulator, as a child process on a free loopback port.
pub struct Emulator {
    pub api: Api,
    _child: Child,
}

/// The emulator's API, called directly (as Stripe.js or the dashboard would).
#[derive(Clone)]
pub struct Api {
    pub base: String,
    http: reqwest::Client,
}

impl Emulator {
    pub async fn start(logdir: &std::path::Path) -> anyhow::Result<Emulator> {
        let port = crate::free_port();
        let log = std::fs::File::create(logdir.join("localstripe.log"))?;
        let child = Command::new("localstripe")
            .args(["--port", &port.to_string(), "--from-scratch"])
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                anyhow::anyhow!("localstripe: {e} (pip install localstripe==1.15.10; .ci/run does)")
            })?;
        let e = Emulator {
            api: Api {
                base: format!("http://127.0.0.1:{port}"),
                http: reqwest::Client::new(),
            },
            _child: child,
        };
        for _ in 0..100 {
            if e.api.get("/v1/customers").await.is_ok() {
                return Ok(e);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::bail!("localstripe did not come up on {}", e.api.base)
    }
}

impl Api {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        form: &[(&str, String)],
    ) -> anyhow::Result<Value> {
        let mut req = self
            .http
            .request(method.clone(), format!("{}{path}", self.base))
            .basic_auth(SECRET_KEY, Some(""));
        req = if method == reqwest::Method::GET {
            req.query(form)
        } else {
            req.form(form)
        };
        let r = req.send().await?;
        let status = r.status();
        let v: Value = r.json().await.unwrap_or(Value::Null);
        anyhow::ensure!(status.is_success(), "{method} {path}: {status} {v}");
        Ok(v)
    }

    pub async fn post(&self, path: &str, form: &[(&str, String)]) -> anyhow::Result<Value> {
        self.call(reqwest::Method::POST, path, form).await
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.call(reqwest::Method::GET, path, &[]).await
    }

    /// Every object of a list endpoint, page by page.
    pub async fn list_all(&self, path: &str) -> anyhow::Result<Vec<Value>> {
        let mut out: Vec<Value> = Vec::new();
        loop {
            let mut q = vec![("limit", "100".to_owned())];
            if let Some(last) = out.last().and_then(|v| v["id"].as_str()) {
                q.push(("starting_after", last.to_owned()));
            }
            let page = self.call(reqwest::Method::GET, path, &q).await?;
            let data = page["data"].as_array().cloned().unwrap_or_default();
            let more = page["has_more"].as_bool().unwrap_or(false) && !data.is_empty();
            out.extend(data);
            if !more {
                return Ok(out);
            }
        }
    }

    /// A card payment method, made as Stripe.js makes it from what a customer typed.
    pub async fn card(&self, number: &str) -> anyhow::Result<String> {
        let pm = self
            .post(
                "/v1/payment_methods",
                &[
                    ("type", "card".into()),
                    ("card[number]", number.into()),
                    ("card[exp_month]", "12".into()),
                    ("card[exp_year]", "2034".into()),
                    ("card[cvc]", "123".into()),
                ],
            )
            .await?;
        pm["id"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow::anyhow!("payment method without id: {pm}"))
    }

    /// The customer completes 3-D Secure for an intent (what Stripe.js does on the page).
    pub async fn authenticate(&self, pi: &str, client_secret: &str) -> anyhow::Result<()> {
        self.post(
            &format!("/v1/payment_intents/{pi}/_authenticate"),
            &[
                ("client_secret", client_secret.into()),
                ("success", "true".into()),
            ],
        )
        .await
        .map(|_| ())
    }
}

// ---- the API proxy -------------------------------------------------------------------------

enum KeyState {
    InFlight,
    /// (request body, status, answer).
    Done(Bytes, u16, Bytes),
}

#[derive(Default)]
pub struct ProxyStats {
    pub forwarded: AtomicU64,
    pub replayed: AtomicU64,
    pub in_use: AtomicU64,
    pub lost_answers: AtomicU64,
    pub refused_down: AtomicU64,
}

struct ProxyState {
    upstream: String,
    http: reqwest::Client,
    keys: Mutex<HashMap<String, KeyState>>,
    latency_ms: AtomicU64,
    /// Unix millis until which answers to POSTs are lost (a third of them).
    lossy_until: AtomicU64,
    /// Unix millis until which every request gets 503.
    down_until: AtomicU64,
    rng: Mutex<Rng>,
    stats: ProxyStats,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[derive(Clone)]
pub struct Proxy {
    pub url: String,
    state: Arc<ProxyState>,
}

impl Proxy {
    pub async fn start(upstream: &str, rng: Rng) -> anyhow::Result<Proxy> {
        let state = Arc::new(ProxyState {
            upstream: upstream.to_owned(),
            http: reqwest::Client::new(),
            keys: Mutex::new(HashMap::new()),
            latency_ms: AtomicU64::new(0),
            lossy_until: AtomicU64::new(0),
            down_until: AtomicU64::new(0),
            rng: Mutex::new(rng),
            stats: ProxyStats::default(),
        });
        let router = Router::new().fallback(forward).with_state(state.clone());
        Ok(Proxy {
            url: serve(router).await?,
            state,
        })
    }

    /// Toggles 400 ms of latency on every call; true when now slow.
    pub fn toggle_slow(&self) -> bool {
        let slow = self.state.latency_ms.load(Ordering::Relaxed) == 0;
        self.state
            .latency_ms
            .store(if slow { 400 } else { 0 }, Ordering::Relaxed);
        slow
    }

    /// For `d`, a third of the answers to POSTs are lost after the emulator did the work.
    pub fn lose_answers_for(&self, d: Duration) {
        self.state
            .lossy_until
            .store(now_ms() + d.as_millis() as u64, Ordering::Relaxed);
    }

    /// For `d`, every call is answered 503 without reaching the emulator.
    pub fn down_for(&self, d: Duration) {
        self.state
            .down_until
            .store(now_ms() + d.as_millis() as u64, Ordering::Relaxed);
    }

    /// Back to a healthy processor (the faults are over).
    pub fn heal(&self) {
        self.state.latency_ms.store(0, Ordering::Relaxed);
        self.state.lossy_until.store(0, Ordering::Relaxed);
        self.state.down_until.store(0, Ordering::Relaxed);
    }

    pub fn stats(&self) -> &ProxyStats {
        &self.state.stats
    }
}

fn answer(status: u16, body: Bytes) -> Response {
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
        [("content-type", "application/json")],
        body,
    )
        .into_response()
}

fn error(status: u16, kind: &str, code: &str) -> Response {
    let body = json!({"error": {"type": kind, "code": code, "message": code}});
    answer(status, Bytes::from(body.to_string()))
}

async fn forward(
    State(s): State<Arc<ProxyState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if now_ms() < s.down_until.load(Ordering::Relaxed) {
        s.stats.refused_down.fetch_add(1, Ordering::Relaxed);
        return error(503, "api_error", "chaos_processor_down");
    }
    let latency = s.latency_ms.load(Ordering::Relaxed);
    if latency > 0 {
        tokio::time::sleep(Duration::from_millis(latency)).await;
    }
    let key = (method == Method::POST)
        .then(|| headers.get("idempotency-key"))
        .flatten()
        .and_then(|v| v.to_str().ok())
        .map(|k| format!("{}:{k}", uri.path()));
    // In a lossy window a third of the answers to POSTs are lost — replays included, so
    // a caller may run out of tries and only learn the outcome later (recovery, events).
    let lose = method == Method::POST
        && now_ms() < s.lossy_until.load(Ordering::Relaxed)
        && s.rng.lock().map(|mut r| r.below(3) == 0).unwrap_or(false);
    if let Some(k) = &key {
        let mut keys = s.keys.lock().unwrap_or_else(|e| e.into_inner());
        match keys.get(k) {
            Some(KeyState::InFlight) => {
                s.stats.in_use.fetch_add(1, Ordering::Relaxed);
                return error(409, "idempotency_error", "idempotency_key_in_use");
            }
            Some(KeyState::Done(sent, status, answer_)) => {
                if *sent != body {
                    return error(400, "idempotency_error", "idempotency_key_reused");
                }
                if lose {
                    s.stats.lost_answers.fetch_add(1, Ordering::Relaxed);
                    return error(502, "api_error", "chaos_answer_lost");
                }
                s.stats.replayed.fetch_add(1, Ordering::Relaxed);
                return answer(*status, answer_.clone());
            }
            None => {
                keys.insert(k.clone(), KeyState::InFlight);
            }
        }
    }
    // The work and its record run to the end even if our caller goes away (killed, timed
    // out): Stripe finishes a request whatever the client does.
    let task = {
        let (s, method, uri, headers, body, key) = (
            s.clone(),
            method.clone(),
            uri.clone(),
            headers.clone(),
            body.clone(),
            key.clone(),
        );
        tokio::spawn(
            async move { forward_and_record(&s, &method, &uri, &headers, body, key).await },
        )
    };
    let Ok(result) = task.await else {
        return error(502, "api_error", "chaos_proxy_task_failed");
    };
    let (status, answer_) = match result {
        Ok(r) => r,
        Err(e) => {
            return answer(
                502,
                Bytes::from(format!("{{\"error\":{{\"message\":\"{e}\"}}}}")),
            );
        }
    };
    if lose {
        s.stats.lost_answers.fetch_add(1, Ordering::Relaxed);
        return error(502, "api_error", "chaos_answer_lost");
    }
    answer(status, answer_)
}

/// Calls the emulator and records the answer under the idempotency key (a failure frees
/// the key: nothing was done).
async fn forward_and_record(
    s: &ProxyState,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: Bytes,
    key: Option<String>,
) -> anyhow::Result<(u16, Bytes)> {
    let result = upstream(s, method, uri, headers, body.clone()).await;
    let (status, answer_) = match result {
        Ok(r) => r,
        Err(e) => {
            if let Some(k) = &key {
                s.keys.lock().unwrap_or_else(|e| e.into_inner()).remove(k);
            }
            return Err(e);
        }
    };
    s.stats.forwarded.fetch_add(1, Ordering::Relaxed);
    if let Some(k) = &key {
        let mut keys = s.keys.lock().unwrap_or_else(|e| e.into_inner());
        if status >= 500 {
            keys.remove(k);
        } else {
            keys.insert(k.clone(), KeyState::Done(body, status, answer_.clone()));
        }
    }
    Ok((status, answer_))
}

async fn upstream(
    s: &ProxyState,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: Bytes,
) -> anyhow::Result<(u16, Bytes)> {
    let query = uri.query().unwrap_or("");
    // The emulator has no `customer` filter on intents: all of them, filtered here.
    if method == Method::GET && uri.path() == "/v1/payment_intents" {
        let params: Vec<(String, String)> = url_pairs(query);
        if let Some((_, customer)) = params.iter().find(|(k, _)| k == "customer") {
            let api = Api {
                base: s.upstream.clone(),
                http: s.http.clone(),
            };
            let all = api.list_all("/v1/payment_intents").await?;
            let data: Vec<Value> = all
                .into_iter()
                .filter(|pi| pi["customer"].as_str() == Some(customer.as_str()))
                .collect();
            let v = json!({"object": "list", "data": data, "has_more": false, "url": "/v1/payment_intents"});
            return Ok((200, Bytes::from(v.to_string())));
        }
    }
    let url = if query.is_empty() {
        format!("{}{}", s.upstream, uri.path())
    } else {
        format!("{}{}?{query}", s.upstream, uri.path())
    };
    let m = reqwest::Method::from_bytes(method.as_str().as_bytes())?;
    let mut req = s.http.request(m, url).body(body);
    for h in ["authorization", "content-type", "stripe-version"] {
        if let Some(v) = headers.get(h).and_then(|v| v.to_str().ok()) {
            req = req.header(h, v);
        }
    }
    let r = req.send().await?;
    let status = r.status().as_u16();
    Ok((status, r.bytes().await?))
}

fn url_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.replace("%5F", "_")))
        .collect()
}

// ---- the webhook relay ---------------------------------------------------------------------

#[derive(Default)]
pub struct RelayStats {
    pub received: AtomicU64,
    pub synthetic: AtomicU64,
    pub delivered: AtomicU64,
    pub duplicated: AtomicU64,
    pub failed_deliveries: AtomicU64,
}

struct RelayState {
    targets: Vec<String>,
    http: reqwest::Client,
    /// (due, event).
    queue: Mutex<Vec<(Instant, Arc<Value>)>>,
    in_flight: AtomicU64,
    rng: Mutex<Rng>,
    stats: RelayStats,
}

#[derive(Clone)]
pub struct Relay {
    /// Where the emulator posts its events.
    pub url: String,
    state: Arc<RelayState>,
}

impl Relay {
    /// `targets`: each payments replica's `…/webhooks/stripe`.
    pub async fn start(targets: Vec<String>, rng: Rng) -> anyhow::Result<Relay> {
        let state = Arc::new(RelayState {
            targets,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(15))
                .build()?,
            queue: Mutex::new(Vec::new()),
            in_flight: AtomicU64::new(0),
            rng: Mutex::new(rng),
            stats: RelayStats::default(),
        });
        let router = Router::new()
            .route("/hook", axum::routing::post(receive))
            .with_state(state.clone());
        let url = format!("{}/hook", serve(router).await?);
        tokio::spawn(deliver_loop(state.clone()));
        Ok(Relay { url, state })
    }

    /// An event the harness makes (what the emulator cannot send), delivered like the rest.
    pub fn inject(&self, event: Value) {
        self.state.stats.synthetic.fetch_add(1, Ordering::Relaxed);
        schedule(&self.state, event);
    }

    /// Deliveries not yet acknowledged by a replica.
    pub fn pending(&self) -> u64 {
        let queued = self.state.queue.lock().map(|q| q.len()).unwrap_or(0) as u64;
        queued + self.state.in_flight.load(Ordering::Relaxed)
    }

    pub fn stats(&self) -> &RelayStats {
        &self.state.stats
    }
}

fn schedule(s: &RelayState, event: Value) {
    let event = Arc::new(event);
    let mut rng = s.rng.lock().unwrap_or_else(|e| e.into_inner());
    let copies = if rng.below(3) == 0 { 2 } else { 1 };
    if copies == 2 {
        s.stats.duplicated.fetch_add(1, Ordering::Relaxed);
    }
    let mut q = s.queue.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..copies {
        q.push((
            Instant::now() + Duration::from_millis(rng.below(3000)),
            event.clone(),
        ));
    }
}

async fn receive(State(s): State<Arc<RelayState>>, body: Bytes) -> StatusCode {
    match serde_json::from_slice::<Value>(&body) {
        Ok(event) => {
            s.stats.received.fetch_add(1, Ordering::Relaxed);
            schedule(&s, event);
            StatusCode::OK
        }
        Err(_) => StatusCode::BAD_REQUEST,
    }
}

async fn deliver_loop(s: Arc<RelayState>) {
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let due: Vec<Arc<Value>> = {
            let mut q = s.queue.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let (due, later): (Vec<_>, Vec<_>) = q.drain(..).partition(|(at, _)| *at <= now);
            *q = later;
            // Counted before the queue is let go, so `pending` never reads 0 in between.
            s.in_flight.fetch_add(due.len() as u64, Ordering::Relaxed);
            due.into_iter().map(|(_, e)| e).collect()
        };
        for event in due {
            let s = s.clone();
            tokio::spawn(async move {
                let target = {
                    let mut rng = s.rng.lock().unwrap_or_else(|e| e.into_inner());
                    s.targets[rng.below(s.targets.len() as u64) as usize].clone()
                };
                let body = serde_json::to_vec(&*event).unwrap_or_default();
                let t = chrono::Utc::now().timestamp();
                let sig = credits_payments::stripe::sign(WEBHOOK_SECRET.as_bytes(), t, &body);
                let ok = s
                    .http
                    .post(&target)
                    .header("content-type", "application/json")
                    .header("stripe-signature", sig)
                    .body(body)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success());
                if ok {
                    s.stats.delivered.fetch_add(1, Ordering::Relaxed);
                } else {
                    // As Stripe does: sent again later, perhaps to the other replica.
                    s.stats.failed_deliveries.fetch_add(1, Ordering::Relaxed);
                    let wait = {
                        let mut rng = s.rng.lock().unwrap_or_else(|e| e.into_inner());
                        1000 + rng.below(2000)
                    };
                    s.queue
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((Instant::now() + Duration::from_millis(wait), event));
                }
                s.in_flight.fetch_sub(1, Ordering::Relaxed);
            });
        }
    }
}

// ---- the dashboard -------------------------------------------------------------------------

/// A dispute the harness opened (and perhaps closed).
#[derive(Clone, Debug)]
pub struct Dispute {
    pub id: String,
    pub payment_intent: String,
    pub cents: i64,
    /// `Some(true)` won, `Some(false)` lost, `None` still open.
    pub closed_won: Option<bool>,
}

#[derive(Default, Debug)]
pub struct Dashboard {
    pub refunds: usize,
    pub disputes: Vec<Dispute>,
}

fn event(kind: &str, object: Value) -> Value {
    json!({
        "id": format!("evt_chaos_{}", uuid::Uuid::new_v4().simple()),
        "object": "event",
        "type": kind,
        "created": chrono::Utc::now().timestamp(),
        "livemode": false,
        "data": {"object": object},
    })
}

/// The intent's charge: its id, or (as the emulator answers) the charge itself.
fn latest_charge(pi: &Value) -> Option<&str> {
    let ch = &pi["latest_charge"];
    ch.as_str().or_else(|| ch["id"].as_str())
}

/// Until `until`, every 1–2 s: a refund made at the processor (part of a succeeded
/// payment) or a dispute of a whole one, each on a payment nothing else at the dashboard
/// touched; a dispute's `closed` (won or lost), when there is one, is sent with its
/// `created`, so either may arrive first.
pub async fn dashboard(emulator: Api, relay: Relay, mut rng: Rng, until: Instant) -> Dashboard {
    let mut done = Dashboard::default();
    let mut touched = std::collections::HashSet::new();
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(1000 + rng.below(1000))).await;
        let Ok(all) = emulator.list_all("/v1/payment_intents").await else {
            continue;
        };
        let candidates: Vec<&Value> = all
            .iter()
            .filter(|pi| {
                pi["status"] == "succeeded"
                    && pi["metadata"]["charge_id"].is_string()
                    && latest_charge(pi).is_some()
                    && pi["id"].as_str().is_some_and(|id| !touched.contains(id))
            })
            .collect();
        if candidates.is_empty() {
            continue;
        }
        let pi = candidates[rng.below(candidates.len() as u64) as usize];
        let (Some(id), Some(ch), Some(cents)) =
            (pi["id"].as_str(), latest_charge(pi), pi["amount"].as_i64())
        else {
            continue;
        };
        touched.insert(id.to_owned());
        let refunded = pi["latest_charge"]["amount_refunded"].as_i64().unwrap_or(0);
        if rng.below(2) == 0 {
            // Never more than is left (Stripe refuses that).
            let part = (100 + rng.below(400) as i64).min(cents - refunded);
            if part <= 0 {
                continue;
            }
            if emulator
                .post(
                    "/v1/refunds",
                    &[("payment_intent", id.into()), ("amount", part.to_string())],
                )
                .await
                .is_err()
            {
                continue;
            }
            // The event's object is only a hint (payments re-reads the charge).
            let charge = emulator
                .get(&format!("/v1/charges/{ch}"))
                .await
                .unwrap_or_else(|_| json!({"id": ch, "object": "charge"}));
            relay.inject(event("charge.refunded", charge));
            done.refunds += 1;
        } else {
            let dp = format!("dp_chaos_{}", uuid::Uuid::new_v4().simple());
            let object = |status: &str| {
                json!({
                    "id": dp, "object": "dispute", "amount": cents, "currency": "usd",
                    "charge": ch, "payment_intent": id, "reason": "fraudulent", "status": status,
                })
            };
            relay.inject(event("charge.dispute.created", object("needs_response")));
            let closed_won = match rng.below(3) {
                0 => None,
                1 => Some(true),
                _ => Some(false),
            };
            if let Some(won) = closed_won {
                relay.inject(event(
                    "charge.dispute.closed",
                    object(if won { "won" } else { "lost" }),
                ));
            }
            done.disputes.push(Dispute {
                id: dp,
                payment_intent: id.to_owned(),
                cents,
                closed_won,
            });
        }
    }
    done
}
