-- One row per message handed to a provider.
CREATE TABLE deliveries (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    template_id  bigint      NOT NULL REFERENCES templates (id),
    auth_user_id bigint      NOT NULL,
    channel      text        NOT NULL,
    status       text        NOT NULL DEFAULT 'queued',
    queued_at    timestamptz NOT NULL DEFAULT now(),
    sent_at      timestamptz
);
CREATE INDEX deliveries_auth_user_id_idx ON deliveries (auth_user_id);
