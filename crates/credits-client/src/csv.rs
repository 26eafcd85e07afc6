//! History as CSV (R30): what the billing page's download and `credits accounts export`
//! write, so a customer and an operator get the same file.
//!
//! One row per journal entry, oldest or newest first as the caller pages. `amount` is
//! signed the way the entry moved the balance (credits positive, every debit negative), so
//! a spreadsheet's column sum is the balance change. Text a customer or caller chose
//! (description, reference, key) is quoted, and a cell a spreadsheet would read as a formula
//! (starting with `=`, `+`, `-`, `@`, a tab or a carriage return) is prefixed with `'`.

use crate::types::{Entry, UsagePeriod};

/// The header line of [`entry_row`]'s rows.
pub const ENTRIES_HEADER: &str = "created_at,entry_id,kind,category_or_source,amount,balance_after,reference,description,idempotency_key";

/// The header line of [`period_row`]'s rows.
pub const PERIODS_HEADER: &str = "start,category,amount,count";

/// One entry as a CSV line (no line break).
pub fn entry_row(e: &Entry) -> String {
    let sign = if e.kind.is_credit() { "" } else { "-" };
    [
        e.created_at.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string(),
        e.entry_id.clone(),
        e.kind.as_str().to_owned(),
        e.kind.detail().to_owned(),
        format!("{sign}{}", e.amount.to_wire()),
        e.balance_after.to_wire(),
        text_cell(&e.reference),
        text_cell(&e.description),
        text_cell(&e.idempotency_key),
    ]
    .join(",")
}

/// One usage period as a CSV line (no line break).
pub fn period_row(p: &UsagePeriod) -> String {
    format!(
        "{},{},{},{}",
        p.start.format("%Y-%m-%dT%H:%M:%SZ"),
        p.category.as_str(),
        p.amount.to_wire(),
        p.count
    )
}

/// A free-text cell: quoted (quotes doubled), and never read as a formula.
pub fn text_cell(s: &str) -> String {
    let guarded = if s.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{s}")
    } else {
        s.to_owned()
    };
    format!("\"{}\"", guarded.replace('"', "\"\""))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn text_cells_are_quoted_and_never_formulas() {
        assert_eq!(text_cell("plain"), "\"plain\"");
        assert_eq!(text_cell("say \"hi\", ok"), "\"say \"\"hi\"\", ok\"");
        assert_eq!(text_cell("=HYPERLINK(\"x\")"), "\"'=HYPERLINK(\"\"x\"\")\"");
        assert_eq!(text_cell("+1"), "\"'+1\"");
        assert_eq!(text_cell("-2"), "\"'-2\"");
        assert_eq!(text_cell("@SUM(A1)"), "\"'@SUM(A1)\"");
        assert_eq!(text_cell("line\nbreak"), "\"line\nbreak\"");
        assert_eq!(text_cell(""), "\"\"");
    }
}
