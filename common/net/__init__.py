"""The network: the wire format (`wire`), the CurveZMQ transport (`transport`) and keys (`keys`).

The transport carries framed, sequenced messages and protocol rounds; what a session is (set-up,
start, ready) belongs to `secdfd.common.service.session`.

May import: `secdfd.common.errors`, `secdfd.common.roster` and the engine's channel interface
(`secdfd.common.engine.channel`).
"""
