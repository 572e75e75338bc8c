-- omni:no-transaction
DROP INDEX CONCURRENTLY IF EXISTS users_last_login_at_idx;
ALTER TABLE users DROP COLUMN IF EXISTS last_login_at;
