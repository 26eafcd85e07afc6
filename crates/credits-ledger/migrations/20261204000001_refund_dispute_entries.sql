-- R26/R27 (and R29's expiry): three more kinds of journal entry, each a debit with neither
-- a usage category nor a credit source. The balance is still credits minus everything else.
-- NOT VALID: the rows already there satisfied the narrower checks, so nothing is scanned
-- under the table lock; new rows are checked.
ALTER TABLE entries DROP CONSTRAINT entries_kind_check;
ALTER TABLE entries DROP CONSTRAINT entries_check;
ALTER TABLE entries ADD CONSTRAINT entries_kind_valid
    CHECK (kind IN ('USAGE', 'CREDIT', 'REFUND', 'DISPUTE', 'EXPIRY')) NOT VALID;
ALTER TABLE entries ADD CONSTRAINT entries_kind_fields
    CHECK ((kind = 'USAGE' AND category IS NOT NULL AND source IS NULL)
        OR (kind = 'CREDIT' AND source IS NOT NULL AND category IS NULL)
        OR (kind IN ('REFUND', 'DISPUTE', 'EXPIRY') AND category IS NULL AND source IS NULL)) NOT VALID;
