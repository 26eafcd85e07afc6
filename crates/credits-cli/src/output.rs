//! Human tables by default, JSON with `--json`: every record is first turned into a JSON
//! object (enum names as strings, money as decimal strings), then printed either way.

#![allow(clippy::print_stdout)] // printing is this module's job

use chrono::{DateTime, Utc};
use credits_client::{
    Account, AutoRecharge, Charge, Entry, Grant, Hold, Money, PaymentMethod, RechargeAttempt,
    UsagePeriod,
};
use serde_json::{Value, json};

pub struct Out {
    pub json: bool,
}

impl Out {
    /// Prints records as a table with these columns, or as a JSON array.
    pub fn list(&self, rows: &[Value], cols: &[&str]) {
        if self.json {
            println!("{}", Value::Array(rows.to_vec()));
            return;
        }
        let cell = |r: &Value, c: &str| match &r[c] {
            Value::String(s) => s.clone(),
            Value::Null => String::new(),
            v => v.to_string(),
        };
        let widths: Vec<usize> = cols
            .iter()
            .map(|c| {
                rows.iter()
                    .map(|r| cell(r, c).chars().count())
                    .max()
                    .unwrap_or(0)
                    .max(c.len())
            })
            .collect();
        let line = |cells: Vec<String>| {
            let parts: Vec<String> = cells
                .iter()
                .zip(&widths)
                .map(|(s, w)| format!("{s:<w$}"))
                .collect();
            println!("{}", parts.join("  ").trim_end());
        };
        line(cols.iter().map(|c| c.to_uppercase()).collect());
        for r in rows {
            line(cols.iter().map(|c| cell(r, c)).collect());
        }
        if rows.is_empty() {
            println!("(none)");
        }
    }

    /// Prints one record as `key: value` lines, or as a JSON object.
    /// `items` as rows made by `row`: a table of the space-separated `cols`, or every field
    /// of each row in JSON.
    pub fn table<T>(&self, items: &[T], row: impl Fn(&T) -> Value, cols: &str) {
        let rows: Vec<Value> = items.iter().map(row).collect();
        self.list(&rows, &cols.split_whitespace().collect::<Vec<_>>());
    }

    pub fn one(&self, v: &Value) {
        if self.json {
            println!("{v}");
            return;
        }
        if let Value::Object(m) = v {
            let w = m.keys().map(|k| k.len()).max().unwrap_or(0);
            for (k, val) in m {
                let s = match val {
                    Value::String(s) => s.clone(),
                    Value::Null => "-".to_owned(),
                    other => other.to_string(),
                };
                println!("{k:<w$}  {s}");
            }
        }
    }

    /// A line of a file written to stdout (CSV), whatever the output mode. A reader that
    /// went away (`| head`) ends the command quietly, as it does for any Unix tool.
    pub fn print_line(&self, line: &str) {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        if let Err(e) = writeln!(out, "{line}") {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
            #[allow(clippy::print_stderr)]
            {
                eprintln!("error: writing to stdout: {e}");
            }
            std::process::exit(1);
        }
    }

    pub fn say(&self, msg: &str) {
        if !self.json {
            println!("{msg}");
        }
    }
}

/// RFC 3339 to the second, UTC; `null` when absent.
fn ts(t: Option<DateTime<Utc>>) -> Value {
    match t {
        Some(t) => Value::String(t.format("%Y-%m-%dT%H:%M:%SZ").to_string()),
        None => Value::Null,
    }
}

/// An optional amount as the wire spells it: empty when absent.
fn money(m: Option<Money>) -> String {
    m.map(|m| m.to_wire()).unwrap_or_default()
}

pub fn account(a: &Account) -> Value {
    json!({
        "account_id": a.account_id.as_str(),
        "billing_mode": a.billing_mode.as_str(),
        "display_name": a.display_name,
        "balance": a.balance.to_wire(),
        "held": a.held.to_wire(),
        "available_balance": a.available_balance.to_wire(),
        "access": a.access.as_str(),
        "balance_threshold": money(a.balance_threshold),
        "alert_thresholds": a.alert_thresholds.iter().map(|t| t.to_wire()).collect::<Vec<_>>(),
        "created_at": ts(Some(a.created_at)),
    })
}

pub fn entry(e: &Entry) -> Value {
    json!({
        "entry_id": e.entry_id,
        "kind": e.kind.as_str(),
        "category_or_source": e.kind.detail(),
        "amount": e.amount.to_wire(),
        "balance_after": e.balance_after.to_wire(),
        "reference": e.reference,
        "created_at": ts(Some(e.created_at)),
    })
}

pub fn grant(g: &Grant) -> Value {
    json!({
        "grant_id": g.grant_id,
        "source": g.source.as_str(),
        "amount": g.amount.to_wire(),
        "remaining": g.remaining.to_wire(),
        "expires_at": ts(g.expires_at),
        "priority": g.priority,
        "reason": g.reason,
        "created_at": ts(Some(g.created_at)),
        "entry_id": g.entry_id,
    })
}

pub fn period(p: &UsagePeriod) -> Value {
    json!({
        "start": ts(Some(p.start)),
        "category": p.category.as_str(),
        "amount": p.amount.to_wire(),
        "count": p.count,
    })
}

pub fn hold(h: &Hold) -> Value {
    json!({
        "hold_id": h.hold_id,
        "account_id": h.account_id.as_str(),
        "status": h.status.as_str(),
        "amount": h.amount.to_wire(),
        "captured_amount": money(h.captured_amount),
        "category": h.category.as_str(),
        "description": h.description,
        "created_at": ts(Some(h.created_at)),
        "expires_at": ts(Some(h.expires_at)),
        "ended_at": ts(h.ended_at),
    })
}

pub fn method(m: &PaymentMethod) -> Value {
    json!({
        "payment_method_id": m.payment_method_id,
        "type": m.method_type.as_str(),
        "brand": m.brand,
        "last4": m.last4,
        "expiry": m.expiry.map(|x| format!("{:02}/{}", x.month, x.year)).unwrap_or_default(),
        "is_default": m.is_default,
    })
}

pub fn charge(c: &Charge) -> Value {
    json!({
        "charge_id": c.charge_id,
        "status": c.status.as_str(),
        "amount": c.amount.to_wire(),
        "failure_code": c.failure_code.as_deref().unwrap_or_default(),
        "payment_method_id": c.payment_method_id,
        "description": c.description,
        "created_at": ts(Some(c.created_at)),
    })
}

pub fn auto_recharge(a: &AutoRecharge) -> Value {
    json!({
        "account_id": a.account_id.as_str(),
        "enabled": a.enabled,
        "threshold": money(a.threshold),
        "target": money(a.target),
        "disabled_reason": a.disabled_reason.as_str(),
        "consecutive_failures": a.consecutive_failures,
        "monthly_limit": money(a.monthly_limit),
        "charged_this_month": a.charged_this_month.to_wire(),
        "updated_at": ts(a.updated_at),
    })
}

pub fn attempt(a: &RechargeAttempt) -> Value {
    json!({
        "attempt_id": a.attempt_id,
        "status": a.status.as_str(),
        "trigger": a.trigger,
        "balance_at_trigger": a.balance_at_trigger.to_wire(),
        "amount": a.amount.to_wire(),
        "charge_id": a.charge_id.as_deref().unwrap_or_default(),
        "failure_code": a.failure_code.as_deref().unwrap_or_default(),
        "created_at": ts(Some(a.created_at)),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_to_the_second() {
        let t = DateTime::from_timestamp(1_795_478_400, 999_000_000).unwrap();
        assert_eq!(ts(Some(t)), Value::String("2026-11-24T00:00:00Z".into()));
        assert_eq!(ts(None), Value::Null);
    }

    #[test]
    fn absent_amounts_print_as_the_wire_does() {
        assert_eq!(money(None), "");
        assert_eq!(money(Some("12.5".parse().unwrap())), "12.50");
    }
}
