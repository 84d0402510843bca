"""The status page (issue 12): operators and customers, on `[web] listen`.

Modules: `app` (aiohttp routes, the listener), `sessions` (logins, cookies,
CSRF), `operators` (the operators file and its scrypt hashes, `fermoposta
web passwd`), `views` (store reads), `history` (in-memory rings of held
mail and rejects), `chart` (SVG); templates are package data.  See
docs/web.md.
"""
