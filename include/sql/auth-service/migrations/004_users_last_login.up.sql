-- omni:no-transaction
-- Remember the last sign-in, and find dormant accounts without locking the users table for writes.
ALTER TABLE users ADD COLUMN IF NOT EXISTS last_login_at timestamptz;
CREATE INDEX CONCURRENTLY IF NOT EXISTS users_last_login_at_idx ON users (last_login_at);
