//! A small driver for headless Chromium over the DevTools protocol (CDP): launch, open a
//! page, fill controls by their `<label>`, click buttons by their text, read the page,
//! take screenshots. Just enough for the portal's tests; one page, one command at a time.
//!
//! Chromium comes from Debian (`chromium`; `.ci/run` installs it); `CHROMIUM` overrides
//! the path.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub struct Browser {
    child: tokio::process::Child,
    ws: Ws,
    session: String,
    next_id: u64,
    pub dir: PathBuf,
    /// DevTools events seen while waiting for answers (network requests, once enabled).
    pub events: Vec<Value>,
}

const WAIT: Duration = Duration::from_secs(15);

impl Browser {
    /// Starts a fresh headless Chromium (its own profile under `dir`) with one blank page.
    pub async fn launch(dir: &Path) -> Browser {
        let exe = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".to_owned());
        let profile = dir.join("profile");
        std::fs::create_dir_all(&profile).unwrap();
        let child = tokio::process::Command::new(&exe)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--no-default-browser-check",
                "--remote-debugging-port=0",
                "--window-size=1100,1400",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {exe} ({e}); install Debian's chromium (.ci/run does)")
            });
        // Chromium writes the port it chose and the browser's endpoint here.
        let port_file = profile.join("DevToolsActivePort");
        let deadline = tokio::time::Instant::now() + WAIT;
        let (port, path) = loop {
            if let Ok(s) = std::fs::read_to_string(&port_file) {
                let mut lines = s.lines();
                if let (Some(p), Some(path)) = (lines.next(), lines.next()) {
                    break (p.to_owned(), path.to_owned());
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "chromium did not start"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}{path}"))
            .await
            .expect("devtools websocket");
        let mut b = Browser {
            child,
            ws,
            session: String::new(),
            next_id: 0,
            dir: dir.to_owned(),
            events: Vec::new(),
        };
        let target = b
            .call_browser("Target.createTarget", json!({ "url": "about:blank" }))
            .await;
        let attached = b
            .call_browser(
                "Target.attachToTarget",
                json!({ "targetId": target["targetId"], "flatten": true }),
            )
            .await;
        b.session = attached["sessionId"].as_str().unwrap().to_owned();
        b.call("Page.enable", json!({})).await;
        b.call("Runtime.enable", json!({})).await;
        b
    }

    async fn send(&mut self, session: Option<String>, method: &str, params: Value) -> Value {
        self.try_send(session, method, params)
            .await
            .unwrap_or_else(|e| panic!("{method}: {e}"))
    }

    /// A DevTools call's result, or the error DevTools answered.
    async fn try_send(
        &mut self,
        session: Option<String>,
        method: &str,
        params: Value,
    ) -> Result<Value, Value> {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if let Some(s) = session {
            msg["sessionId"] = Value::String(s);
        }
        self.ws
            .send(Message::Text(msg.to_string().into()))
            .await
            .unwrap();
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let next = tokio::time::timeout(left, self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("no answer to {method}"));
            let Some(Ok(Message::Text(t))) = next else {
                continue;
            };
            let v: Value = serde_json::from_str(&t).unwrap();
            if v["method"] == "Network.requestWillBeSent" {
                self.events.push(v["params"]["request"].clone());
                continue;
            }
            if v["id"] == id {
                return match v.get("error") {
                    Some(e) => Err(e.clone()),
                    None => Ok(v["result"].clone()),
                };
            }
        }
    }

    async fn call_browser(&mut self, method: &str, params: Value) -> Value {
        self.send(None, method, params).await
    }

    async fn call(&mut self, method: &str, params: Value) -> Value {
        let s = self.session.clone();
        self.send(Some(s), method, params).await
    }

    /// Evaluates `js` in the page and returns its value (promises awaited).
    pub async fn eval(&mut self, js: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": js, "returnByValue": true, "awaitPromise": true }),
            )
            .await;
        if let Some(e) = r.get("exceptionDetails") {
            panic!("script failed: {e}\n{js}");
        }
        r["result"]["value"].clone()
    }

    /// Records every request the page sends from now on (`requests_to`).
    pub async fn watch_requests(&mut self) {
        self.call("Network.enable", json!({})).await;
    }

    /// The requests sent to URLs starting with `prefix` so far: (method, url, body).
    pub async fn requests_to(&mut self, prefix: &str) -> Vec<(String, String, String)> {
        self.eval("1").await; // read the events that arrived meanwhile
        self.events
            .iter()
            .filter(|r| r["url"].as_str().unwrap_or_default().starts_with(prefix))
            .map(|r| {
                let s = |k: &str| r[k].as_str().unwrap_or_default().to_owned();
                (s("method"), s("url"), s("postData"))
            })
            .collect()
    }

    /// Clicks the visible button whose text is `text` once it is there (a dialog a script
    /// opens), without waiting for a page.
    pub async fn click_when_shown(&mut self, text: &str) {
        let deadline = tokio::time::Instant::now() + WAIT;
        let find = format!(
            "(() => {{ const b = [...document.querySelectorAll('button')].find(b => b.textContent.trim() === {}); if (!b) return false; b.click(); return true; }})()",
            json!(text)
        );
        while self.eval(&find).await != Value::Bool(true) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no button {text:?} shown"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Clicks `text`, answers the dialog a script then opens by its button `dialog` (if
    /// any), and waits for the page the script leads to.
    pub async fn submit_through(&mut self, text: &str, dialog: Option<&str>) {
        self.mark().await;
        self.eval(&Self::click_js(text)).await;
        if let Some(d) = dialog {
            self.click_when_shown(d).await;
        }
        self.wait_new_document().await;
    }

    /// Marks the current document, so that [`Browser::wait_new_document`] can tell when
    /// another one has loaded.
    async fn mark(&mut self) {
        self.eval("window.__old_document = true").await;
    }

    async fn wait_new_document(&mut self) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            // A page that navigates while it is asked ("Inspected target navigated or
            // closed": the session link's page moving on by itself) is asked again.
            let session = Some(self.session.clone());
            let asked = self
                .try_send(
                    session,
                    "Runtime.evaluate",
                    json!({ "expression": "window.__old_document === undefined && document.readyState === 'complete'",
                            "returnByValue": true }),
                )
                .await;
            if asked.is_ok_and(|r| r["result"]["value"] == Value::Bool(true)) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the page did not load"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Opens `url` and waits until it (and any redirect) has loaded.
    pub async fn goto(&mut self, url: &str) {
        self.mark().await;
        self.call("Page.navigate", json!({ "url": url })).await;
        self.wait_new_document().await;
    }

    /// Waits until the page at `path` (e.g. after the session link's own page moved on to
    /// it) has loaded.
    pub async fn wait_for_path(&mut self, path: &str) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let here = self
                .eval(&format!(
                    "location.pathname === {} && document.readyState === 'complete'",
                    json!(path)
                ))
                .await;
            if here == Value::Bool(true) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "never reached {path}: {}",
                self.url().await
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Opens a session link the way a customer does and waits for the billing page.
    pub async fn open_session(&mut self, link: &str) {
        self.goto(link).await;
        self.wait_for_path("/billing").await;
    }

    pub async fn url(&mut self) -> String {
        self.eval("location.href")
            .await
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// The page's visible text.
    pub async fn text(&mut self) -> String {
        self.eval("document.body.innerText")
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// The error shown next to the control with id `control` (panics when there is none).
    pub async fn error_at(&mut self, control: &str) -> String {
        match self.text_of(&format!("{control}-error")).await {
            Some(e) => e,
            None => panic!("no error at {control}: {}", self.text().await),
        }
    }

    /// The whole document's markup, as it is now.
    pub async fn html(&mut self) -> String {
        self.eval("document.documentElement.outerHTML")
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// The value of the (hidden or visible) input named `name`.
    pub async fn input(&mut self, name: &str) -> String {
        let js = format!(
            "document.querySelector({}).value",
            json!(format!("input[name={name}]"))
        );
        self.eval(&js).await.as_str().unwrap_or_default().to_owned()
    }

    /// The text of the element with `id` (`None` when there is none).
    pub async fn text_of(&mut self, id: &str) -> Option<String> {
        let js = format!(
            "(() => {{ const e = document.getElementById({}); return e ? e.textContent : null; }})()",
            json!(id)
        );
        self.eval(&js).await.as_str().map(str::to_owned)
    }

    /// JS locating the visible control labelled exactly `label`.
    fn control(label: &str) -> String {
        format!(
            "(() => {{ const l = [...document.querySelectorAll('label')].find(l => l.textContent.trim() === {} && l.control && l.control.offsetParent !== null); \
               if (!l) throw new Error('no visible control labelled ' + {}); return l.control; }})()",
            json!(label),
            json!(label)
        )
    }

    /// Types `value` into the control labelled `label` (replacing what it held).
    pub async fn fill(&mut self, label: &str, value: &str) {
        let js = format!(
            "(() => {{ const c = {}; c.focus(); c.value = {}; c.dispatchEvent(new Event('input', {{bubbles: true}})); return true; }})()",
            Self::control(label),
            json!(value)
        );
        self.eval(&js).await;
    }

    /// Ticks or unticks the checkbox labelled `label`.
    pub async fn check(&mut self, label: &str, on: bool) {
        let js = format!(
            "(() => {{ const c = {}; if (c.checked !== {on}) c.click(); return c.checked; }})()",
            Self::control(label)
        );
        assert_eq!(self.eval(&js).await, Value::Bool(on));
    }

    /// The value of the control labelled `label`.
    pub async fn value(&mut self, label: &str) -> String {
        let js = format!("{}.value", Self::control(label));
        self.eval(&js).await.as_str().unwrap_or_default().to_owned()
    }

    /// JS clicking the visible button or disclosure whose text is exactly `text`.
    fn click_js(text: &str) -> String {
        format!(
            "(() => {{ const b = [...document.querySelectorAll('button, summary, a')].find(b => b.textContent.trim() === {} && (b.offsetParent !== null || b.tagName === 'SUMMARY')); \
               if (!b) throw new Error('nothing to click named ' + {}); b.click(); return true; }})()",
            json!(text),
            json!(text)
        )
    }

    /// Opens a `<details>` by its summary text (no navigation).
    pub async fn open(&mut self, summary: &str) {
        let js = format!(
            "(() => {{ const s = [...document.querySelectorAll('summary')].find(s => s.textContent.trim() === {}); \
               if (!s) throw new Error('no section ' + {}); s.parentElement.open = true; return true; }})()",
            json!(summary),
            json!(summary)
        );
        self.eval(&js).await;
    }

    /// Clicks a button (or link) by its text and waits for the page it leads to.
    pub async fn submit(&mut self, text: &str) {
        self.mark().await;
        self.eval(&Self::click_js(text)).await;
        self.wait_new_document().await;
    }

    /// Posts a form the page does not have (as a forged or stale form would), with
    /// `fields`, and waits for the answer's page.
    pub async fn post_form(&mut self, action: &str, fields: &[(&str, &str)]) {
        let inputs: Vec<Value> = fields.iter().map(|(k, v)| json!([k, v])).collect();
        let js = format!(
            "(() => {{ const f = document.createElement('form'); f.method = 'post'; f.action = {}; \
               for (const [k, v] of {}) {{ const i = document.createElement('input'); i.type = 'hidden'; i.name = k; i.value = v; f.appendChild(i); }} \
               document.body.appendChild(f); f.submit(); return true; }})()",
            json!(action),
            Value::Array(inputs)
        );
        self.mark().await;
        self.eval(&js).await;
        self.wait_new_document().await;
    }

    /// Whether a visible button, link or summary says exactly `text`.
    pub async fn has_button(&mut self, text: &str) -> bool {
        let js = format!(
            "[...document.querySelectorAll('button, summary, a')].some(b => b.textContent.trim() === {})",
            json!(text)
        );
        self.eval(&js).await == Value::Bool(true)
    }

    /// Saves a PNG of the page as `<dir>/<name>.png` and returns its path.
    pub async fn screenshot(&mut self, name: &str) -> PathBuf {
        let r = self
            .call(
                "Page.captureScreenshot",
                json!({ "format": "png", "captureBeyondViewport": true }),
            )
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().unwrap())
            .unwrap();
        let path = self.dir.join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap();
        path
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
        let _ = self.child.kill().await;
    }
}
