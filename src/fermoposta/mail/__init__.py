"""Mail services that both sides run, above the protocol core.

Contract: what the provider and the customer share lives here, so that
`customer/` never imports `provider/`: delivery status notifications
(`dsn`, RFC 3464), the AUTH dialog of a server session (`auth`, RFC 4954)
and its brute-force throttle (`anvil`).  This package may import `smtp/`,
`net/`, `ops/` and `store/`; never `provider/` or `customer/`.
"""
