//! R30 on the billing page: the last 30 days of usage as a chart by category (an inline SVG
//! drawn here, no script), and the forecast of when the available balance reaches the
//! auto-recharge threshold (or zero). Pure functions of their inputs and a clock, so the
//! arithmetic is tested on a fixed one.

use std::fmt::Write;

use chrono::{DateTime, Datelike, Duration, NaiveDate, TimeZone, Utc};
use credits_client::{Money, UsageCategory, UsagePeriod};
use rust_decimal::Decimal;

use crate::page::{dollars, esc};

/// Days the chart shows, today (UTC) the last.
pub const CHART_DAYS: i64 = 30;
/// Days the forecast averages.
pub const AVERAGE_DAYS: i64 = 7;
/// Past this the forecast says only that the balance lasts longer.
const HORIZON_DAYS: i64 = 365;

/// The start of the chart's first day and the end of its last (today, UTC).
pub fn chart_range(now: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
    let today = Utc.from_utc_datetime(&now.date_naive().and_hms_opt(0, 0, 0).unwrap_or_default());
    let end = today + Duration::days(1);
    (end - Duration::days(CHART_DAYS), end)
}

/// The forecast's window: the last 7 × 24 hours up to the end of the current hour (usage is
/// kept by the hour), as one period.
pub fn average_range(now: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
    let end =
        DateTime::from_timestamp((now.timestamp().div_euclid(3600) + 1) * 3600, 0).unwrap_or(now);
    (end - Duration::days(AVERAGE_DAYS), end)
}

/// What the available balance is heading for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// Auto-recharge is on: its threshold, where a top-up starts.
    Threshold(Money),
    /// No auto-recharge: zero, where API access stops.
    Zero,
}

impl Level {
    fn amount(self) -> Decimal {
        match self {
            Level::Threshold(m) => m.as_decimal(),
            Level::Zero => Decimal::ZERO,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Forecast {
    /// No usage in the last 7 days: nothing to extrapolate.
    NoUsage,
    /// The available balance is already below the level.
    Below { level: Level },
    /// At `per_day`, the level is reached on `date` (UTC).
    Reaches {
        per_day: Money,
        level: Level,
        date: NaiveDate,
    },
    /// At `per_day`, not within a year.
    Beyond { per_day: Money, level: Level },
}

/// R30: at the average daily usage of the last 7 days (`last_7_days` / 7), the date the
/// available balance falls to `level`: now + (available − level) / per day.
pub fn forecast(
    now: DateTime<Utc>,
    available: Money,
    level: Level,
    last_7_days: Money,
) -> Forecast {
    let used = last_7_days.as_decimal();
    if used <= Decimal::ZERO {
        return Forecast::NoUsage;
    }
    let headroom = available.as_decimal() - level.amount();
    // Below the threshold, or at zero without one (access has stopped already).
    if headroom < Decimal::ZERO || (level == Level::Zero && headroom.is_zero()) {
        return Forecast::Below { level };
    }
    let per_day = used / Decimal::from(AVERAGE_DAYS);
    let days = headroom / per_day;
    if days > Decimal::from(HORIZON_DAYS) {
        return Forecast::Beyond {
            per_day: Money::new(per_day),
            level,
        };
    }
    // Whole seconds from now (days ≤ a year: no overflow).
    let secs = (days * Decimal::from(86_400)).trunc();
    let secs = i64::try_from(secs).unwrap_or(HORIZON_DAYS * 86_400);
    Forecast::Reaches {
        per_day: Money::new(per_day),
        level,
        date: (now + Duration::seconds(secs)).date_naive(),
    }
}

/// A daily rate to read: to the cent, or to six places below a cent a day.
fn rate(m: Money) -> String {
    let d = m.as_decimal();
    let shown = if d >= Decimal::new(1, 2) {
        d.round_dp(2)
    } else {
        d.round_dp(6).normalize()
    };
    dollars(&Money::new(shown))
}

fn level_text(level: Level) -> String {
    match level {
        Level::Threshold(t) => format!("your {} auto-recharge threshold", dollars(&t)),
        Level::Zero => "$0.00, when API access stops".to_owned(),
    }
}

/// `Dec 14`, or `Jan 3, 2028` outside `now`'s year.
fn day(date: NaiveDate, now: DateTime<Utc>) -> String {
    if date.year() == now.year() {
        date.format("%b %-d").to_string()
    } else {
        date.format("%b %-d, %Y").to_string()
    }
}

/// The forecast as the page says it (plain text; the caller escapes).
pub fn forecast_text(f: &Forecast, now: DateTime<Utc>) -> String {
    match f {
        Forecast::NoUsage => {
            "No usage in the last 7 days, so there is nothing to forecast yet.".to_owned()
        }
        Forecast::Below { level } => match level {
            Level::Threshold(t) => format!(
                "Your available balance is below your {} auto-recharge threshold.",
                dollars(t)
            ),
            Level::Zero => "Your available balance is at or below $0.00.".to_owned(),
        },
        Forecast::Reaches {
            per_day,
            level,
            date,
        } => format!(
            "At your average usage of the last 7 days, {}/day, your available balance reaches {} around {}.",
            rate(*per_day),
            level_text(*level),
            day(*date, now)
        ),
        Forecast::Beyond { per_day, level } => format!(
            "At your average usage of the last 7 days, {}/day, your available balance stays above {} for more than a year.",
            rate(*per_day),
            level_text(*level)
        ),
    }
}

/// Each category's colour in the chart and its legend (distinct in greyscale too).
fn colour(c: UsageCategory) -> &'static str {
    match c {
        UsageCategory::ApiRequests => "#1f5fad",
        UsageCategory::DedicatedEndpoints => "#e07b00",
        UsageCategory::FineTuning => "#2a9d5b",
        UsageCategory::Evaluations => "#a23b72",
        UsageCategory::Other => "#7a7a7a",
    }
}

fn label(c: UsageCategory) -> &'static str {
    match c {
        UsageCategory::ApiRequests => "API requests",
        UsageCategory::DedicatedEndpoints => "Dedicated endpoints",
        UsageCategory::FineTuning => "Fine-tuning",
        UsageCategory::Evaluations => "Evaluations",
        UsageCategory::Other => "Other",
    }
}

/// A round number at or above `max` for the chart's top (1, 2 or 5 × a power of ten).
fn nice_ceiling(max: Decimal) -> Decimal {
    if max <= Decimal::ZERO {
        return Decimal::ONE;
    }
    let mut step = Decimal::new(1, 6);
    loop {
        for m in [1, 2, 5] {
            let c = step * Decimal::from(m);
            if c >= max {
                return c;
            }
        }
        step *= Decimal::TEN;
    }
}

const WIDTH: u32 = 720;
const HEIGHT: u32 = 240;
const LEFT: u32 = 64;
const BOTTOM: u32 = 28;
const TOP: u32 = 12;

/// The chart: one bar per day from `first_day` (CHART_DAYS of them), stacked by category,
/// with the day's total in each bar's tooltip, a y axis in dollars and a day label every
/// five days; then the legend with each category's total over the days shown.
pub fn chart(periods: &[UsagePeriod], first_day: DateTime<Utc>) -> String {
    let days = CHART_DAYS as usize;
    let mut by_day = vec![[Decimal::ZERO; 5]; days];
    let mut totals = [Decimal::ZERO; 5];
    for p in periods {
        let d = (p.start - first_day).num_days();
        let Some(row) = usize::try_from(d).ok().and_then(|d| by_day.get_mut(d)) else {
            continue;
        };
        let i = UsageCategory::ALL
            .iter()
            .position(|c| *c == p.category)
            .unwrap_or(4);
        row[i] += p.amount.as_decimal();
        totals[i] += p.amount.as_decimal();
    }
    let max = by_day
        .iter()
        .map(|r| r.iter().copied().sum::<Decimal>())
        .max()
        .unwrap_or_default();
    let top = nice_ceiling(max);
    let plot_h = Decimal::from(HEIGHT - TOP - BOTTOM);
    let slot = (WIDTH - LEFT) / days as u32;
    let mut s = String::new();
    let _ = write!(
        s,
        "<svg id=\"usage-chart\" xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {WIDTH} {HEIGHT}\" \
         width=\"100%\" role=\"img\" aria-labelledby=\"usage-chart-title\">\
         <title id=\"usage-chart-title\">Usage per day, last {days} days, by category</title>"
    );
    // Axis, top and middle gridlines with their amounts.
    for (frac, text) in [
        (Decimal::ONE, dollars(&Money::new(top))),
        (Decimal::new(5, 1), dollars(&Money::new(top / Decimal::TWO))),
        (Decimal::ZERO, "$0".to_owned()),
    ] {
        let y = Decimal::from(TOP) + plot_h * (Decimal::ONE - frac);
        let _ = write!(
            s,
            "<line x1=\"{LEFT}\" x2=\"{WIDTH}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#d0d0d0\"/>\
             <text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\" font-size=\"11\" fill=\"#444\">{}</text>",
            LEFT - 6,
            y + Decimal::from(4),
            esc(&text)
        );
    }
    for (d, row) in by_day.iter().enumerate() {
        let x = LEFT + d as u32 * slot + 2;
        let date = first_day + Duration::days(d as i64);
        let total: Decimal = row.iter().copied().sum();
        let mut y = Decimal::from(HEIGHT - BOTTOM);
        let _ = write!(
            s,
            "<g><title>{}: {}</title>",
            date.format("%b %-d"),
            esc(&dollars(&Money::new(total)))
        );
        for (i, amount) in row.iter().enumerate() {
            if amount.is_zero() {
                continue;
            }
            let h = (plot_h * amount / top).max(Decimal::new(5, 1));
            y -= h;
            let _ = write!(
                s,
                "<rect x=\"{x}\" y=\"{y:.1}\" width=\"{}\" height=\"{h:.1}\" fill=\"{}\"/>",
                slot - 4,
                colour(UsageCategory::ALL[i])
            );
        }
        s.push_str("</g>");
        if d % 5 == 0 || d == days - 1 {
            let _ = write!(
                s,
                "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" font-size=\"11\" fill=\"#444\">{}</text>",
                x + (slot - 4) / 2,
                HEIGHT - 8,
                date.format("%b %-d")
            );
        }
    }
    s.push_str("</svg><ul class=\"legend\" id=\"usage-legend\">");
    for (i, c) in UsageCategory::ALL.iter().enumerate() {
        let _ = write!(
            s,
            "<li><svg width=\"12\" height=\"12\" aria-hidden=\"true\"><rect width=\"12\" height=\"12\" fill=\"{}\"/></svg> \
             {} <span class=\"num\">{}</span></li>",
            colour(*c),
            esc(label(*c)),
            esc(&dollars(&Money::new(totals[i])))
        );
    }
    s.push_str("</ul>");
    s
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn m(s: &str) -> Money {
        Money::parse_signed("x", s).unwrap()
    }

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    /// The issue's own example, on a fixed clock: $3.00/day for 7 days ($21.00), $40.00
    /// available, a $10.00 threshold: 10 days of headroom → Dec 14.
    #[test]
    fn the_forecast_divides_the_headroom_by_the_seven_day_average_r30() {
        let now = at("2026-12-04T09:30:00Z");
        let f = forecast(now, m("40"), Level::Threshold(m("10")), m("21"));
        assert_eq!(
            f,
            Forecast::Reaches {
                per_day: m("3"),
                level: Level::Threshold(m("10")),
                date: NaiveDate::from_ymd_opt(2026, 12, 14).unwrap(),
            }
        );
        assert_eq!(
            forecast_text(&f, now),
            "At your average usage of the last 7 days, $3.00/day, your available balance reaches your $10.00 auto-recharge threshold around Dec 14."
        );
    }

    #[test]
    fn the_forecast_counts_fractions_of_a_day_and_crosses_midnight_r30() {
        // $7.00 over 7 days = $1.00/day; $2.50 above zero = 2.5 days from 20:00 on Dec 4
        // → 08:00 on Dec 7.
        let now = at("2026-12-04T20:00:00Z");
        let f = forecast(now, m("2.50"), Level::Zero, m("7"));
        let Forecast::Reaches { date, .. } = f else {
            panic!("{f:?}")
        };
        assert_eq!(date, NaiveDate::from_ymd_opt(2026, 12, 7).unwrap());
        assert!(
            forecast_text(&f, now).ends_with("reaches $0.00, when API access stops around Dec 7.")
        );
        // Into the next year, the year is named.
        let f = forecast(now, m("40"), Level::Zero, m("7"));
        assert_eq!(
            forecast_text(&f, now),
            "At your average usage of the last 7 days, $1.00/day, your available balance reaches $0.00, when API access stops around Jan 13, 2027."
        );
    }

    #[test]
    fn no_usage_below_the_level_and_past_a_year_are_said_plainly_r30() {
        let now = at("2026-12-04T00:00:00Z");
        assert_eq!(
            forecast(now, m("40"), Level::Zero, m("0")),
            Forecast::NoUsage
        );
        assert_eq!(
            forecast(now, m("5"), Level::Threshold(m("10")), m("7")),
            Forecast::Below {
                level: Level::Threshold(m("10"))
            }
        );
        // Exactly at the threshold is not below it: reached now.
        assert!(matches!(
            forecast(now, m("10"), Level::Threshold(m("10")), m("7")),
            Forecast::Reaches { date, .. } if date == now.date_naive()
        ));
        // At zero without auto-recharge, access has stopped: below, not "reached today".
        assert_eq!(
            forecast(now, m("0"), Level::Zero, m("7")),
            Forecast::Below { level: Level::Zero }
        );
        let f = forecast(now, m("1000"), Level::Zero, m("0.07"));
        assert!(matches!(f, Forecast::Beyond { .. }), "{f:?}");
        assert!(forecast_text(&f, now).contains("$0.01/day"));
        assert!(forecast_text(&f, now).contains("more than a year"));
        // A tiny rate is shown to the millionth, not as $0.00.
        let f = forecast(now, m("1"), Level::Zero, m("0.0007"));
        assert!(
            forecast_text(&f, now).contains("$0.0001/day"),
            "{}",
            forecast_text(&f, now)
        );
    }

    #[test]
    fn the_windows_end_with_today_and_the_current_hour() {
        let now = at("2026-12-04T09:30:00Z");
        assert_eq!(
            chart_range(now),
            (at("2026-11-05T00:00:00Z"), at("2026-12-05T00:00:00Z"))
        );
        assert_eq!(
            average_range(now),
            (at("2026-11-27T10:00:00Z"), at("2026-12-04T10:00:00Z"))
        );
    }

    #[test]
    fn the_chart_stacks_each_day_by_category_and_totals_the_legend() {
        let first = at("2026-11-05T00:00:00Z");
        let p = |day: i64, c, a: &str| UsagePeriod {
            start: first + Duration::days(day),
            category: c,
            amount: m(a),
            count: 1,
        };
        let svg = chart(
            &[
                p(0, UsageCategory::ApiRequests, "3"),
                p(0, UsageCategory::FineTuning, "1.5"),
                p(29, UsageCategory::ApiRequests, "2"),
                // Outside the 30 days: ignored.
                p(30, UsageCategory::Other, "100"),
            ],
            first,
        );
        assert_eq!(svg.matches("<rect x=").count(), 3, "{svg}");
        assert!(svg.contains("<title>Nov 5: $4.50</title>"), "{svg}");
        assert!(svg.contains("<title>Dec 4: $2.00</title>"), "{svg}");
        // The top of the axis is a round number above the largest day.
        assert!(svg.contains(">$5.00</text>"), "{svg}");
        assert!(
            svg.contains("API requests <span class=\"num\">$5.00</span>"),
            "{svg}"
        );
        assert!(
            svg.contains("Fine-tuning <span class=\"num\">$1.50</span>"),
            "{svg}"
        );
        assert!(
            svg.contains("Other <span class=\"num\">$0.00</span>"),
            "{svg}"
        );
        assert_eq!(nice_ceiling(Decimal::new(45, 1)), Decimal::from(5));
        assert_eq!(nice_ceiling(Decimal::new(11, 0)), Decimal::from(20));
        assert_eq!(nice_ceiling(Decimal::ZERO), Decimal::ONE);
    }
}
