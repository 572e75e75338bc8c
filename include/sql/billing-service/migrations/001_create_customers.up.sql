-- A billing customer is one OmniSphere account (auth-service user id) with a currency.
CREATE TABLE customers (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    auth_user_id bigint      NOT NULL,
    currency     text        NOT NULL DEFAULT 'EUR' CHECK (currency ~ '^[A-Z]{3}$'),
    created_at   timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT customers_auth_user_id_key UNIQUE (auth_user_id)
);
