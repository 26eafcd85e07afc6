//! Logging through `tracing-subscriber`: `RUST_LOG` filters, `LOG_FORMAT=json|text` picks
//! the format. Installing twice is harmless (tests call it from every test).

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Installs the global subscriber writing to stderr. `default_filter` applies when
/// `RUST_LOG` is unset. lapin's own line per message the broker returns as unroutable is
/// silenced (unless `RUST_LOG` names `lapin::returned_messages`): the outbox relay logs the
/// first return of each event itself and counts the rest (`credits_outbox_unroutable_total`),
/// where lapin would log every retry of every event.
pub fn init(format: LogFormat, default_filter: &str) {
    let mut filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    if !std::env::var("RUST_LOG").is_ok_and(|v| v.contains("lapin::returned_messages"))
        && let Ok(d) = "lapin::returned_messages=error".parse()
    {
        filter = filter.add_directive(d);
    }
    let registry = tracing_subscriber::registry().with(filter);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = match format {
        LogFormat::Text => registry
            .with(fmt::layer().with_ansi(ansi).with_writer(std::io::stderr))
            .try_init(),
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
}

/// For tests: quiet unless `TEST_LOG` is set, as in zero-to-production.
pub fn init_for_tests() {
    if std::env::var_os("TEST_LOG").is_some() {
        init(LogFormat::Text, "info");
    }
}
