"""The masking curriculum: pure masking functions, stage dicts, the plateau rule, batches."""
