//! Validated identifiers and text fields shared by every service's requests.

use crate::error::ServiceError;

/// 1–64 of `[A-Za-z0-9_-]` (docs/api.md).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AccountId(String);

impl AccountId {
    pub fn parse(s: &str) -> Result<Self, ServiceError> {
        let ok = (1..=64).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if ok {
            Ok(AccountId(s.to_owned()))
        } else if s.is_empty() {
            Err(ServiceError::invalid("account_id: is required"))
        } else {
            Err(ServiceError::invalid(format!(
                "account_id: must be 1-64 characters of A-Z, a-z, 0-9, '_' or '-' (got {:?})",
                s.chars().take(80).collect::<String>()
            )))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for AccountId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A client-chosen key, 1–255 characters, scoped per account (R12).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    pub fn parse(s: &str) -> Result<Self, ServiceError> {
        if s.is_empty() {
            return Err(ServiceError::invalid("idempotency_key: is required"));
        }
        Ok(IdempotencyKey(bounded_text("idempotency_key", s, 255)?))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// R21: a one-line free-text field (`display_name`, `reference`, `holder_name`, keys…):
/// at most `max` characters, no NUL nor any other control character. Prost has already
/// refused invalid UTF-8, so this is the rest of the rule.
pub fn bounded_text(field: &str, s: &str, max: usize) -> Result<String, ServiceError> {
    checked_text(field, s, max, false, false)
}

/// R28 (R21 extended) for text shown to people (`display_name`, `holder_name`, a refund's
/// `reason`): like [`bounded_text`], and no bidirectional control or zero-width character
/// ([`is_invisible_format`]). Identifiers (`reference`, keys) stay [`bounded_text`].
pub fn display_text(field: &str, s: &str, max: usize) -> Result<String, ServiceError> {
    checked_text(field, s, max, false, true)
}

/// R21 for `description`: like [`bounded_text`], but tab, newline and carriage return are
/// allowed.
pub fn description_text(field: &str, s: &str, max: usize) -> Result<String, ServiceError> {
    checked_text(field, s, max, true, true)
}

/// Characters that change how text around them reads without showing themselves (R28):
/// bidirectional overrides, embeddings, isolates and marks (`"\u{202e}emca"` shows as
/// "acme"), zero-width spaces, the word joiner and byte-order mark, invisible operators,
/// soft hyphens, line/paragraph separators, tag characters, interlinear annotations and
/// blank fillers. The zero-width (non-)joiners U+200C/U+200D are not among them: Persian,
/// the Indic scripts and emoji sequences need them.
pub fn is_invisible_format(c: char) -> bool {
    matches!(c,
        '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}'
        | '\u{00AD}' | '\u{034F}' | '\u{115F}' | '\u{1160}' | '\u{17B4}' | '\u{17B5}'
        | '\u{180E}' | '\u{200B}' | '\u{2028}' | '\u{2029}' | '\u{2060}'..='\u{2064}'
        | '\u{3164}' | '\u{FEFF}' | '\u{FFA0}' | '\u{FFF9}'..='\u{FFFB}'
        | '\u{E0000}'..='\u{E007F}')
}

fn checked_text(
    field: &str,
    s: &str,
    max: usize,
    multiline: bool,
    display: bool,
) -> Result<String, ServiceError> {
    let allowed = |c: char| multiline && matches!(c, '\t' | '\n' | '\r');
    if let Some((at, c)) = s
        .chars()
        .enumerate()
        .find(|&(_, c)| (c.is_control() && !allowed(c)) || (display && is_invisible_format(c)))
    {
        let what = if c == '\0' {
            "NUL"
        } else if is_invisible_format(c) {
            "bidirectional-control or zero-width"
        } else {
            "control"
        };
        return Err(ServiceError::invalid(format!(
            "{field}: must not contain {what} characters (U+{:04X} at character {at})",
            c as u32
        )));
    }
    if s.chars().count() > max {
        return Err(ServiceError::invalid(format!(
            "{field}: at most {max} characters"
        )));
    }
    Ok(s.to_owned())
}

/// A database text column held a value the code does not know.
pub fn unknown_db_value(kind: &str, value: &str) -> ServiceError {
    ServiceError::internal(format!("unknown {kind} {value:?} in database"))
}

/// Declares an enum whose variants are spelled as in the contract, the database and
/// events, with `as_str` and `from_db`.
#[macro_export]
macro_rules! text_enum {
    ($(#[$m:meta])* $name:ident { $($variant:ident),+ $(,)? }) => {
        $(#[$m])*
        #[allow(non_camel_case_types)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name { $($variant),+ }

        impl $name {
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => stringify!($variant)),+ }
            }

            pub fn from_db(s: &str) -> Result<Self, $crate::error::ServiceError> {
                match s {
                    $(stringify!($variant) => Ok($name::$variant),)+
                    other => Err($crate::ids::unknown_db_value(stringify!($name), other)),
                }
            }
        }
    };
}

/// List RPC paging (docs/api.md): newest first, `page_size` default 50 and capped at 500, the
/// token an opaque cursor (the last row's sequence number).
pub mod paging {
    use crate::error::ServiceError;

    pub const DEFAULT_PAGE_SIZE: i64 = 50;
    pub const MAX_PAGE_SIZE: i64 = 500;

    pub fn page_size(v: i32) -> Result<i64, ServiceError> {
        match v {
            v if v < 0 => Err(ServiceError::invalid("page_size: must not be negative")),
            0 => Ok(DEFAULT_PAGE_SIZE),
            v => Ok((v as i64).min(MAX_PAGE_SIZE)),
        }
    }

    /// The exclusive upper bound of the sequence numbers to return.
    pub fn page_token(s: &str) -> Result<Option<i64>, ServiceError> {
        if s.is_empty() {
            return Ok(None);
        }
        s.parse::<i64>()
            .ok()
            .filter(|v| *v > 0)
            .map(Some)
            .ok_or_else(|| {
                ServiceError::invalid("page_token: not a token returned by a previous page")
            })
    }

    /// The token for the next page, empty when this page was the last.
    pub fn next_token(returned: usize, limit: i64, last_seq: Option<i64>) -> String {
        match last_seq {
            Some(seq) if returned as i64 == limit && seq > 1 => seq.to_string(),
            _ => String::new(),
        }
    }
}

/// A timestamp a caller sent, checked: `google.protobuf.Timestamp`'s own range (years 1 to
/// 9999) and `nanos` in 0 ..= 999,999,999, else INVALID_ARGUMENT naming the field; kept to
/// the microsecond (what PostgreSQL stores, so a repeated request compares equal).
pub fn timestamp_from_wire(
    field: &str,
    t: Option<&prost_types::Timestamp>,
) -> Result<Option<chrono::DateTime<chrono::Utc>>, ServiceError> {
    const MIN_SECONDS: i64 = -62_135_596_800; // 0001-01-01T00:00:00Z
    const MAX_SECONDS: i64 = 253_402_300_799; // 9999-12-31T23:59:59Z
    let Some(t) = t else { return Ok(None) };
    if !(MIN_SECONDS..=MAX_SECONDS).contains(&t.seconds) || !(0..1_000_000_000).contains(&t.nanos) {
        return Err(ServiceError::invalid(format!(
            "{field}: not a valid timestamp (years 1 to 9999, nanos 0 to 999999999)"
        )));
    }
    chrono::DateTime::from_timestamp(t.seconds, (t.nanos as u32 / 1_000) * 1_000)
        .map(Some)
        .ok_or_else(|| ServiceError::invalid(format!("{field}: not a valid timestamp")))
}

pub fn timestamp(t: chrono::DateTime<chrono::Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn account_ids_follow_the_contract() {
        assert!(AccountId::parse("acct_42-A").is_ok());
        assert!(AccountId::parse(&"a".repeat(64)).is_ok());
        for bad in ["", "has space", "ünï", "a/b", &"a".repeat(65)] {
            let e = AccountId::parse(bad).unwrap_err();
            assert!(e.to_string().starts_with("account_id:"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn text_fields_refuse_nul_and_control_characters_r21() {
        for bad in [
            "a\0b",
            "\u{1}",
            "x\u{7f}",
            "\u{85}",
            "tab\there",
            "new\nline",
        ] {
            let e = bounded_text("reference", bad, 255).unwrap_err();
            assert!(e.to_string().starts_with("reference:"), "{bad:?}: {e}");
        }
        assert!(description_text("description", "line 1\n\tline 2\r\n", 1024).is_ok());
        assert!(description_text("description", "nul\0", 1024).is_err());
        assert!(bounded_text("display_name", "Ünïcode ✓ 日本", 200).is_ok());
        assert!(bounded_text("display_name", &"é".repeat(200), 200).is_ok());
        assert!(bounded_text("display_name", &"é".repeat(201), 200).is_err());
        assert!(IdempotencyKey::parse("k\0").is_err());
    }

    #[test]
    fn text_fields_refuse_bidi_overrides_and_zero_width_characters_r28() {
        for bad in [
            "\u{202e}emca",
            "Acme\u{2066}Corp\u{2069}",
            "pay\u{200b}pal",
            "soft\u{00ad}hyphen",
            "line\u{2028}separator",
            "tag\u{e0041}",
            "\u{feff}bom",
            "rtl\u{200f}",
            "arabic mark \u{061c}",
        ] {
            for e in [
                display_text("display_name", bad, 200).unwrap_err(),
                description_text("description", bad, 1024).unwrap_err(),
            ] {
                assert!(
                    e.to_string()
                        .contains("bidirectional-control or zero-width"),
                    "{bad:?}: {e}"
                );
            }
        }
        // Right-to-left text itself is fine: only the invisible controls are refused.
        assert!(display_text("display_name", "شركة أكمي", 200).is_ok());
        assert!(display_text("display_name", "עברית", 200).is_ok());
        // Joiners are letters' business: Persian, Indic scripts, emoji sequences.
        assert!(display_text("display_name", "می\u{200c}خواهم", 200).is_ok());
        assert!(description_text("description", "👩\u{200d}💻 job", 1024).is_ok());
        // Identifiers are not display text: R21 alone.
        assert!(bounded_text("reference", "a\u{200d}b", 255).is_ok());
    }

    #[test]
    fn idempotency_keys_are_required_and_bounded() {
        assert!(IdempotencyKey::parse("k").is_ok());
        assert!(IdempotencyKey::parse("").is_err());
        assert!(IdempotencyKey::parse(&"k".repeat(256)).is_err());
    }
}
