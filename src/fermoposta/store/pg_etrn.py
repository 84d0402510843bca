"""ETRN (RFC 1985) in the PostgreSQL engine: `etrn_domains`, `start_etrn`
and `return_to_held` (see `fermoposta.store.base`).

Contract: `PostgresEtrn` is a mixin of `PostgresStore` and uses only its
transactions (`_read`, `_write`), clock and holder-liveness SQL (`_live`).
Rows are locked in id order, as every write of the engine does; a domain
leased by a live ATRN session, and a recipient claimed by a live runner,
are left alone.  `start_etrn` holds the domains' leases for its own
transaction, so it and an ATRN taking a lease are serialized.
"""

from __future__ import annotations

import secrets
from collections.abc import Collection

from fermoposta.store.base import EtrnStarted
from fermoposta.store.pg_rows import _LOCK_RECIPIENTS, HELD, OUTBOUND, EnginePart, _ids

MAX_ETRN_DOMAINS = 500  # as the SQLite engine's batch


class PostgresEtrn(EnginePart):
    """The ETRN part of `PostgresStore`."""

    def etrn_domains(self, name: str, *, subdomains: bool = False) -> list[str]:
        suffix = "." + name
        with self._read("etrn domains", snapshot=False) as conn:
            if subdomains:
                rows = conn.execute(
                    "SELECT name FROM domains WHERE etrn IS NOT NULL"
                    " AND (name = %s OR right(name, %s) = %s) ORDER BY name",
                    (name, len(suffix), suffix)).fetchall()
            else:
                rows = conn.execute("SELECT name FROM domains WHERE etrn IS NOT NULL"
                                    " AND name = %s", (name,)).fetchall()
        return [str(r[0]) for r in rows]

    def start_etrn(self, domains: Collection[str], now: float) -> EtrnStarted:
        wanted = sorted(set(domains))
        if len(wanted) > MAX_ETRN_DOMAINS:
            raise ValueError(f"start_etrn: at most {MAX_ETRN_DOMAINS} domains at once")
        if not wanted:
            self._check_open()
            return EtrnStarted()
        owner = f"etrn:{secrets.token_hex(8)}"
        with self._write("start etrn") as conn:
            # The domains' leases are taken for this transaction only (as
            # `acquire_leases` takes them, in domain order) and given back
            # before it commits: an ATRN taking a lease meanwhile waits for
            # our commit and then finds the mail gone OUTBOUND, and one that
            # took it first makes the domain busy here.  A plain SELECT of the
            # leases could let an ATRN's drain and the outbound runner both
            # send the same mail.
            free = sorted(str(r[0]) for r in conn.execute(
                "INSERT INTO leases (domain, owner, expires_at, holder)"
                " SELECT d, %s, %s, %s FROM unnest(%s::text[]) AS d ORDER BY d"
                " ON CONFLICT (domain) DO UPDATE SET owner = EXCLUDED.owner,"
                " expires_at = EXCLUDED.expires_at, holder = EXCLUDED.holder"
                " WHERE leases.expires_at <= %s"
                f" OR NOT {self._live('leases.holder')}"
                " RETURNING domain",
                (owner, now + 60.0, self._holder, wanted, now)))
            conn.execute("DELETE FROM leases WHERE owner = %s", (owner,))
            busy = [d for d in wanted if d not in free]
            if not free:
                return EtrnStarted(busy=tuple(busy))
            # Not claimed by a live runner right now (as in retry_outbound).
            rows = conn.execute(
                "UPDATE recipients r SET state = %s, next_attempt_at = %s, updated_at = %s,"
                " claimed_by = NULL, claimed_until = NULL, claim_holder = NULL"
                " FROM (SELECT id FROM recipients WHERE domain = ANY(%s::text[])"
                " AND (state = %s OR (state = %s AND (claimed_until IS NULL"
                f" OR claimed_until <= %s OR NOT {self._live('claim_holder')})))"
                " ORDER BY id FOR UPDATE) l WHERE r.id = l.id RETURNING r.message_id",
                (OUTBOUND, now, now, free, HELD, OUTBOUND, now)).fetchall()
        return EtrnStarted(messages=len({str(r[0]) for r in rows}), recipients=len(rows),
                           busy=tuple(busy))

    def return_to_held(self, recipient_ids: Collection[int], reply: str) -> None:
        now = self._clock()
        ids = _ids(recipient_ids)
        with self._write("return to held") as conn:
            if not ids:
                return
            conn.execute(
                "UPDATE recipients r SET state = %s, attempts = r.attempts + 1,"
                " last_reply = %s, updated_at = %s,"
                " first_failure_at = COALESCE(r.first_failure_at, %s),"
                " next_attempt_at = NULL, claimed_by = NULL, claimed_until = NULL,"
                f" claim_holder = NULL FROM ({_LOCK_RECIPIENTS}) l"
                " WHERE r.id = l.id AND r.state = %s",
                (HELD, reply, now, now, ids, OUTBOUND))
