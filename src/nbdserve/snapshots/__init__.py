"""Point-in-time snapshots of a live export: copy-before-write (cbw.py), the snapshot
served as an export (export.py), and taking and removing them (manager.py)."""
