-- Which channels each user accepts; absent row means the defaults.
CREATE TABLE preferences (
    auth_user_id bigint  PRIMARY KEY,
    email        boolean NOT NULL DEFAULT true,
    sms          boolean NOT NULL DEFAULT false,
    push         boolean NOT NULL DEFAULT true,
    quiet_hours  int4range
);
