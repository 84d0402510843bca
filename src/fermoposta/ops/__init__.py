"""Operations: queue-id keyed log lines (text or JSON, secrets redacted) and
Prometheus metrics.  Imports nothing else of the package."""
