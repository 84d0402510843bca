"""The asyncio drivers: one `Connection` per peer, the server session driver,
the shared transaction receiver, the SMTP client and the client transaction.

Contract: the protocol's rules are `smtp/`'s; this package moves bytes, keeps
timeouts and deadlines, and never decides what a reply means for the queue
(the callers in `provider/`, `customer/` do).  Imports `smtp`, `ops`, `store`.
"""
