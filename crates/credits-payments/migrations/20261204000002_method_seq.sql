-- R28: payment-method lists are paged; a method's sequence number is its place in its
-- account's list (creation order) and the page token.
ALTER TABLE payment_methods ADD COLUMN seq bigint GENERATED ALWAYS AS IDENTITY;
CREATE UNIQUE INDEX payment_methods_account_seq ON payment_methods (account_id, seq);
