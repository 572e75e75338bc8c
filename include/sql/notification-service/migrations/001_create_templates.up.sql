-- Message templates, one per channel and locale.
CREATE TABLE templates (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    key        text        NOT NULL,
    channel    text        NOT NULL CHECK (channel IN ('email', 'sms', 'push')),
    locale     text        NOT NULL DEFAULT 'en',
    body       text        NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT templates_key_channel_locale_key UNIQUE (key, channel, locale)
);
