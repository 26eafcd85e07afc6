//! Property tests over the public API of `credits-common`: the money parser of docs/api.md "Errors" and
//! R1/R22, the identifier rules of docs/api.md and R21, and list paging. Each property runs a
//! modest number of cases so the file finishes in a few seconds; a failure prints the
//! shrunk (minimal) input, which is the replay.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use credits_common::Money;
use credits_common::ids::paging::{
    DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, next_token, page_size, page_token,
};
use credits_common::ids::{AccountId, IdempotencyKey, bounded_text};
use proptest::prelude::*;
use rust_decimal::Decimal;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Strings that look like amounts, near misses included: signs, exponents, separators,
/// spaces, `NaN`/`inf` letters, non-ASCII digits, NUL.
fn amountish() -> impl Strategy<Value = String> {
    prop_oneof![
        "[0-9]{1,20}(\\.[0-9]{0,12})?",
        "[-+ ]?[0-9]{0,18}[.,]?[0-9]{0,11}[eE]?[-+]?[0-9]{0,3}",
        "[0-9.eEnaNifI+\\- ,\u{0}\u{661}\u{6f3}]{0,24}",
        any::<String>(),
    ]
}

/// Plain decimal spellings within the limits of R1: at most 15 integer digits and at most
/// 9 fractional digits.
fn plain_decimal() -> impl Strategy<Value = Decimal> {
    (0u64..1_000_000_000_000_000, 0u32..=9, any::<u64>()).prop_map(|(int, scale, frac)| {
        let frac = frac % 10u64.pow(scale);
        let mantissa = i128::from(int) * 10i128.pow(scale) + i128::from(frac);
        Decimal::from_i128_with_scale(mantissa, scale)
    })
}

/// The reference of docs/api.md: `^[A-Za-z0-9_-]{1,64}$`.
fn account_id_oracle(s: &str) -> bool {
    (1..=64).contains(&s.chars().count())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

proptest! {
    #![proptest_config(config())]

    /// docs/api.md "Errors": any amount string is answered with a value or a field-named error, never a
    /// panic.
    #[test]
    fn money_parsers_never_panic_on_any_string_spec4(s in amountish()) {
        let pos = Money::parse_positive("amount", &s);
        let non_neg = Money::parse_non_negative("threshold", &s);
        if let Err(e) = &pos {
            prop_assert_eq!(&e.field, "amount");
        }
        if let Err(e) = &non_neg {
            prop_assert_eq!(&e.field, "threshold");
        }
        // Positive is the stricter rule: whatever it accepts, non-negative accepts too.
        if let Ok(m) = pos {
            prop_assert_eq!(non_neg.clone().ok(), Some(m));
            prop_assert!(m.is_positive());
        }
    }

    /// §2: the wire form of any accepted amount has no exponent and parses back to the
    /// same amount.
    #[test]
    fn accepted_amounts_round_trip_through_the_wire_form_spec2(s in amountish()) {
        if let Ok(m) = Money::parse_non_negative("amount", &s) {
            let wire = m.to_wire();
            prop_assert!(!wire.contains(['e', 'E']), "exponent in {wire:?} (from {s:?})");
            prop_assert!(!wire.starts_with('-') && !wire.starts_with('+'), "{wire:?}");
            let back = Money::parse_non_negative("amount", &wire);
            prop_assert_eq!(back, Ok(m), "wire {:?} of {:?}", wire, s);
            prop_assert_eq!(m.to_wire(), Money::parse_non_negative("amount", &wire).unwrap().to_wire());
        }
    }

    /// R1: every decimal with at most 9 fractional digits and at most 15 integer digits,
    /// written plainly, is accepted as exactly that amount.
    #[test]
    fn every_plain_decimal_within_r1_limits_is_accepted_r1(d in plain_decimal()) {
        let s = d.to_string();
        let m = Money::parse_non_negative("amount", &s);
        prop_assert_eq!(m.clone().map(|m| m.as_decimal()), Ok(d), "{:?}", s);
        prop_assert_eq!(Money::parse_positive("amount", &s).is_ok(), !d.is_zero(), "{:?}", s);
        let wire = m.unwrap().to_wire();
        prop_assert_eq!(Money::parse_non_negative("amount", &wire).map(|m| m.as_decimal()), Ok(d));
    }

    /// R22: trailing zeros do not change an amount: "25.000" is "25.00", "40.010" is
    /// "40.01" — equal, same wire form, same whole-cents verdict, same rounding.
    #[test]
    fn trailing_zeros_spell_the_same_amount_r22(d in plain_decimal(), pad in 1usize..=9) {
        let trimmed = d.normalize().to_string();
        let frac_len = trimmed.split_once('.').map_or(0, |(_, f)| f.len());
        prop_assume!(frac_len < 9);
        let pad = pad.min(9 - frac_len);
        let padded = if frac_len == 0 {
            format!("{trimmed}.{}", "0".repeat(pad))
        } else {
            format!("{trimmed}{}", "0".repeat(pad))
        };
        let a = Money::parse_non_negative("amount", &trimmed).unwrap();
        let b = Money::parse_non_negative("amount", &padded);
        prop_assert_eq!(b.clone(), Ok(a), "{:?} vs {:?}", padded, trimmed);
        let b = b.unwrap();
        prop_assert_eq!(b.to_wire(), a.to_wire());
        prop_assert_eq!(b.is_whole_cents(), a.is_whole_cents());
        prop_assert_eq!(b.ceil_to_cents().to_wire(), a.ceil_to_cents().to_wire());
    }

    /// R22, "for storage alike": what a daemon hands to the database is `as_decimal()`,
    /// and PostgreSQL keeps a NUMERIC's scale (`scale('25.000') = 3`, which a whole-cents
    /// column refuses). So the padded and trimmed spellings must parse to the same decimal
    /// representation, not only to equal values.
    #[test]
    fn trailing_zeros_parse_to_the_same_stored_decimal_r22(d in plain_decimal(), pad in 1usize..=7) {
        let cents = d.round_dp(2);
        let two = format!("{:.2}", cents);
        let padded = format!("{two}{}", "0".repeat(pad));
        let a = Money::parse_non_negative("amount", &two).unwrap().as_decimal();
        let b = Money::parse_non_negative("amount", &padded).unwrap().as_decimal();
        prop_assert_eq!(
            (b.to_string(), b.scale()),
            (a.to_string(), a.scale()),
            "{:?} is stored as {} but {:?} as {}", padded, b, two, a
        );
    }

    /// §2: `account_id` is accepted exactly when it matches `^[A-Za-z0-9_-]{1,64}$`; a
    /// refusal names the field.
    #[test]
    fn account_ids_are_accepted_exactly_by_the_contract_pattern_spec2(
        s in prop_oneof![
            "[A-Za-z0-9_-]{1,64}",
            "[A-Za-z0-9_-]{60,70}",
            "[A-Za-z0-9_\\- ./é😀\u{0}\u{1}\u{7f}'\";]{0,66}",
            any::<String>(),
        ]
    ) {
        let got = AccountId::parse(&s);
        prop_assert_eq!(got.is_ok(), account_id_oracle(&s), "{:?}", s);
        match got {
            Ok(id) => prop_assert_eq!(id.as_str(), s.as_str()),
            Err(e) => prop_assert!(e.to_string().starts_with("account_id:"), "{}", e),
        }
    }

    /// R12/R21: any key is answered without a panic; an accepted key is 1–255 characters.
    #[test]
    fn idempotency_key_parse_never_panics_r12(
        s in prop_oneof![any::<String>(), "[a-z]{250,260}", "[\u{0}-\u{1f}a-z]{0,8}"]
    ) {
        if let Ok(k) = IdempotencyKey::parse(&s) {
            prop_assert_eq!(k.as_str(), s.as_str());
            prop_assert!((1..=255).contains(&s.chars().count()));
        }
    }

    /// R21: an idempotency key is a text field without NUL or any other control character
    /// (tab, newline and carriage return are allowed in `description` only).
    #[test]
    fn idempotency_keys_with_control_characters_are_refused_r21(
        head in "[a-z0-9]{0,10}",
        ctl in prop_oneof![Just('\u{0}'), Just('\t'), Just('\n'), Just('\r'), Just('\u{1}'), Just('\u{1b}'), Just('\u{7f}'), Just('\u{85}')],
        tail in "[a-z0-9]{0,10}",
    ) {
        let key = format!("{head}{ctl}{tail}");
        let got = IdempotencyKey::parse(&key);
        prop_assert!(got.is_err(), "{:?} was accepted", key);
        prop_assert!(got.unwrap_err().to_string().contains("idempotency_key"));
    }

    /// Text fields: any string, any limit, never a panic; within the limit it comes back
    /// unchanged.
    #[test]
    fn bounded_text_never_panics(s in any::<String>(), max in 0usize..64) {
        match bounded_text("description", &s, max) {
            Ok(t) => prop_assert_eq!(t, s),
            Err(e) => prop_assert!(e.to_string().starts_with("description:"), "{}", e),
        }
    }

    /// §2 paging: a page token from the wire never panics the parser; a non-token is
    /// refused naming `page_token`.
    #[test]
    fn page_token_never_panics_on_any_string_spec2(
        s in prop_oneof![any::<String>(), "-?[0-9]{0,25}", "[0-9 +\\-.eE]{0,12}"]
    ) {
        match page_token(&s) {
            Ok(None) => prop_assert!(s.is_empty()),
            Ok(Some(v)) => prop_assert!(v > 0),
            Err(e) => prop_assert!(e.to_string().starts_with("page_token:"), "{}", e),
        }
    }

    /// §2 paging: the token handed out for the next page is read back as the same cursor,
    /// and an empty token means "last page".
    #[test]
    fn next_page_token_round_trips_spec2(
        returned in 0usize..600,
        limit in prop_oneof![Just(DEFAULT_PAGE_SIZE), Just(MAX_PAGE_SIZE), 1i64..600],
        last_seq in prop::option::of(prop_oneof![any::<i64>(), 1i64..10_000]),
    ) {
        let tok = next_token(returned, limit, last_seq);
        match page_token(&tok) {
            Ok(None) => prop_assert!(tok.is_empty()),
            Ok(Some(cursor)) => {
                prop_assert_eq!(Some(cursor), last_seq);
                prop_assert_eq!(returned as i64, limit);
            }
            Err(e) => prop_assert!(false, "token {:?} it issued is refused: {}", tok, e),
        }
    }

    /// §2 paging: any `page_size` is answered without a panic; 0 means the default and
    /// the size is capped.
    #[test]
    fn page_size_never_panics_and_is_capped_spec2(v in any::<i32>()) {
        match page_size(v) {
            Ok(n) => {
                prop_assert!(v >= 0);
                prop_assert!((1..=MAX_PAGE_SIZE).contains(&n));
                if v == 0 {
                    prop_assert_eq!(n, DEFAULT_PAGE_SIZE);
                }
            }
            Err(e) => {
                prop_assert!(v < 0);
                prop_assert!(e.to_string().starts_with("page_size:"), "{}", e);
            }
        }
    }
}
