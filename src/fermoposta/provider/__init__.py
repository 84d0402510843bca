"""The provider: MX, ODMR (phase 1 and the flip), the drain, submission,
outbound delivery, hold expiry, accounts, queue tools and the daemon.

Contract: a 250 only after the durable commit; a recipient leaves the queue
only on a 2xx from the next hop (5xx: with a DSN).  Imports the inner
layers and `mail/`; nothing of `customer/`.
"""
