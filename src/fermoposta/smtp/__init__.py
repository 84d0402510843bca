"""The sans-I/O SMTP core: parsers, replies, framing, SASL, the server dialog machine.

Contract: nothing here does I/O, reads a clock or imports anything of the
package outside `smtp/` (enforced by tests/core/test_imports.py).  Callers
feed bytes or lines and get values back; the asyncio drivers are in `net/`.
"""
