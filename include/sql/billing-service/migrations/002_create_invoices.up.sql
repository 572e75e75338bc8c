-- Invoices keep amounts in minor units (cents) to avoid rounding.
CREATE TABLE invoices (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    customer_id  bigint      NOT NULL REFERENCES customers (id),
    amount_cents bigint      NOT NULL CHECK (amount_cents >= 0),
    status       text        NOT NULL DEFAULT 'draft'
                 CHECK (status IN ('draft', 'open', 'paid', 'void')),
    issued_at    timestamptz,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX invoices_customer_id_idx ON invoices (customer_id);
