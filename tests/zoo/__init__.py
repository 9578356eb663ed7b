"""Small models written in the idioms of their home codebases, for the conformance zoo (test_zoo.py).

Each module has `build()` (a freshly initialised model in eval mode) and `INPUT` (its input shape).
"""
