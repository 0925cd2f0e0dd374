//! HTTP over a Unix socket, for `ch-remote` and tests (the REST API issue builds it).
