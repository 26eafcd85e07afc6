-- R28: the portal's small database. Links are single-use and short-lived; page sessions
-- can be signed out and revoked. Both are keyed by the nonce their signed token carries,
-- so a token still needs its signature: a row alone grants nothing.
CREATE TABLE links (
    link_id            text PRIMARY KEY,
    account_id         text NOT NULL,
    link_expires_at    timestamptz NOT NULL,
    session_expires_at timestamptz NOT NULL,
    used_at            timestamptz,
    created_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX links_account ON links (account_id) WHERE used_at IS NULL;

CREATE TABLE sessions (
    session_id text PRIMARY KEY,
    account_id text NOT NULL,
    expires_at timestamptz NOT NULL,
    revoked_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX sessions_account ON sessions (account_id) WHERE revoked_at IS NULL;
CREATE INDEX sessions_expiry ON sessions (expires_at);
CREATE INDEX links_expiry ON links (link_expires_at);
