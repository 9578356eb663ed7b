"""The detector in plain PyTorch: DFDNet (`dfdnet`), image loading and data sets (`data`), the
proxy data generator (`synth`), training and evaluation (`train`), and export to the deployable file
(`export`), with the embedded default model in `models/`.

May import: `secdfd.common.errors` and `secdfd.common.roster`. Knows nothing of the secure engine or
the network.
"""
