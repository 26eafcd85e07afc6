-- The version of sql/functions.sql the schema's functions come from. A ledger applies its
-- functions file only when the file is newer than this, so an older replica restarting
-- during a rolling deploy (or a rollback) never puts older function bodies under newer
-- replicas.
CREATE TABLE functions_version (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    version   integer NOT NULL
);
