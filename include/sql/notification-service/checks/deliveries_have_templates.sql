-- Every delivery names a known channel. Passes when it returns no row.
SELECT id, channel FROM deliveries WHERE channel NOT IN ('email', 'sms', 'push');
