"""Data: readers → table (path, label, split, source, case) → splits → datasets → DataModule; transforms,
harmonised preprocessing and test-time augmentation; any dataset to evaluate and a user's input files."""
