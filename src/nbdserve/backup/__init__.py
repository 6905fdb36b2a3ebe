"""`nbdserve backup`: incremental backups of an export into a chain of points
(chain.py: the format; copy.py: reading an export; run.py: a backup run;
restore.py: restore, instant restore, verify, merge). docs/backup.md has the format."""
