"""The service: what the dealer, the servers and the client run around the engine.

The deployed model and its weight shares (`deployment`), the bundle supply (`supply`), the session
protocol between the servers (`session`), the server base that server_a/ and server_b/ build on
(`server`), one start-up path for every process (`startup`), the client session (`client`) and
local processes (`local`).

May import: `errors`, `roster`, `engine`, `net` and `ml` of `secdfd.common`. No click.
"""
