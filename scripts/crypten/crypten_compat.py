"""Import shims so that CrypTen 0.4.1 imports under torch 2.13 (nothing in site-packages is edited).

CrypTen's onnx_converter imports torch.onnx._internal.registration (torch 1.13-2.x internals) at
module load time; it uses `registry` only in from_pytorch's symbolic-registry patching, which this
harness never calls (it loads a pre-exported ONNX file with crypten.nn.from_onnx).
"""
import sys
import types


def install() -> None:
    try:
        import torch.onnx._internal.registration  # noqa: F401
    except ImportError:
        mod = types.ModuleType("torch.onnx._internal.registration")
        mod.registry = None
        sys.modules["torch.onnx._internal.registration"] = mod


def _hashable(v):
    if isinstance(v, (list, tuple)):
        return tuple(_hashable(x) for x in v)
    if isinstance(v, dict):
        return frozenset((k, _hashable(x)) for k, x in v.items())
    return v


def patch_tuple_cache() -> None:
    """CrypTen 0.4.1's tuple cache (crypten.trace / crypten.fill_cache) keys requests by
    frozenset(kwargs.items()), which raises TypeError when a kwarg is a list (conv2d
    padding/stride from ONNX attributes are lists). Same logic, with list -> tuple keys."""
    from crypten.mpc.provider.provider import TupleProvider

    def key(func_name, args, kwargs):
        return (func_name, _hashable(args), _hashable(kwargs))

    def fill_cache(self):
        for func_name, args, kwargs in self.request_cache:
            result = object.__getattribute__(self, func_name)(*args, **kwargs)
            self.tuple_cache.setdefault(key(func_name, args, kwargs), []).append(result)

    def __getattribute__(self, func_name):
        if func_name not in TupleProvider.TRACEABLE_FUNCTIONS:
            return object.__getattribute__(self, func_name)
        if object.__getattribute__(self, "tracing"):
            def func_with_trace(*args, **kwargs):
                object.__getattribute__(self, "request_cache").append((func_name, args, kwargs))
                return object.__getattribute__(self, func_name)(*args, **kwargs)
            return func_with_trace
        cache = object.__getattribute__(self, "tuple_cache")
        if len(cache) == 0:
            return object.__getattribute__(self, func_name)

        def func_from_cache(*args, **kwargs):
            k = key(func_name, args, kwargs)
            if cache.get(k):
                return cache[k].pop()
            TupleProvider.cache_misses = getattr(TupleProvider, "cache_misses", 0) + 1
            return object.__getattribute__(self, func_name)(*args, **kwargs)
        return func_from_cache

    TupleProvider.fill_cache = fill_cache
    TupleProvider.__getattribute__ = __getattribute__
