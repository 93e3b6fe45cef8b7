"""Data: readers → table (path, label, split, source, case) → splits → datasets → DataModule."""
