"""SecDFD's shared code, in packages that follow the data flow. Imports only go down this list:

- `errors`, `roster`: the exception hierarchy and the one list of parties, ports and the verdict
  threshold. They import nothing of SecDFD.
- `engine`: the secure evaluation engine (ring, CSPRNG streams, bits, correlated randomness, the
  protocols, the plan, the party evaluator, both parties in one process). Knows no network.
- `net`: the wire format, the CurveZMQ transport and the keys. Imports the engine's channel
  interface only.
- `ml`: the DFDNet detector, its data, training and export. Plain PyTorch; no engine, no network.
- `service`: the deployed model, the bundle supply, the session protocol, the server base, the
  client session and local processes. Imports engine, net and ml.
- `bench`: benchmarks, fidelity, LAN emulation and reports, on top of the service. No click.
- `cli`: the `secdfd` command and the option blocks of the entry points; the only place with click.

The deployment folders beside `common/` (dealer/, server_a/, server_b/, client/) hold each party's
role and entry point; they import `common`, never each other, and `common` never imports them.
"""
