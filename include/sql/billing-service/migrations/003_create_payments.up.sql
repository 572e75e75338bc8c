-- Every attempt to collect an invoice, successful or not.
CREATE TABLE payments (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    invoice_id    bigint      NOT NULL REFERENCES invoices (id),
    amount_cents  bigint      NOT NULL CHECK (amount_cents > 0),
    provider      text        NOT NULL,
    provider_ref  text,
    succeeded     boolean     NOT NULL,
    attempted_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX payments_invoice_id_idx ON payments (invoice_id);
