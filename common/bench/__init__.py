"""Benchmarks and measurements: protocols and models in one process (`protocols`), the three
processes end to end (`e2e`), secure vs plaintext fidelity (`fidelity`), LAN emulation in network
namespaces (`lan`, `lan_e2e`) and reports (`report`).

May import: every package of `secdfd.common` but `cli`. No click: the commands live in `cli`.
"""
