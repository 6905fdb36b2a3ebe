"""Dirty bitmaps: bits (bitmap.py), their policy (policy.py, store.py), recovery,
marking, transactions, and their files (qdb.py, journal.py)."""
