//! Human tables by default, JSON with `--json`: every record is first turned into a JSON
//! object (enum names as strings, money as decimal strings), then printed either way.

#![allow(clippy::print_stdout)] // printing is this module's job

use credits_proto::ledger::v1 as lpb;
use credits_proto::payments::v1 as ppb;
use credits_proto::recharge::v1 as rpb;
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

    pub fn say(&self, msg: &str) {
        if !self.json {
            println!("{msg}");
        }
    }
}

fn ts(t: &Option<prost_types::Timestamp>) -> Value {
    match t {
        Some(t) => match chrono_like(t) {
            Some(s) => Value::String(s),
            None => Value::Null,
        },
        None => Value::Null,
    }
}

/// RFC 3339 without pulling chrono into the CLI's public surface.
fn chrono_like(t: &prost_types::Timestamp) -> Option<String> {
    let secs = t.seconds;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    Some(format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    ))
}

fn name<E: std::fmt::Debug>(v: Result<E, prost::UnknownEnumValue>) -> String {
    match v {
        Ok(e) => {
            // prost's Debug is CamelCase; the contract's names are SCREAMING_SNAKE.
            let s = format!("{e:?}");
            let mut out = String::new();
            for (i, ch) in s.chars().enumerate() {
                if ch.is_uppercase() && i > 0 {
                    out.push('_');
                }
                out.push(ch.to_ascii_uppercase());
            }
            out
        }
        Err(e) => e.to_string(),
    }
}

pub fn account(a: &lpb::Account) -> Value {
    json!({
        "account_id": a.account_id,
        "billing_mode": name(lpb::BillingMode::try_from(a.billing_mode)),
        "display_name": a.display_name,
        "balance": a.balance,
        "access": name(lpb::Access::try_from(a.access)),
        "balance_threshold": a.balance_threshold,
        "created_at": ts(&a.created_at),
    })
}

pub fn entry(e: &lpb::Entry) -> Value {
    let kind = lpb::EntryKind::try_from(e.kind);
    let what = if kind == Ok(lpb::EntryKind::Usage) {
        name(lpb::UsageCategory::try_from(e.category))
    } else {
        name(lpb::CreditSource::try_from(e.source))
    };
    json!({
        "entry_id": e.entry_id,
        "kind": name(kind),
        "category_or_source": what,
        "amount": e.amount,
        "balance_after": e.balance_after,
        "reference": e.reference,
        "created_at": ts(&e.created_at),
    })
}

pub fn method(m: &ppb::PaymentMethod) -> Value {
    json!({
        "payment_method_id": m.payment_method_id,
        "type": name(ppb::PaymentMethodType::try_from(m.r#type)),
        "brand": m.brand,
        "last4": m.last4,
        "expiry": if m.exp_month > 0 { format!("{:02}/{}", m.exp_month, m.exp_year) } else { String::new() },
        "is_default": m.is_default,
    })
}

pub fn charge(c: &ppb::Charge) -> Value {
    json!({
        "charge_id": c.charge_id,
        "status": name(ppb::ChargeStatus::try_from(c.status)),
        "amount": c.amount,
        "failure_code": c.failure_code,
        "payment_method_id": c.payment_method_id,
        "description": c.description,
        "created_at": ts(&c.created_at),
    })
}

pub fn auto_recharge(a: &rpb::AutoRecharge) -> Value {
    json!({
        "account_id": a.account_id,
        "enabled": a.enabled,
        "threshold": a.threshold,
        "target": a.target,
        "disabled_reason": name(rpb::DisabledReason::try_from(a.disabled_reason)),
        "consecutive_failures": a.consecutive_failures,
        "updated_at": ts(&a.updated_at),
    })
}

pub fn attempt(a: &rpb::RechargeAttempt) -> Value {
    json!({
        "attempt_id": a.attempt_id,
        "status": name(rpb::AttemptStatus::try_from(a.status)),
        "trigger": a.trigger,
        "balance_at_trigger": a.balance_at_trigger,
        "amount": a.amount,
        "charge_id": a.charge_id,
        "failure_code": a.failure_code,
        "created_at": ts(&a.created_at),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enum_names_follow_the_contract() {
        assert_eq!(name(lpb::Access::try_from(1)), "PENDING_FIRST_PURCHASE");
        assert_eq!(
            name(rpb::DisabledReason::try_from(2)),
            "DEFAULT_PAYMENT_METHOD_NOT_CARD"
        );
    }

    #[test]
    fn timestamps_are_rfc3339() {
        let t = prost_types::Timestamp {
            seconds: 1_795_478_400,
            nanos: 0,
        };
        assert_eq!(chrono_like(&t).as_deref(), Some("2026-11-24T00:00:00Z"));
    }
}
