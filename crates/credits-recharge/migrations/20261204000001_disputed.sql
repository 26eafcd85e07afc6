-- R26: a disputed payment turns auto-recharge off with reason DISPUTED.
ALTER TABLE settings DROP CONSTRAINT settings_disabled_reason_check;
ALTER TABLE settings ADD CONSTRAINT settings_disabled_reason_valid CHECK (disabled_reason IN
    ('NONE', 'USER', 'DEFAULT_PAYMENT_METHOD_NOT_CARD', 'NO_DEFAULT_PAYMENT_METHOD',
     'REPEATED_FAILURES', 'DISPUTED')) NOT VALID;
