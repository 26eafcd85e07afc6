//! `localstripe` (PyPI), a stateful Stripe emulator, run per test on a free loopback port:
//! the Stripe side of the tests, never a mock of our own code. `.ci/run` installs it; a
//! test started without it fails saying how to install it.
//!
//! What the emulator cannot show (dashboard refunds, disputes: it sends no `charge.*`
//! events and has no `/v1/disputes`) the tests post themselves as correctly signed events,
//! as Stripe's own CLI (`stripe trigger`) does: [`LocalStripe::deliver`].

use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::process::{Child, Command};

pub const SECRET_KEY: &str = "sk_test_credits_localstripe";
pub const PUBLISHABLE_KEY: &str = "pk_test_credits_localstripe";
pub const WEBHOOK_SECRET: &str = "whsec_credits_localstripe_test";

pub struct LocalStripe {
    pub base: String,
    child: Child,
    http: reqwest::Client,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl LocalStripe {
    pub async fn start() -> LocalStripe {
        let port = free_port();
        let child =
            Command::new(std::env::var("LOCALSTRIPE").unwrap_or_else(|_| "localstripe".into()))
                .args(["--port", &port.to_string(), "--from-scratch"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .expect("start localstripe (pip install localstripe==1.15.10; .ci/run does)");
        let s = LocalStripe {
            base: format!("http://127.0.0.1:{port}"),
            child,
            http: reqwest::Client::new(),
        };
        for _ in 0..100 {
            if s.http
                .get(format!("{}/v1/customers", s.base))
                .basic_auth(SECRET_KEY, Some(""))
                .send()
                .await
                .is_ok()
            {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("localstripe did not come up on {}", s.base);
    }

    pub fn config(&self) -> credits_payments::stripe::StripeConfig {
        credits_payments::stripe::StripeConfig {
            secret_key: credits_common::config::Secret::new(SECRET_KEY),
            publishable_key: PUBLISHABLE_KEY.into(),
            webhook_secret: credits_common::config::Secret::new(WEBHOOK_SECRET),
            api_base: self.base.clone(),
        }
    }

    /// Stripe's API as a test calls it (as Stripe.js or the dashboard would).
    pub async fn api(
        &self,
        method: reqwest::Method,
        path: &str,
        form: &[(&str, &str)],
    ) -> (u16, Value) {
        let mut req = self
            .http
            .request(method.clone(), format!("{}{path}", self.base))
            .basic_auth(SECRET_KEY, Some(""));
        req = if method == reqwest::Method::GET {
            req.query(form)
        } else {
            req.form(form)
        };
        let r = req.send().await.expect("localstripe answers");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn post(&self, path: &str, form: &[(&str, &str)]) -> Value {
        let (status, v) = self.api(reqwest::Method::POST, path, form).await;
        assert!(status < 300, "POST {path}: {status} {v}");
        v
    }

    pub async fn get(&self, path: &str) -> Value {
        let (status, v) = self.api(reqwest::Method::GET, path, &[]).await;
        assert!(status < 300, "GET {path}: {status} {v}");
        v
    }

    /// A card payment method, as Stripe.js makes it from what the customer typed.
    pub async fn card(&self, number: &str) -> String {
        let pm = self
            .post(
                "/v1/payment_methods",
                &[
                    ("type", "card"),
                    ("card[number]", number),
                    ("card[exp_month]", "12"),
                    ("card[exp_year]", "2031"),
                    ("card[cvc]", "123"),
                ],
            )
            .await;
        pm["id"].as_str().expect("pm id").to_owned()
    }

    /// Registers payments' webhook endpoint (the emulator then sends its events there).
    pub async fn send_webhooks_to(&self, url: &str) {
        let (status, _) = self
            .api(
                reqwest::Method::POST,
                "/_config/webhooks/credits",
                &[("url", url), ("secret", WEBHOOK_SECRET)],
            )
            .await;
        assert!(status < 300, "register webhook: {status}");
    }

    /// Posts an event to `url` as Stripe would: signed with the endpoint's secret at
    /// `signed_at` (unix seconds). The HTTP status is returned.
    pub async fn deliver(&self, url: &str, event: &Value, signed_at: i64) -> u16 {
        let body = serde_json::to_vec(event).expect("json");
        let sig = credits_payments::stripe::sign(WEBHOOK_SECRET.as_bytes(), signed_at, &body);
        post_raw(url, &body, Some(&sig)).await
    }
}

/// A POST with a chosen `Stripe-Signature` (or none): what a forger can send.
pub async fn post_raw(url: &str, body: &[u8], signature: Option<&str>) -> u16 {
    let mut req = reqwest::Client::new()
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_vec());
    if let Some(s) = signature {
        req = req.header("stripe-signature", s);
    }
    req.send()
        .await
        .expect("payments answers")
        .status()
        .as_u16()
}

/// An event envelope as Stripe sends it.
pub fn event(id: &str, kind: &str, object: Value) -> Value {
    json!({
        "id": id,
        "object": "event",
        "type": kind,
        "api_version": credits_payments::stripe::STRIPE_VERSION,
        "created": chrono::Utc::now().timestamp(),
        "livemode": false,
        "data": { "object": object },
    })
}

impl Drop for LocalStripe {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}
