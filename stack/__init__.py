"""The local stack: real services on loopback, fetched, configured, started,
health-checked and stopped by the project itself (no Docker).

    python -m stack install [SERVICE...]   fetch what is missing (offline once done);
                                           with no SERVICE also the tools tests need
                                           (headless chromium: stack/tools.py)
    python -m stack up [SERVICE...]        start, wait for a real client round trip
    python -m stack status                 address, state, RSS of each service
    python -m stack down [SERVICE...]      stop (reverse order), no process left
    python -m stack logs SERVICE [-n N] [-f]

Layout: ``config`` (ports, heaps, state dir), ``service`` (the Service base
class and process plumbing), ``services/`` (one module per service, and the
registry in start order), ``runner`` (what the verbs do), ``maven`` (jars from
Maven Central via mvn), ``jvm`` (the shared java command line), ``certs``
(a test CA for TLS), ``ports`` (who holds a port). All state lives under
``.stack/`` (or ``STACK_DIR``); settings come from ``stack.toml`` (or
``STACK_CONFIG``).
"""
