"""The local stack: real services on loopback, fetched, configured, started,
health-checked and stopped by the project itself (no Docker).

    python -m stack install | up [SERVICE...] | status | down [SERVICE...] | logs SERVICE
"""
