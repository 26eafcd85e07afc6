//! The billing settings page, rendered on the server as one HTML document.
//!
//! Every value that comes from a service or a form goes through [`esc`] before it is
//! written; the only unescaped text is this file's own markup. The page needs no script
//! (the auto-recharge form opens with `<details>`), loads nothing but its own stylesheet,
//! and labels every control with the words the seed product uses.

use std::collections::HashMap;
use std::fmt::Write;

use credits_client::{
    Access, Account, AttemptStatus, AutoRecharge, BillingMode, Charge, ChargeStatus, CreditSource,
    DisabledReason, Entry, EntryKind, Grant, Money, Page, PaymentMethod, PaymentMethodType,
    RechargeAttempt, UsagePeriod,
};

use crate::usage;

/// HTML-escapes text for element content and quoted attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `$25.00`, `-$1.01`, `$0.000125`.
pub fn dollars(m: &Money) -> String {
    let s = m.to_string();
    match s.strip_prefix('-') {
        Some(abs) => format!("-${abs}"),
        None => format!("${s}"),
    }
}

/// Which form a problem or a kept value belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Form {
    Credits,
    Card,
    Bank,
    Methods,
    AutoRecharge,
    /// R25: a payment to confirm.
    Charges,
}

/// A refused submission, shown next to the field it concerns (or atop its form).
#[derive(Clone, Debug)]
pub struct Problem {
    pub form: Form,
    pub field: Option<&'static str>,
    pub message: String,
}

/// Everything the page shows.
pub struct View {
    /// The clock the page was rendered at (the forecast counts from it).
    pub now: chrono::DateTime<chrono::Utc>,
    /// R30: the chart and the forecast (`None`: the ledger could not answer them now).
    pub usage: Option<Usage>,
    pub account: Account,
    pub methods: Vec<PaymentMethod>,
    pub recharge: AutoRecharge,
    pub entries: Page<Entry>,
    pub charges: Page<Charge>,
    pub attempts: Page<RechargeAttempt>,
    pub min_purchase: Money,
    pub csrf: String,
    /// A fresh idempotency key for the Add credits form (a double submit buys once).
    pub purchase_key: String,
    pub notice: Option<&'static str>,
    pub problem: Option<Problem>,
    /// What the customer typed into the form that failed (never card or account numbers).
    pub kept: HashMap<&'static str, String>,
    /// R24: with Stripe, what the card form needs (`Err`: it could not be had now).
    pub stripe: Option<Result<StripeCard, ()>>,
}

/// R30: what the chart and the forecast are drawn from.
pub struct Usage {
    /// The chart's days, from `from`, by category.
    pub days: Vec<UsagePeriod>,
    pub from: chrono::DateTime<chrono::Utc>,
    /// Usage in the last 7 × 24 hours (the forecast's average × 7).
    pub last_7_days: Money,
}

/// What the page's Stripe.js card form needs.
#[derive(Clone, Debug)]
pub struct StripeCard {
    pub js_url: String,
    pub client_secret: String,
    pub publishable_key: String,
}

/// A whole page with a title and one message (sign-in problems, errors).
pub fn message_page(title: &str, text: &str) -> String {
    let mut h = head(title);
    let _ = write!(
        h,
        "<main><h1>{}</h1><p role=\"alert\">{}</p></main></body></html>",
        esc(title),
        esc(text)
    );
    h
}

/// R28: a link for another account opened while a session is open asks before switching.
/// The form carries the link and the open session's CSRF token, so another site cannot
/// make the switch for the customer.
pub fn switch_page(current: &str, next: &str, token: &str, csrf: &str) -> String {
    let mut h = head("Switch account?");
    let _ = write!(
        h,
        "<main><h1>Switch account?</h1><p role=\"alert\">You are signed in to the billing settings of \
         <strong>{cur}</strong>. This link opens the billing settings of <strong>{next}</strong>, \
         and signs you out of {cur}.</p>\
         <form method=\"post\" action=\"/session\"><input type=\"hidden\" name=\"token\" value=\"{token}\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
         <button type=\"submit\" id=\"switch\">Open {next}</button></form>\
         <p><a id=\"stay\" href=\"/billing\">Stay on {cur}</a></p></main></body></html>",
        cur = esc(current),
        next = esc(next),
        token = esc(token),
        csrf = esc(csrf),
    );
    h
}

/// The page a session link answers: it sets the cookie and moves on to `to` by itself
/// (a meta refresh, no script) or by its link.
pub fn continue_page(to: &str) -> String {
    let mut h = head("Billing settings");
    let _ = write!(
        h,
        "<main><h1>Billing settings</h1><p><a id=\"continue\" href=\"{0}\">Continue to your billing settings</a></p></main></body></html>",
        esc(to)
    );
    h.replacen(
        "<title>",
        &format!(
            "<meta http-equiv=\"refresh\" content=\"0;url={}\"><title>",
            esc(to)
        ),
        1,
    )
}

fn head(title: &str) -> String {
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{}</title><link rel=\"stylesheet\" href=\"/assets/portal.css\"></head><body>",
        esc(title)
    )
}

pub fn render(v: &View) -> String {
    let mut h = head("Billing settings");
    let a = &v.account;
    let name = if a.display_name.is_empty() {
        a.account_id.as_str()
    } else {
        a.display_name.as_str()
    };
    let _ = write!(
        h,
        "<header><h1>Billing settings</h1><p class=\"who\"><span id=\"display-name\">{}</span> \
         <span class=\"muted\">({})</span></p>\
         <form method=\"post\" action=\"/billing/sign-out\" class=\"sign-out\">",
        esc(name),
        esc(a.account_id.as_str())
    );
    hidden_csrf(&mut h, v);
    h.push_str("<button type=\"submit\" id=\"sign-out\">Sign out</button></form></header><main>");
    if let Some(n) = v.notice {
        let _ = write!(h, "<p class=\"notice\" role=\"status\">{}</p>", esc(n));
    }
    balance(&mut h, v);
    grants(&mut h, v);
    usage_section(&mut h, v);
    payments_to_confirm(&mut h, v);
    add_credits(&mut h, v);
    methods(&mut h, v);
    auto_recharge(&mut h, v);
    history(&mut h, v);
    h.push_str("</main>");
    scripts(&mut h, v);
    h.push_str("</body></html>");
    h
}

fn balance(h: &mut String, v: &View) {
    let a = &v.account;
    let access = match a.access {
        Access::Active => "Active: API access is on",
        Access::Suspended => "Suspended: API access is off until credits are added",
        Access::PendingFirstPurchase => {
            "Waiting for your first purchase: add credits to turn API access on"
        }
    };
    let _ = write!(
        h,
        "<section aria-labelledby=\"balance-h\"><h2 id=\"balance-h\">Credit balance</h2><dl class=\"figures\">\
         <dt>Balance</dt><dd id=\"balance\">{}</dd>\
         <dt>Reserved by running jobs</dt><dd id=\"held\">{}</dd>\
         <dt>Available balance</dt><dd id=\"available\">{}</dd>\
         <dt>Access</dt><dd id=\"access\">{}</dd></dl></section>",
        esc(&dollars(&a.balance)),
        esc(&dollars(&a.held)),
        esc(&dollars(&a.available_balance)),
        esc(access),
    );
}

/// R29: the grants and expiring purchased credits that make up the balance, in the order
/// usage draws them.
fn grants(h: &mut String, v: &View) {
    let a = &v.account;
    if a.grants.is_empty() && a.expiring_purchases.is_empty() {
        return;
    }
    h.push_str(
        "<section aria-labelledby=\"grants-h\"><h2 id=\"grants-h\">Credit grants and expiring credits</h2>\
         <p class=\"hint\">Usage is drawn from grants first, then from purchased credits; within each, \
         from what expires soonest. What is left when credits expire is removed from your balance.</p>\
         <table id=\"grants\"><thead><tr><th>Credits</th><th>Left</th><th>Of</th><th>Expires</th></tr></thead><tbody>",
    );
    for g in a.grants.iter().chain(&a.expiring_purchases) {
        let what = match g.source {
            CreditSource::Grant if !g.reason.is_empty() => format!("Grant: {}", g.reason),
            CreditSource::Grant => "Grant".to_owned(),
            CreditSource::AutoRecharge => "Auto-recharge top-up".to_owned(),
            _ => "Purchased credits".to_owned(),
        };
        let _ = write!(
            h,
            "<tr><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td>{}</td></tr>",
            esc(&what),
            esc(&dollars(&g.remaining)),
            esc(&dollars(&g.amount)),
            esc(&expiry(g)),
        );
    }
    h.push_str("</tbody></table></section>");
}

fn expiry(g: &Grant) -> String {
    g.expires_at
        .as_ref()
        .map(when)
        .unwrap_or_else(|| "never".to_owned())
}

/// R30: the last 30 days by category and the forecast.
fn usage_section(h: &mut String, v: &View) {
    h.push_str("<section aria-labelledby=\"usage-h\"><h2 id=\"usage-h\">Usage, last 30 days</h2>");
    let Some(u) = &v.usage else {
        h.push_str(
            "<p id=\"forecast\">Usage cannot be shown right now; reload the page in a moment.</p></section>",
        );
        return;
    };
    let forecast = if v.account.billing_mode == BillingMode::Contract {
        // R5: a contract account is invoiced; its access never stops for its balance.
        "Your usage is invoiced under your contract; API access does not stop at a zero balance."
            .to_owned()
    } else {
        let level = match (v.recharge.enabled, v.recharge.threshold) {
            (true, Some(t)) => usage::Level::Threshold(t),
            _ => usage::Level::Zero,
        };
        let f = usage::forecast(v.now, v.account.available_balance, level, u.last_7_days);
        usage::forecast_text(&f, v.now)
    };
    let _ = write!(
        h,
        "<p id=\"forecast\">{}</p><figure class=\"chart\">{}\
         <figcaption>Usage per day (UTC) by category; the totals are for the 30 days shown.</figcaption></figure></section>",
        esc(&forecast),
        usage::chart(&u.days, u.from),
    );
}

/// A receipt for one paid charge, printable (the stylesheet drops everything else when
/// printed).
pub fn receipt_page(account: &Account, c: &Charge, method: Option<&PaymentMethod>) -> String {
    let mut h = head(&format!("Receipt {}", c.charge_id));
    let paid_with = match (c.payment_method_type, method) {
        (_, Some(m)) => method_name(m),
        (PaymentMethodType::Card, None) => "Card".to_owned(),
        (PaymentMethodType::UsBankAccount, None) => "US bank account".to_owned(),
    };
    let name = if account.display_name.is_empty() {
        account.account_id.as_str().to_owned()
    } else {
        format!("{} ({})", account.display_name, account.account_id.as_str())
    };
    let what = if c.description.is_empty() {
        "Credits".to_owned()
    } else {
        c.description.clone()
    };
    let _ = write!(
        h,
        "<main class=\"receipt\"><h1>Receipt</h1><dl class=\"figures\" id=\"receipt\">\
         <dt>Receipt number</dt><dd id=\"receipt-number\">{}</dd>\
         <dt>Date</dt><dd id=\"receipt-date\">{}</dd>\
         <dt>Billed to</dt><dd>{}</dd>\
         <dt>For</dt><dd>{}</dd>\
         <dt>Amount paid</dt><dd id=\"receipt-amount\">{} USD</dd>\
         <dt>Paid with</dt><dd id=\"receipt-method\">{}</dd>",
        esc(&c.charge_id),
        esc(&when(&c.created_at)),
        esc(&name),
        esc(&what),
        esc(&dollars(&c.amount)),
        esc(&paid_with),
    );
    if c.refunded_amount.as_decimal() > rust_decimal::Decimal::ZERO {
        let _ = write!(
            h,
            "<dt>Refunded</dt><dd id=\"receipt-refunded\">{}</dd>",
            esc(&dollars(&c.refunded_amount))
        );
    }
    h.push_str(
        "</dl><p class=\"no-print\">Print this page, or save it as a PDF, with your browser's Print command.</p>\
         <p class=\"no-print\"><a href=\"/billing#charges-h\">Back to billing settings</a></p></main></body></html>",
    );
    h
}

/// The problem of `form`, at `field` (`None`: the form's own).
fn problem_at(v: &View, form: Form, field: Option<&str>) -> Option<String> {
    v.problem
        .as_ref()
        .filter(|p| p.form == form && p.field == field)
        .map(|p| p.message.clone())
}

fn kept(v: &View, form: Form, field: &str) -> String {
    if v.problem.as_ref().is_some_and(|p| p.form == form) {
        v.kept.get(field).cloned().unwrap_or_default()
    } else {
        String::new()
    }
}

/// **Add a card**: with Stripe (R24) the card goes to Stripe.js and only the payment method
/// it made is posted here; with the sandbox, the card details are posted.
fn card_form(h: &mut String, v: &View) {
    match &v.stripe {
        Some(Ok(s)) => return stripe_card_form(h, v, s),
        Some(Err(())) => {
            h.push_str("<details class=\"add\"><summary>Add a card</summary><p class=\"error\" role=\"alert\">Adding a card is unavailable right now. Please try again in a minute.</p></details>");
            return;
        }
        None => {}
    }
    h.push_str("<details class=\"add\"");
    if v.problem.as_ref().is_some_and(|p| p.form == Form::Card) {
        h.push_str(" open");
    }
    h.push_str(
        "><summary>Add a card</summary><form method=\"post\" action=\"/billing/methods/card\">",
    );
    hidden_csrf(h, v);
    form_problem(h, v, Form::Card);
    field(
        h,
        v,
        Form::Card,
        "card-number",
        "number",
        "Card number",
        "",
        "inputmode=\"numeric\" autocomplete=\"cc-number\" required",
    );
    field(
        h,
        v,
        Form::Card,
        "card-exp-month",
        "exp_month",
        "Expiry month",
        &kept(v, Form::Card, "exp_month"),
        "inputmode=\"numeric\" autocomplete=\"cc-exp-month\" required",
    );
    field(
        h,
        v,
        Form::Card,
        "card-exp-year",
        "exp_year",
        "Expiry year",
        &kept(v, Form::Card, "exp_year"),
        "inputmode=\"numeric\" autocomplete=\"cc-exp-year\" required",
    );
    field(
        h,
        v,
        Form::Card,
        "card-cvc",
        "cvc",
        "CVC",
        "",
        "inputmode=\"numeric\" autocomplete=\"cc-csc\" required",
    );
    card_form_end(h, v);
}

/// The end of either card form: the default checkbox and the button.
fn card_form_end(h: &mut String, v: &View) {
    checkbox(
        h,
        "card-default",
        "make_default",
        "Make this card the default payment method",
        v.methods.is_empty(),
    );
    h.push_str("<p><button type=\"submit\">Add card</button></p></form></details>");
}

fn stripe_card_form(h: &mut String, v: &View, s: &StripeCard) {
    h.push_str("<details class=\"add\"");
    if v.problem.as_ref().is_some_and(|p| p.form == Form::Card) {
        h.push_str(" open");
    }
    // No field of ours carries card data: the card element is Stripe's, mounted by Stripe.js.
    let _ = write!(
        h,
        "><summary>Add a card</summary><form id=\"stripe-card-form\" method=\"post\" action=\"/billing/methods/card-token\" \
         data-client-secret=\"{}\" data-publishable-key=\"{}\">",
        esc(&s.client_secret),
        esc(&s.publishable_key)
    );
    hidden_csrf(h, v);
    form_problem(h, v, Form::Card);
    h.push_str(
        "<input type=\"hidden\" name=\"processor_token\" value=\"\">\
         <div class=\"field\"><span class=\"label\">Card</span><div id=\"card-element\"></div>\
         <p class=\"error\" id=\"card-error\" role=\"alert\"></p></div>",
    );
    card_form_end(h, v);
}

/// R25: payments the bank wants the customer to confirm, each with its button.
fn payments_to_confirm(h: &mut String, v: &View) {
    let Some(Ok(s)) = &v.stripe else {
        return;
    };
    let waiting: Vec<&Charge> = v
        .charges
        .items
        .iter()
        .filter(|c| c.action_required && c.client_secret.is_some())
        .collect();
    if waiting.is_empty() && problem_at(v, Form::Charges, None).is_none() {
        return;
    }
    h.push_str("<section aria-labelledby=\"confirm-h\" class=\"confirm\"><h2 id=\"confirm-h\">Payments to confirm</h2>");
    form_problem(h, v, Form::Charges);
    for c in waiting {
        let _ = write!(
            h,
            "<form class=\"confirm-payment\" method=\"post\" action=\"/billing/charges/confirm\" \
             data-client-secret=\"{}\" data-publishable-key=\"{}\"><p>Your bank asks you to confirm a payment of \
             <strong>{}</strong> ({}).</p>",
            esc(c.client_secret.as_deref().unwrap_or_default()),
            esc(&s.publishable_key),
            esc(&dollars(&c.amount)),
            esc(&when(&c.created_at)),
        );
        hidden_csrf(h, v);
        let _ = write!(
            h,
            "<input type=\"hidden\" name=\"charge_id\" value=\"{}\"><p class=\"error\" role=\"alert\"></p>\
             <p><button type=\"submit\">Confirm payment</button></p></form>",
            esc(&c.charge_id)
        );
    }
    h.push_str("</section>");
}

/// The scripts a Stripe page needs: Stripe.js from its one origin, then ours.
fn scripts(h: &mut String, v: &View) {
    if let Some(Ok(s)) = &v.stripe {
        let _ = write!(
            h,
            "<script src=\"{}\"></script><script src=\"/assets/billing.js\"></script>",
            esc(&s.js_url)
        );
    }
}

fn hidden_csrf(h: &mut String, v: &View) {
    let _ = write!(
        h,
        "<input type=\"hidden\" name=\"csrf\" value=\"{}\">",
        esc(&v.csrf)
    );
}

fn form_problem(h: &mut String, v: &View, form: Form) {
    if let Some(m) = problem_at(v, form, None) {
        let _ = write!(h, "<p class=\"error\" role=\"alert\">{}</p>", esc(&m));
    }
}

/// A labelled text input with its error (if any) right under it.
#[allow(clippy::too_many_arguments)]
fn field(
    h: &mut String,
    v: &View,
    form: Form,
    id: &str,
    name: &'static str,
    label: &str,
    value: &str,
    attrs: &str,
) {
    let err = problem_at(v, form, Some(name));
    let _ = write!(
        h,
        "<p class=\"field\"><label for=\"{id}\">{}</label> <input id=\"{id}\" name=\"{name}\" value=\"{}\" {attrs}{}>",
        esc(label),
        esc(value),
        if err.is_some() {
            format!(" aria-invalid=\"true\" aria-describedby=\"{id}-error\"")
        } else {
            String::new()
        }
    );
    if let Some(m) = err {
        let _ = write!(
            h,
            "<span class=\"error\" id=\"{id}-error\" role=\"alert\">{}</span>",
            esc(&m)
        );
    }
    h.push_str("</p>");
}

fn checkbox(h: &mut String, id: &str, name: &str, label: &str, checked: bool) {
    let _ = write!(
        h,
        "<p class=\"field check\"><input type=\"checkbox\" id=\"{id}\" name=\"{name}\" value=\"on\"{}> <label for=\"{id}\">{}</label></p>",
        if checked { " checked" } else { "" },
        esc(label)
    );
}

fn add_credits(h: &mut String, v: &View) {
    let default = v.methods.iter().find(|m| m.is_default);
    let _ = write!(
        h,
        "<section aria-labelledby=\"credits-h\"><h2 id=\"credits-h\">Add credits</h2>\
         <p>Credits are bought with your default payment method{}. Minimum purchase: <strong id=\"min-purchase\">{}</strong>.</p>\
         <form method=\"post\" action=\"/billing/credits\">",
        match default {
            Some(m) => format!(" ({})", esc(&method_name(m))),
            None => " (add one below first)".to_owned(),
        },
        esc(&dollars(&v.min_purchase)),
    );
    hidden_csrf(h, v);
    let _ = write!(
        h,
        "<input type=\"hidden\" name=\"key\" value=\"{}\">",
        esc(&v.purchase_key)
    );
    form_problem(h, v, Form::Credits);
    field(
        h,
        v,
        Form::Credits,
        "credits-amount",
        "amount",
        "Amount (USD)",
        &kept(v, Form::Credits, "amount"),
        "inputmode=\"decimal\" required",
    );
    h.push_str("<p><button type=\"submit\">Add credits</button></p></form></section>");
}

fn method_name(m: &PaymentMethod) -> String {
    match m.method_type {
        PaymentMethodType::Card => {
            let exp = m
                .expiry
                .as_ref()
                .map(|e| format!(", expires {:02}/{}", e.month, e.year))
                .unwrap_or_default();
            format!("{} card ending {}{exp}", m.brand, m.last4)
        }
        PaymentMethodType::UsBankAccount => format!("US bank account ending {}", m.last4),
    }
}

fn methods(h: &mut String, v: &View) {
    h.push_str(
        "<section aria-labelledby=\"methods-h\"><h2 id=\"methods-h\">Payment methods</h2>\
         <p class=\"rule\">Auto-recharge needs a card as the default payment method. \
         Making a bank account the default turns auto-recharge off.</p>",
    );
    form_problem(h, v, Form::Methods);
    if v.methods.is_empty() {
        h.push_str("<p id=\"no-methods\">No payment method yet.</p>");
    } else {
        h.push_str("<ul class=\"methods\">");
        for m in &v.methods {
            let name = method_name(m);
            let _ = write!(
                h,
                "<li data-method=\"{}\"><span class=\"method\">{}</span>{}",
                esc(&m.payment_method_id),
                esc(&name),
                if m.is_default {
                    " <strong class=\"badge\">Default</strong>"
                } else {
                    ""
                }
            );
            for (action, label, show) in [
                ("default", "Make default", !m.is_default),
                ("remove", "Remove", true),
            ] {
                if !show {
                    continue;
                }
                let _ = write!(
                    h,
                    "<form class=\"inline\" method=\"post\" action=\"/billing/methods/{action}\">"
                );
                hidden_csrf(h, v);
                let _ = write!(
                    h,
                    "<input type=\"hidden\" name=\"payment_method_id\" value=\"{}\">\
                     <button type=\"submit\" aria-label=\"{} {}\">{}</button></form>",
                    esc(&m.payment_method_id),
                    esc(label),
                    esc(&name),
                    esc(label)
                );
            }
            h.push_str("</li>");
        }
        h.push_str("</ul>");
    }
    card_form(h, v);
    // Add a US bank account.
    h.push_str("<details class=\"add\"");
    if v.problem.as_ref().is_some_and(|p| p.form == Form::Bank) {
        h.push_str(" open");
    }
    h.push_str("><summary>Add a US bank account</summary><form method=\"post\" action=\"/billing/methods/bank\">");
    hidden_csrf(h, v);
    form_problem(h, v, Form::Bank);
    field(
        h,
        v,
        Form::Bank,
        "bank-holder",
        "holder_name",
        "Account holder name",
        &kept(v, Form::Bank, "holder_name"),
        "autocomplete=\"name\" required",
    );
    field(
        h,
        v,
        Form::Bank,
        "bank-routing",
        "routing_number",
        "Routing number",
        &kept(v, Form::Bank, "routing_number"),
        "inputmode=\"numeric\" required",
    );
    field(
        h,
        v,
        Form::Bank,
        "bank-account",
        "account_number",
        "Account number",
        "",
        "inputmode=\"numeric\" required",
    );
    checkbox(
        h,
        "bank-default",
        "make_default",
        "Make this bank account the default payment method",
        false,
    );
    h.push_str(
        "<p><button type=\"submit\">Add bank account</button></p></form></details></section>",
    );
}

/// Why auto-recharge is off, and how to turn it back on; `None` when there is nothing to
/// explain (on, never configured, or turned off by the customer).
pub fn disabled_explanation(r: DisabledReason) -> Option<&'static str> {
    match r {
        DisabledReason::None | DisabledReason::User => None,
        DisabledReason::DefaultPaymentMethodNotCard => Some(
            "Auto-recharge was turned off because the default payment method became a bank account. \
             Make a card the default, then enable automatic credit purchases again below.",
        ),
        DisabledReason::NoDefaultPaymentMethod => Some(
            "Auto-recharge was turned off because there is no default payment method any more. \
             Add a card as the default, then enable automatic credit purchases again below.",
        ),
        DisabledReason::RepeatedFailures => Some(
            "Auto-recharge was turned off because three top-ups in a row were declined. \
             Check your card or make another card the default, then enable automatic credit purchases again below.",
        ),
        DisabledReason::Disputed => Some(
            "Auto-recharge was turned off because a payment of this account was disputed with your bank. \
             Once that is settled you can enable automatic credit purchases again below.",
        ),
    }
}

fn auto_recharge(h: &mut String, v: &View) {
    let r = &v.recharge;
    let configured = r.threshold.is_some();
    h.push_str("<section aria-labelledby=\"recharge-h\"><h2 id=\"recharge-h\">Auto-recharge</h2>");
    let state = match (r.enabled, &r.threshold, &r.target) {
        (true, Some(t), Some(g)) => format!(
            "On: when your balance goes below {}, it is brought back up to {}.",
            dollars(t),
            dollars(g)
        ),
        _ if configured => "Off.".to_owned(),
        _ => "Not set up. Set thresholds to buy credits automatically when your balance runs low."
            .to_owned(),
    };
    let _ = write!(h, "<p id=\"recharge-state\">{}</p>", esc(&state));
    if let Some(why) = disabled_explanation(r.disabled_reason) {
        let _ = write!(
            h,
            "<p id=\"recharge-reason\" class=\"warning\" role=\"status\">{}</p>",
            esc(why)
        );
    }
    if let Some(limit) = &r.monthly_limit {
        let _ = write!(
            h,
            "<p id=\"recharge-month\">Charged by auto-recharge this month: {} of your {} monthly limit.</p>",
            esc(&dollars(&r.charged_this_month)),
            esc(&dollars(limit))
        );
    }
    let failed = v
        .problem
        .as_ref()
        .is_some_and(|p| p.form == Form::AutoRecharge);
    let _ = write!(
        h,
        "<details id=\"recharge-edit\"{}><summary>{}</summary><form method=\"post\" action=\"/billing/auto-recharge\">",
        if failed { " open" } else { "" },
        if configured {
            "Edit limits"
        } else {
            "Set thresholds"
        }
    );
    hidden_csrf(h, v);
    form_problem(h, v, Form::AutoRecharge);
    let (enabled, threshold, target, limit) = if failed {
        (
            v.kept.contains_key("enabled"),
            kept(v, Form::AutoRecharge, "threshold"),
            kept(v, Form::AutoRecharge, "target"),
            kept(v, Form::AutoRecharge, "monthly_limit"),
        )
    } else {
        let s = |m: &Option<Money>| m.as_ref().map(Money::to_string).unwrap_or_default();
        (
            r.enabled || !configured,
            s(&r.threshold),
            s(&r.target),
            s(&r.monthly_limit),
        )
    };
    checkbox(
        h,
        "recharge-enabled",
        "enabled",
        "Enable automatic credit purchases",
        enabled,
    );
    field(
        h,
        v,
        Form::AutoRecharge,
        "recharge-threshold",
        "threshold",
        "When balance goes below",
        &threshold,
        "inputmode=\"decimal\"",
    );
    field(
        h,
        v,
        Form::AutoRecharge,
        "recharge-target",
        "target",
        "Bring credit balance up to",
        &target,
        "inputmode=\"decimal\"",
    );
    field(
        h,
        v,
        Form::AutoRecharge,
        "recharge-limit",
        "monthly_limit",
        "Monthly limit (optional)",
        &limit,
        "inputmode=\"decimal\"",
    );
    let _ = write!(
        h,
        "<p class=\"hint\">Each top-up is at least the minimum purchase ({}); the monthly limit caps what auto-recharge charges in a calendar month.</p>\
         <p><button type=\"submit\">Save</button></p></form></details></section>",
        esc(&dollars(&v.min_purchase))
    );
}

fn older_link(h: &mut String, param: &str, page: &Option<String>, what: &str) {
    if let Some(t) = page {
        let _ = write!(
            h,
            "<p><a href=\"/billing?{param}={}#{param}-h\">Older {}</a></p>",
            esc(&percent_encode(t)),
            esc(what)
        );
    }
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn when(t: &chrono::DateTime<chrono::Utc>) -> String {
    t.format("%Y-%m-%d %H:%M UTC").to_string()
}

/// A cell of a history table: text, a right-aligned amount, or a link (text, href).
enum Cell {
    Text(String),
    Num(String),
    Link(String, String),
}

/// One history table: its id, its heading, its column heads (`|`-separated).
struct Table(&'static str, &'static str, &'static str);

const ENTRIES: Table = Table(
    "entries",
    "Credits and usage",
    "Date|What|Amount|Balance after|Description",
);
const CHARGES: Table = Table("charges", "Charges", "Date|Amount|Method|Status|Receipt");
const ATTEMPTS: Table = Table("attempts", "Auto-recharge top-ups", "Date|Amount|Status");

/// Writes a history table (rows escaped here) and the link to its next page.
fn table(
    h: &mut String,
    Table(id, title, head): Table,
    rows: Vec<Vec<Cell>>,
    next: &Option<String>,
) {
    let _ = write!(h, "<h3 id=\"{id}-h\">{}</h3>", esc(title));
    if rows.is_empty() {
        h.push_str("<p>Nothing yet.</p>");
    } else {
        let _ = write!(h, "<table id=\"{id}\"><thead><tr>");
        for c in head.split('|') {
            let _ = write!(h, "<th>{}</th>", esc(c));
        }
        h.push_str("</tr></thead><tbody>");
        for row in rows {
            h.push_str("<tr>");
            for cell in row {
                let _ = match cell {
                    Cell::Text(s) => write!(h, "<td>{}</td>", esc(&s)),
                    Cell::Num(s) => write!(h, "<td class=\"num\">{}</td>", esc(&s)),
                    Cell::Link(text, href) => {
                        write!(h, "<td><a href=\"{}\">{}</a></td>", esc(&href), esc(&text))
                    }
                };
            }
            h.push_str("</tr>");
        }
        h.push_str("</tbody></table>");
    }
    older_link(h, id, next, &title.to_lowercase());
}

/// `failed (card_declined)`.
fn status(status: &str, failure_code: &Option<String>) -> String {
    match failure_code {
        Some(code) => format!("{} ({code})", words(status)),
        None => words(status),
    }
}

/// `API_REQUESTS` → `api requests`.
fn words(s: &str) -> String {
    s.to_lowercase().replace('_', " ")
}

fn entry_row(e: &Entry) -> Vec<Cell> {
    let (what, sign) = match e.kind {
        EntryKind::Usage(c) => (format!("Usage ({})", words(c.as_str())), "-"),
        EntryKind::Credit(s) => (format!("Credit ({})", words(s.as_str())), "+"),
        EntryKind::Refund => ("Refund".to_owned(), "-"),
        EntryKind::Dispute => ("Disputed payment".to_owned(), "-"),
        EntryKind::Expiry => ("Expired credits".to_owned(), "-"),
    };
    vec![
        Cell::Text(when(&e.created_at)),
        Cell::Text(what),
        Cell::Num(format!("{sign}{}", dollars(&e.amount))),
        Cell::Num(dollars(&e.balance_after)),
        Cell::Text(e.description.clone()),
    ]
}

fn charge_row(c: &Charge) -> Vec<Cell> {
    let method = match c.payment_method_type {
        PaymentMethodType::Card => "Card",
        PaymentMethodType::UsBankAccount => "US bank account",
    };
    vec![
        Cell::Text(when(&c.created_at)),
        Cell::Num(dollars(&c.amount)),
        Cell::Text(method.to_owned()),
        Cell::Text(if c.action_required {
            "waiting for your confirmation".to_owned()
        } else {
            status(c.status.as_str(), &c.failure_code)
        }),
        if c.status == ChargeStatus::Succeeded {
            Cell::Link(
                "Receipt".to_owned(),
                format!("/billing/receipts/{}", percent_encode(&c.charge_id)),
            )
        } else {
            Cell::Text(String::new())
        },
    ]
}

fn attempt_row(a: &RechargeAttempt) -> Vec<Cell> {
    let mut status = status(a.status.as_str(), &a.failure_code);
    if a.status == AttemptStatus::Skipped {
        status.push_str(": monthly limit reached");
    }
    vec![
        Cell::Text(when(&a.created_at)),
        Cell::Num(dollars(&a.amount)),
        Cell::Text(status),
    ]
}

fn history(h: &mut String, v: &View) {
    fn rows<T>(page: &Page<T>, row: fn(&T) -> Vec<Cell>) -> Vec<Vec<Cell>> {
        page.items.iter().map(row).collect()
    }
    h.push_str(
        "<section aria-labelledby=\"history-h\"><h2 id=\"history-h\">History</h2>\
         <p><a id=\"download-csv\" href=\"/billing/history.csv\" download>Download the whole history (CSV)</a></p>",
    );
    table(
        h,
        ENTRIES,
        rows(&v.entries, entry_row),
        &v.entries.next_page_token,
    );
    table(
        h,
        CHARGES,
        rows(&v.charges, charge_row),
        &v.charges.next_page_token,
    );
    table(
        h,
        ATTEMPTS,
        rows(&v.attempts, attempt_row),
        &v.attempts.next_page_token,
    );
    h.push_str("</section>");
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped_for_content_and_attributes() {
        assert_eq!(
            esc("<script>alert(\"x\")</script> & 'y'"),
            "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &#39;y&#39;"
        );
        assert_eq!(esc("plain"), "plain");
    }

    #[test]
    fn amounts_read_as_dollars() {
        let m = |s: &str| Money::parse_signed("x", s).unwrap();
        assert_eq!(dollars(&m("25")), "$25.00");
        assert_eq!(dollars(&m("-1.01")), "-$1.01");
        assert_eq!(dollars(&m("0.000125")), "$0.000125");
    }

    #[test]
    fn every_reason_but_the_customers_own_is_explained() {
        assert!(disabled_explanation(DisabledReason::None).is_none());
        assert!(disabled_explanation(DisabledReason::User).is_none());
        for r in [
            DisabledReason::DefaultPaymentMethodNotCard,
            DisabledReason::NoDefaultPaymentMethod,
            DisabledReason::RepeatedFailures,
        ] {
            assert!(disabled_explanation(r).unwrap().contains("again"));
        }
    }

    #[test]
    fn page_tokens_are_percent_encoded() {
        assert_eq!(percent_encode("a b&c=d"), "a%20b%26c%3Dd");
    }
}
