"""Deferrable waits: they run in the triggerer, so a long wait holds no worker slot."""
