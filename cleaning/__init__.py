"""Data refinement: raw-format readers, detection, alignment, filters, shard I/O, demo data."""
