"""Data: the dataset format and `Vocab`, `prepare` (library part), where corpora come from."""
