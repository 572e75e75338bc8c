-- No payment exceeds its invoice. Passes when it returns no row.
SELECT p.id AS payment_id, p.amount_cents, i.amount_cents AS invoice_cents
FROM payments p JOIN invoices i ON i.id = p.invoice_id
WHERE p.succeeded AND p.amount_cents > i.amount_cents;
