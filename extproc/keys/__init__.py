"""API keys managed at run time (issue 19): created, rotated and revoked through the admin API
(`extproc keys ...`) without editing the config file or restarting. The keys of the config
file keep working; these are an addition.

    records.py       a key as stored (KeyRecord), what an operator asks for (KeySpec), the
                     secrets' shape and digest, the errors of the package
    store.py         KeyStore: what a store must do, and the operations common to every store
    sqlite_store.py  the embedded store: one SQLite file shared by a machine's sidecar processes
    redis_store.py   the shared store: the Redis (or Redis Cluster) that holds the quotas
    directory.py     KeyDirectory: every key in memory, for a lookup with no I/O on the request
                     path, kept current by polling the store's revision
    settings.py      KeysSettings (the config's `keys:` section) and building the store from it
    validation.py    a KeySpec checked against the config it will serve under
    cli.py           `extproc keys create|list|show|rotate|revoke`, through the admin API

Nothing here imports extproc.config at import time but validation.py and cli.py: the config
imports settings.py for its `keys:` section.
"""
