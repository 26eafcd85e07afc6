//! Portal session tokens: who and until when travels signed; the portal's records
//! ([`crate::store`]) only add "not any more" (a link used, a session signed out).
//!
//! - The **link token** (in the URL `CreatePortalSession` returns) says "account A until
//!   T": `v1.<account>.<expires unix>.<nonce>.<mac>`, the MAC an HMAC-SHA256 under the
//!   signing key over the kind (`link`), account, expiry and nonce.
//! - The page trades it for a **session cookie** of the same shape and kind `cookie`, so a
//!   link token is never accepted as a cookie nor the other way round.
//! - The **CSRF token** of a session is an HMAC of the cookie's MAC under the same key:
//!   a page of that session can show it, another site cannot compute it.
//!
//! Verification accepts the current key and, during a rotation, the previous one.
//! Account ids are `[A-Za-z0-9_-]` and the other parts digits or base64url, so `.` can
//! separate them without escaping.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, TimeZone, Utc};
use credits_common::ids::AccountId;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

/// The shortest signing key accepted, in bytes.
pub const MIN_KEY_LEN: usize = 32;

/// What a token is for; part of what is signed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Link,
    Cookie,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Link => "link",
            Kind::Cookie => "cookie",
        }
    }
}

/// A verified session: whose it is and until when. Its `Debug` shows neither the id nor
/// the MAC (together they are the token).
#[derive(Clone, PartialEq, Eq)]
pub struct Session {
    pub account: AccountId,
    pub expires_at: DateTime<Utc>,
    /// The token's nonce: the link's or the session's id in the portal's records (R28).
    pub id: String,
    /// The token's MAC, from which the CSRF token is derived.
    mac: Vec<u8>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("account", &self.account)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// Why a token was refused. Kept coarse on purpose: the page says "expired" or "not
/// valid", never which part failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("this billing link is not valid")]
    Invalid,
    #[error("this billing session has expired; ask for a new link")]
    Expired,
    /// R28: links are single-use.
    #[error("this billing link was already used; ask for a new link")]
    Used,
    /// R28: the session was signed out or revoked.
    #[error("this billing session has ended; ask for a new link")]
    Ended,
}

/// The signing keys: the current one signs; it or the previous one verifies.
#[derive(Clone)]
pub struct Keys {
    current: Vec<u8>,
    previous: Option<Vec<u8>>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys(***)")
    }
}

impl Keys {
    /// `current` and `previous` are at least [`MIN_KEY_LEN`] bytes each.
    pub fn new(current: &[u8], previous: Option<&[u8]>) -> anyhow::Result<Keys> {
        for (name, k) in [
            ("PORTAL_SIGNING_KEY", Some(current)),
            ("PORTAL_PREVIOUS_SIGNING_KEY", previous),
        ] {
            if let Some(k) = k
                && k.len() < MIN_KEY_LEN
            {
                anyhow::bail!("{name}: must be at least {MIN_KEY_LEN} bytes");
            }
        }
        Ok(Keys {
            current: current.to_vec(),
            previous: previous.map(<[u8]>::to_vec),
        })
    }

    /// A random key for this process only (sessions do not survive a restart nor work
    /// on another replica): for `credits up` and tests.
    pub fn random() -> Keys {
        let mut k = Vec::with_capacity(64);
        k.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
        k.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
        k.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
        k.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
        Keys {
            current: k,
            previous: None,
        }
    }

    fn mac(key: &[u8], parts: &[&str]) -> Vec<u8> {
        // HMAC takes a key of any length; `new_from_slice` cannot fail for it.
        let mut m = <HmacSha256 as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
        for p in parts {
            m.update(p.as_bytes());
            m.update(b"\n");
        }
        m.finalize().into_bytes().to_vec()
    }

    /// Signs a token of `kind` for `account` until `expires_at`.
    pub fn sign(&self, kind: Kind, account: &AccountId, expires_at: DateTime<Utc>) -> String {
        self.sign_id(kind, account, expires_at).0
    }

    /// [`Keys::sign`], and the token's id (its nonce).
    pub fn sign_id(
        &self,
        kind: Kind,
        account: &AccountId,
        expires_at: DateTime<Utc>,
    ) -> (String, String) {
        let nonce = URL_SAFE_NO_PAD.encode(uuid::Uuid::new_v4().as_bytes());
        (self.sign_with_id(kind, account, expires_at, &nonce), nonce)
    }

    /// [`Keys::sign`] with a given id (`[A-Za-z0-9_-]`, as a nonce is).
    pub fn sign_with_id(
        &self,
        kind: Kind,
        account: &AccountId,
        expires_at: DateTime<Utc>,
        nonce: &str,
    ) -> String {
        let exp = expires_at.timestamp().to_string();
        let mac = Self::mac(
            &self.current,
            &[kind.as_str(), account.as_str(), &exp, nonce],
        );
        format!(
            "v1.{}.{exp}.{nonce}.{}",
            account.as_str(),
            URL_SAFE_NO_PAD.encode(mac)
        )
    }

    /// Checks a token of `kind` at `now`: signed by one of the keys, not expired.
    pub fn verify(&self, kind: Kind, token: &str, now: DateTime<Utc>) -> Result<Session, Refused> {
        if token.len() > 512 {
            return Err(Refused::Invalid);
        }
        let parts: Vec<&str> = token.split('.').collect();
        let [version, account, exp, nonce, mac] = parts[..] else {
            return Err(Refused::Invalid);
        };
        if version != "v1" {
            return Err(Refused::Invalid);
        }
        let account = AccountId::parse(account).map_err(|_| Refused::Invalid)?;
        let given = URL_SAFE_NO_PAD.decode(mac).map_err(|_| Refused::Invalid)?;
        let signed_by = |key: &[u8]| {
            let want = Self::mac(key, &[kind.as_str(), account.as_str(), exp, nonce]);
            bool::from(want.ct_eq(&given))
        };
        let valid = signed_by(&self.current) || self.previous.as_deref().is_some_and(signed_by);
        if !valid {
            return Err(Refused::Invalid);
        }
        let exp: i64 = exp.parse().map_err(|_| Refused::Invalid)?;
        let expires_at = Utc.timestamp_opt(exp, 0).single().ok_or(Refused::Invalid)?;
        if expires_at <= now {
            return Err(Refused::Expired);
        }
        Ok(Session {
            account,
            expires_at,
            id: nonce.to_owned(),
            mac: given,
        })
    }

    /// A proof of `value` for `purpose` (the hop cookie of a link being opened): an HMAC a
    /// page of ours can carry and another site cannot compute.
    pub fn tag(&self, purpose: &str, value: &str) -> String {
        URL_SAFE_NO_PAD.encode(Self::mac(&self.current, &[purpose, value]))
    }

    /// Whether `given` is [`Keys::tag`] of `value` for `purpose` (current or previous key).
    pub fn tag_ok(&self, purpose: &str, value: &str, given: &str) -> bool {
        let Ok(given) = URL_SAFE_NO_PAD.decode(given) else {
            return false;
        };
        let ok = |key: &[u8]| bool::from(Self::mac(key, &[purpose, value]).ct_eq(&given));
        ok(&self.current) || self.previous.as_deref().is_some_and(ok)
    }

    /// The CSRF token of a session (verified from its cookie).
    pub fn csrf(&self, session: &Session) -> String {
        self.tag("csrf", &URL_SAFE_NO_PAD.encode(&session.mac))
    }

    /// Whether `given` is the session's CSRF token (under the current or previous key).
    pub fn csrf_ok(&self, session: &Session, given: &str) -> bool {
        self.tag_ok("csrf", &URL_SAFE_NO_PAD.encode(&session.mac), given)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn keys() -> Keys {
        Keys::new(&[7u8; 32], None).unwrap()
    }

    fn acct(s: &str) -> AccountId {
        AccountId::parse(s).unwrap()
    }

    /// A `kind` token for acme, signed by `k`, valid for a minute from now; and now.
    fn acme_token(k: &Keys, kind: Kind) -> (String, DateTime<Utc>) {
        let now = Utc::now();
        (
            k.sign(kind, &acct("acme"), now + chrono::Duration::seconds(60)),
            now,
        )
    }

    #[test]
    fn a_signed_token_verifies_until_it_expires() {
        let k = keys();
        let (t, now) = acme_token(&k, Kind::Link);
        let s = k.verify(Kind::Link, &t, now).unwrap();
        assert_eq!(s.account, acct("acme"));
        assert_eq!(
            k.verify(Kind::Link, &t, now + chrono::Duration::seconds(60)),
            Err(Refused::Expired)
        );
    }

    #[test]
    fn a_changed_account_expiry_kind_or_key_is_refused() {
        let k = keys();
        let (t, now) = acme_token(&k, Kind::Link);
        let other_account = t.replacen(".acme.", ".evil.", 1);
        assert_eq!(
            k.verify(Kind::Link, &other_account, now),
            Err(Refused::Invalid)
        );
        let parts: Vec<&str> = t.split('.').collect();
        let later = format!(
            "v1.acme.{}.{}.{}",
            parts[2].parse::<i64>().unwrap() + 3600,
            parts[3],
            parts[4]
        );
        assert_eq!(k.verify(Kind::Link, &later, now), Err(Refused::Invalid));
        assert_eq!(k.verify(Kind::Cookie, &t, now), Err(Refused::Invalid));
        let stranger = Keys::new(&[8u8; 32], None).unwrap();
        assert_eq!(stranger.verify(Kind::Link, &t, now), Err(Refused::Invalid));
        for junk in [
            "",
            "v1",
            "v1.acme.1.2",
            "v2.acme.1.n.m",
            "v1.a b.1.n.m",
            "v1.acme.x.n.!!",
        ] {
            assert_eq!(
                k.verify(Kind::Link, junk, now),
                Err(Refused::Invalid),
                "{junk}"
            );
        }
    }

    #[test]
    fn the_previous_key_still_verifies_during_a_rotation() {
        let old = keys();
        let (t, now) = acme_token(&old, Kind::Cookie);
        let rotated = Keys::new(&[9u8; 32], Some(&[7u8; 32])).unwrap();
        let s = rotated.verify(Kind::Cookie, &t, now).unwrap();
        assert!(rotated.csrf_ok(&s, &old.csrf(&s)));
        assert!(Keys::new(&[9u8; 31], None).is_err());
    }

    #[test]
    fn the_csrf_token_belongs_to_one_session() {
        let k = keys();
        let session = || {
            let (t, now) = acme_token(&k, Kind::Cookie);
            k.verify(Kind::Cookie, &t, now).unwrap()
        };
        let (a, b) = (session(), session());
        assert!(k.csrf_ok(&a, &k.csrf(&a)));
        assert!(!k.csrf_ok(&a, &k.csrf(&b)));
        assert!(!k.csrf_ok(&a, ""));
        assert!(!k.csrf_ok(&a, "not base64!"));
    }
}
