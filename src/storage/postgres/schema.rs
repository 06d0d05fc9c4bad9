//! The schema: every table, created or completed at start by the first replica, under an
//! advisory lock.

pub(super) const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS signet_log (
    id smallint PRIMARY KEY CHECK (id = 1),
    origin text NOT NULL,
    next_index bigint NOT NULL,
    last_leaf bytea,
    active jsonb NOT NULL,
    log_key text
);
CREATE TABLE IF NOT EXISTS signet_entries (
    idx bigint PRIMARY KEY,
    leaf bytea NOT NULL,
    body bytea NOT NULL,
    batch text NOT NULL,
    tenant text,
    transaction_id text,
    time_us bigint NOT NULL
);
CREATE INDEX IF NOT EXISTS signet_entries_batch ON signet_entries (batch);
CREATE INDEX IF NOT EXISTS signet_entries_transaction ON signet_entries (transaction_id)
    WHERE transaction_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS signet_entries_tenant ON signet_entries (tenant, idx)
    WHERE tenant IS NOT NULL;
CREATE TABLE IF NOT EXISTS signet_tiles (
    level smallint NOT NULL,
    idx bigint NOT NULL,
    hashes bytea NOT NULL,
    PRIMARY KEY (level, idx)
);
CREATE TABLE IF NOT EXISTS signet_checkpoints (
    tree_size bigint PRIMARY KEY,
    signed_at bigint NOT NULL,
    note text NOT NULL
);
CREATE TABLE IF NOT EXISTS signet_timestamps (
    tree_size bigint PRIMARY KEY,
    note_sha256 text NOT NULL,
    response text NOT NULL
);
CREATE TABLE IF NOT EXISTS signet_tree_head (
    id smallint PRIMARY KEY CHECK (id = 1),
    size bigint NOT NULL,
    root bytea NOT NULL,
    replica text NOT NULL
);
CREATE TABLE IF NOT EXISTS signet_idempotency (
    client text NOT NULL,
    key_hash bytea NOT NULL,
    request_sha256 text NOT NULL,
    holder text,
    lease_until timestamptz,
    entry_index bigint,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (client, key_hash)
);
CREATE TABLE IF NOT EXISTS signet_key_states (
    key_id text PRIMARY KEY,
    record jsonb NOT NULL
);
CREATE TABLE IF NOT EXISTS signet_rotations (
    tenant text PRIMARY KEY,
    body jsonb NOT NULL
);
CREATE TABLE IF NOT EXISTS signet_rotation_history (
    seq bigserial PRIMARY KEY,
    body jsonb NOT NULL
);
CREATE TABLE IF NOT EXISTS signet_state_version (
    id smallint PRIMARY KEY CHECK (id = 1),
    version bigint NOT NULL
);
INSERT INTO signet_state_version VALUES (1, 0) ON CONFLICT DO NOTHING;
CREATE TABLE IF NOT EXISTS signet_vault (
    idx bigint PRIMARY KEY,
    row jsonb NOT NULL,
    sealed boolean NOT NULL,
    retain_until_us bigint,
    kek integer
);
CREATE INDEX IF NOT EXISTS signet_vault_due ON signet_vault (retain_until_us, idx) WHERE sealed;
CREATE INDEX IF NOT EXISTS signet_vault_kek ON signet_vault (kek, idx) WHERE sealed;
CREATE INDEX IF NOT EXISTS signet_vault_tags ON signet_vault
    USING gin ((row->'content'->'sealed'->'tags'));
CREATE TABLE IF NOT EXISTS signet_vault_meta (
    id smallint PRIMARY KEY CHECK (id = 1),
    meta jsonb NOT NULL
);
CREATE TABLE IF NOT EXISTS signet_holds (
    id text PRIMARY KEY,
    seq bigserial,
    body jsonb NOT NULL
);
CREATE OR REPLACE FUNCTION signet_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'signet evidence is append-only: % on % refused', TG_OP, TG_TABLE_NAME;
END $$;
DROP TRIGGER IF EXISTS signet_entries_append_only ON signet_entries;
CREATE TRIGGER signet_entries_append_only BEFORE UPDATE OR DELETE OR TRUNCATE
    ON signet_entries FOR EACH STATEMENT EXECUTE FUNCTION signet_append_only();
DROP TRIGGER IF EXISTS signet_checkpoints_append_only ON signet_checkpoints;
CREATE TRIGGER signet_checkpoints_append_only BEFORE UPDATE OR DELETE OR TRUNCATE
    ON signet_checkpoints FOR EACH STATEMENT EXECUTE FUNCTION signet_append_only();
"#;
