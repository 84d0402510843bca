"""fermoposta: On-Demand Mail Relay (RFC 2645) provider and customer.

The package holds a sans-I/O SMTP core (`fermoposta.smtp`), an asyncio
connection layer (`fermoposta.net`), the durable queue (`fermoposta.store`),
the provider daemons (`fermoposta.provider`) and operations helpers
(`fermoposta.ops`).  One console script, `fermoposta`, fronts all of it.
"""

__version__ = "0.1.0"
