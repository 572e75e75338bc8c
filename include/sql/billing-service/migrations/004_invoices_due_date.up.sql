-- Due dates drive dunning; nullable first so that adding the column does not rewrite the table.
ALTER TABLE invoices ADD COLUMN due_at timestamptz;
