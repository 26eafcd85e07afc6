//! The daemons as child processes that the harness can SIGKILL and restart.

use std::path::PathBuf;
use std::process::Stdio;

use tokio::process::{Child, Command};

#[derive(Clone, Debug)]
pub struct Spec {
    pub name: String,
    pub binary: String,
    pub env: Vec<(String, String)>,
    pub port: u16,
}

pub struct Daemon {
    pub spec: Spec,
    pub child: Option<Child>,
    pub log: PathBuf,
    pub restarts: u32,
}

/// The directory holding the workspace binaries (the one this binary runs from).
pub fn bin_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|p| p.to_path_buf()))
        .unwrap_or_else(|| PathBuf::from("."))
}

impl Daemon {
    pub fn new(spec: Spec, logdir: &std::path::Path) -> Daemon {
        let log = logdir.join(format!("{}.log", spec.name));
        Daemon {
            spec,
            child: None,
            log,
            restarts: 0,
        }
    }

    pub fn start(&mut self) -> anyhow::Result<()> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut cmd = Command::new(bin_dir().join(&self.spec.binary));
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RUST_LOG", "info")
            .env("METRICS_ADDR", "off")
            .stdout(Stdio::from(file.try_clone()?))
            .stderr(Stdio::from(file))
            .kill_on_drop(true);
        for (k, v) in &self.spec.env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn()?);
        Ok(())
    }

    /// `kill -9`: no chance to drain or clean up.
    pub async fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
        }
    }

    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill9().await;
        self.restarts += 1;
        self.start()
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.spec.port)
    }

    /// SIGTERM and wait: `Ok` when it exited 0, else what happened instead.
    pub async fn stop(&mut self) -> Result<(), String> {
        let Some(mut c) = self.child.take() else {
            return Ok(());
        };
        if let Some(pid) = c.id() {
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await;
        }
        match tokio::time::timeout(std::time::Duration::from_secs(20), c.wait()).await {
            Ok(Ok(s)) if s.success() => Ok(()),
            Ok(Ok(s)) => Err(format!("exited with {s}")),
            Ok(Err(e)) => Err(format!("could not be waited for: {e}")),
            Err(_) => {
                let _ = c.kill().await;
                Err("still running 20 s after SIGTERM (killed)".into())
            }
        }
    }
}

pub async fn sh(cmd: &str, args: &[&str]) -> bool {
    Command::new(cmd)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .map(|s| s.success())
        .unwrap_or(false)
}
