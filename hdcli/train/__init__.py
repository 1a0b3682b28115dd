"""The one training loop and its parts: ``task`` (what a job plugs in), ``engine`` (the loop), ``optim``
(AdamW groups, lr schedule), ``checkpoints`` (checkpoint and run-dir I/O), ``log`` (records, progress)."""
