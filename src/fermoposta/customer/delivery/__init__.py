"""Local delivery backends of the customer (maildir, lmtp, smtp); see base.py."""
