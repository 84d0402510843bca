"""The one-line help of each top-level command that `cli` registers from
another module.

Contract: `COMMAND_HELP[name]` is the line `fermoposta --help` shows for
the command `name`.  The module that registers the command passes it as
the parser's help; `cli.build_parser` gives it to the stand-in it
registers instead when the command line names another command, so that
the command's modules are not imported at all.  Imports nothing.
"""

from __future__ import annotations

COMMAND_HELP: dict[str, str] = {
    "account": "manage ODMR customer accounts",
    "domain": "manage the domains mail is held for",
    "queue": "look at and act on the mail queue (like mailq, postsuper, qshape)",
    "store": "the store: schema migrations, copy to another",
    "web": "the status page ([web]): operator logins",
    "customer": "the customer side: pull held mail over ODMR",
}
