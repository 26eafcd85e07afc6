//! Money (R1): exact US-dollar amounts over `rust_decimal::Decimal`.
//!
//! Wire strings are parsed once, at the edge, by [`Money::parse_positive`] or
//! [`Money::parse_non_negative`]; everything inside the daemons handles `Money`. The rules
//! of docs/api.md "Errors" live here and only here: no exponent, no sign where a positive is required, no
//! `NaN`, at most 9 fractional digits, and a bounded magnitude so every value fits the
//! database and the sums of many of them cannot overflow. Rounding to cents happens in
//! [`Money::ceil_to_cents`] (a top-up never leaves the balance short) and
//! [`Money::floor_cents`] (an allowance is never overspent), and nowhere else.

use std::fmt;
use std::str::FromStr;

use rust_decimal::{Decimal, RoundingStrategy};

/// Most fractional digits a ledger amount may carry (R1: usage priced in fractions of a cent).
pub const MAX_SCALE: u32 = 9;
/// Most integer digits an input amount may carry: up to $999 trillion per posting.
pub const MAX_INTEGER_DIGITS: usize = 15;

/// An exact dollar amount. May be negative (a balance can be), but amounts parsed from
/// requests are never negative.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Money(Decimal);

/// Why a wire amount was refused; always names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct MoneyError {
    pub field: String,
    pub reason: String,
}

impl MoneyError {
    fn new(field: &str, reason: impl Into<String>) -> Self {
        Self {
            field: field.to_owned(),
            reason: reason.into(),
        }
    }
}

impl Money {
    pub const ZERO: Money = Money(Decimal::ZERO);

    pub fn new(d: Decimal) -> Self {
        Money(d)
    }

    pub fn as_decimal(&self) -> Decimal {
        self.0
    }

    /// Parses a wire amount that must be strictly positive (`amount` fields).
    pub fn parse_positive(field: &str, s: &str) -> Result<Money, MoneyError> {
        let m = Self::parse_non_negative(field, s)?;
        if m.0.is_zero() {
            return Err(MoneyError::new(field, "must be greater than zero"));
        }
        Ok(m)
    }

    /// Parses a wire amount that may be zero but not negative (thresholds, targets).
    pub fn parse_non_negative(field: &str, s: &str) -> Result<Money, MoneyError> {
        if s.is_empty() {
            return Err(MoneyError::new(
                field,
                "is required (a decimal string such as \"12.50\")",
            ));
        }
        if s.starts_with('-') {
            return Err(MoneyError::new(
                field,
                format!("must not be negative (got {s:?})"),
            ));
        }
        let (int, frac) = match s.split_once('.') {
            Some((i, f)) => (i, Some(f)),
            None => (s, None),
        };
        let all_digits = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
        if !all_digits(int) || frac.is_some_and(|f| !all_digits(f)) {
            let lower = s.to_ascii_lowercase();
            let reason = if lower.contains("nan") || lower.contains("inf") {
                format!("must be a finite decimal (got {s:?})")
            } else if lower.contains('e') {
                format!("exponent form is not accepted; write plain digits (got {s:?})")
            } else {
                format!("must be a plain decimal string such as \"12.50\" (got {s:?})")
            };
            return Err(MoneyError::new(field, reason));
        }
        let frac_len = frac.map_or(0, str::len);
        if frac_len > MAX_SCALE as usize {
            return Err(MoneyError::new(
                field,
                format!("at most {MAX_SCALE} fractional digits are allowed (got {s:?})"),
            ));
        }
        if int.trim_start_matches('0').len() > MAX_INTEGER_DIGITS {
            return Err(MoneyError::new(
                field,
                format!("out of range: at most {MAX_INTEGER_DIGITS} integer digits (got {s:?})"),
            ));
        }
        let d = Decimal::from_str_exact(s)
            .map_err(|e| MoneyError::new(field, format!("not a valid decimal ({e})")))?;
        // R22: "25.000" is the amount "25.00": trailing zeros carry no meaning, so they are
        // dropped here, once, and storage and idempotency comparisons see one spelling.
        Ok(Money(d.normalize()))
    }

    /// Parses a signed amount from a trusted peer (a balance another service returned).
    pub fn parse_signed(field: &str, s: &str) -> Result<Money, MoneyError> {
        match s.strip_prefix('-') {
            Some(abs) => Ok(Money::ZERO - Self::parse_non_negative(field, abs)?),
            None => Self::parse_non_negative(field, s),
        }
    }

    /// Whether the amount is a whole number of cents (card and bank charges, R1).
    pub fn is_whole_cents(&self) -> bool {
        self.0.normalize().scale() <= 2
    }

    /// Rounds up to the next whole cent (R8: a top-up never leaves the balance short).
    pub fn ceil_to_cents(&self) -> Money {
        Money(
            self.0
                .round_dp_with_strategy(2, RoundingStrategy::ToPositiveInfinity),
        )
    }

    /// Rounds down to a whole cent (R19: what is left of a monthly allowance).
    pub fn floor_cents(&self) -> Money {
        Money(
            self.0
                .round_dp_with_strategy(2, RoundingStrategy::ToNegativeInfinity),
        )
    }

    pub fn is_positive(&self) -> bool {
        self.0 > Decimal::ZERO
    }

    /// The canonical wire form: no exponent, trailing zeros trimmed but at least two
    /// fractional digits ("12.50", "0.000125", "-3.00").
    pub fn to_wire(&self) -> String {
        let mut d = self.0.normalize();
        if d.scale() < 2 {
            d.rescale(2);
        }
        d.to_string()
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_wire())
    }
}

impl FromStr for Money {
    type Err = MoneyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse_non_negative("amount", s)
    }
}

/// In JSON (events) money is its canonical wire string, never a JSON number: a number would
/// go through `f64` in most consumers' parsers.
impl serde::Serialize for Money {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_wire())
    }
}

/// Read from a trusted peer's JSON: signed (a balance can be negative), R1's spelling rules.
impl<'de> serde::Deserialize<'de> for Money {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Money::parse_signed("amount", &s).map_err(serde::de::Error::custom)
    }
}

impl From<Decimal> for Money {
    fn from(d: Decimal) -> Self {
        Money(d)
    }
}

impl std::ops::Add for Money {
    type Output = Money;
    fn add(self, rhs: Money) -> Money {
        Money(self.0 + rhs.0)
    }
}

impl std::ops::Sub for Money {
    type Output = Money;
    fn sub(self, rhs: Money) -> Money {
        Money(self.0 - rhs.0)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn pos(s: &str) -> Result<Money, MoneyError> {
        Money::parse_positive("amount", s)
    }

    #[test]
    fn accepts_plain_decimals_r1() {
        assert_eq!(pos("12.50").unwrap().to_wire(), "12.50");
        assert_eq!(pos("0.000125").unwrap().to_wire(), "0.000125");
        assert_eq!(pos("5").unwrap().to_wire(), "5.00");
        assert_eq!(pos("0.000000001").unwrap().to_wire(), "0.000000001");
        assert_eq!(
            pos("999999999999999.999999999").unwrap().to_wire(),
            "999999999999999.999999999"
        );
    }

    #[test]
    fn rejects_every_bad_form_of_spec_section_4() {
        // Why each is refused, then the spellings.
        let refused: &[(&str, &[&str])] = &[
            ("empty", &[""]),
            ("not positive", &["-1", "-0.01", "0", "0.000"]),
            (
                "not a decimal",
                &["NaN", "nan", "inf", "0x10", "1.2.3", "١٢", "1,5"],
            ),
            ("an exponent", &["1e3", "1E-2"]),
            ("more than 9 fractional digits", &["1.0000000001"]),
            ("a sign or spaces", &["+5", " 5", "5 "]),
            ("a bare point", &[".5", "5."]),
            ("beyond the largest amount", &["9999999999999999"]),
        ];
        for (why, spellings) in refused {
            for bad in *spellings {
                let err = pos(bad).unwrap_err();
                assert_eq!(err.field, "amount", "{bad:?} ({why})");
            }
        }
    }

    #[test]
    fn error_names_field_and_reason() {
        let e = Money::parse_positive("threshold", "1e5").unwrap_err();
        assert!(e.to_string().starts_with("threshold: exponent"), "{e}");
        let e = Money::parse_positive("amount", "1.1234567891").unwrap_err();
        assert!(e.to_string().contains("9 fractional digits"), "{e}");
    }

    #[test]
    fn zero_is_a_valid_threshold() {
        assert_eq!(
            Money::parse_non_negative("threshold", "0").unwrap(),
            Money::ZERO
        );
    }

    #[test]
    fn rounds_up_to_the_cent_r8() {
        let m = pos("40.001").unwrap().ceil_to_cents();
        assert_eq!(m.to_wire(), "40.01");
        assert_eq!(pos("40.01").unwrap().ceil_to_cents().to_wire(), "40.01");
        assert!(pos("40.01").unwrap().is_whole_cents());
        assert!(pos("40.010").unwrap().is_whole_cents());
        assert!(!pos("40.011").unwrap().is_whole_cents());
    }

    #[test]
    fn trailing_zeros_spell_the_same_amount_r22() {
        for (spelled, canonical) in [
            ("25.000", "25.00"),
            ("40.010", "40.01"),
            ("5.000000000", "5"),
        ] {
            let a = pos(spelled).unwrap();
            let b = pos(canonical).unwrap();
            assert_eq!(a, b);
            assert_eq!(a.as_decimal().scale(), b.as_decimal().scale(), "{spelled}");
            assert_eq!(a.to_wire(), b.to_wire());
        }
        assert_eq!(pos("40.010").unwrap().as_decimal().scale(), 2);
    }

    #[test]
    fn negative_balances_print_with_sign() {
        assert_eq!((Money::ZERO - pos("3").unwrap()).to_wire(), "-3.00");
    }
}
