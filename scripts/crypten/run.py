#!/usr/bin/env python
"""CrypTen 0.4.1 benchmark of one DFDNet stream: online time, bytes and rounds of ONE warm inference.

    build/crypten/venv/bin/python scripts/crypten/run.py --size 128 \
        --onnx build/crypten/dfdnet_rgb_128_fold.onnx --provider TTP > crypten.json

Parties are real processes launched by CrypTen's own launcher (crypten.mpc.run_multiprocess,
world_size 2; with the TTP provider CrypTen adds a third process, the dealer). Party 0 owns the
model (encrypt(src=0)), party 1 owns the input (src=1).

Sequence in each party: load the ONNX graph (crypten.nn.from_onnx), encrypt model and the fixed
input, warm-up inference (with --precache, traced: CrypTen records every tuple request), then
crypten.fill_cache() makes all the Beaver/binary triples, wraps and B2A bits the next inference
needs (the offline phase; with TTP the dealer sends party 0 its shares here), barrier, reset of all
counters, then the timed inference (online only: tuples come from the cache), then the output is
decrypted and compared with the plaintext output of the same module (saved by export_onnx.py).

JSON on stdout. Byte counts:
  sent_bytes / recv_bytes: exact payload bytes this party put on / took off the wire, counted by a
      wrapper on every communicator call (gloo 2-party all_reduce = n elements each way);
  crypten_stats: CrypTen's own counters (comm.get().get_communication_stats(); cfg.communicator.
      verbose on). Its "bytes" counts an all_reduce as 2n elements (sent + received) and send and
      recv each once on their own side, so it is about sent + received, not sent;
  rounds: communicator calls between the parties in the timed run (barriers excluded); CrypTen's
      own "rounds" counter equals calls (it counts every all_reduce/broadcast/send as one).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import sys
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import crypten_compat  # noqa: E402

crypten_compat.install()

import torch  # noqa: E402

import crypten  # noqa: E402
import crypten.communicator as comm  # noqa: E402
import crypten.nn.module as cmod  # noqa: E402
from crypten.common.functions.maximum import _max_helper_all_tree_reductions  # noqa: E402
from crypten.config import cfg  # noqa: E402
from crypten.mpc.provider.provider import TupleProvider  # noqa: E402

crypten_compat.patch_tuple_cache()

# --- converters for the two ONNX ops of DFDNet that CrypTen 0.4.1's from_onnx lacks -------------


class Identity(cmod.Module):
    """ONNX Identity (the exporter aliases duplicate initialisers through it): pass-through."""

    def forward(self, x):
        return x

    @staticmethod
    def from_onnx(attributes=None):
        return Identity()


class ReduceMax(cmod.Module):
    """ONNX ReduceMax (torch.amax(x, dim=1, keepdim=True) in CBAM spatial attention).

    impl "tree": CrypTen's max tree (functions.max_method, default log_reduction) via
    _max_helper_all_tree_reductions, the max-only path that MPCTensor.max() uses; no argmax.
    impl "api": MPCTensor.max(dim, keepdim)[0], CrypTen's public call, which also computes a
    one-hot argmax (an eq over the whole input and a random tie-break) that is then discarded:
    the same path CrypTen's own MaxPool2d takes.
    """

    impl = "tree"

    def __init__(self, axes, keepdims=True):
        super().__init__()
        self.axes = list(axes)
        self.keepdims = bool(keepdims)

    def forward(self, x):
        if torch.is_tensor(x):
            return torch.amax(x, dim=self.axes, keepdim=self.keepdims)
        assert len(self.axes) == 1, "ReduceMax over one axis only"
        dim = self.axes[0]
        if ReduceMax.impl == "api":
            out = x.max(dim=dim, keepdim=self.keepdims)[0]
        else:
            out = _max_helper_all_tree_reductions(x, dim=dim, method=cfg.functions.max_method)
            if self.keepdims:
                out = out.unsqueeze(dim)
        return out

    @staticmethod
    def from_onnx(attributes=None):
        attributes = attributes or {}
        return ReduceMax(attributes["axes"], attributes.get("keepdims", 1))


def register_converters() -> None:
    # from_onnx looks ONNX op types up as attributes of crypten.nn.module
    for cls in (Identity, ReduceMax):
        if not hasattr(cmod, cls.__name__):
            setattr(cmod, cls.__name__, cls)


# --- exact per-party traffic counter ---------------------------------------------------------


def _nbytes(t) -> int:
    if isinstance(t, (list, tuple)):
        return sum(_nbytes(x) for x in t)
    return t.nelement() * t.element_size()


class Traffic:
    """Wraps the communicator instance's methods to count payload bytes sent/received and calls."""

    METHODS = ("send", "recv", "isend", "irecv", "scatter", "reduce", "all_reduce", "gather",
               "all_gather", "broadcast", "barrier", "send_obj", "recv_obj", "broadcast_obj")

    def __init__(self, c):
        self.c = c
        self.rank = c.get_rank()
        self.ws = c.get_world_size()
        self.reset()
        for name in self.METHODS:
            setattr(c, name, self._wrap(name, getattr(c, name)))

    def reset(self):
        self.sent = Counter()
        self.recv = Counter()
        self.calls = Counter()

    def _is_ttp(self, group):
        return group is not None and group is not getattr(self.c, "main_group", None)

    def _wrap(self, name, fn):
        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            self._account(name, args, kwargs, out)
            return out

        return wrapped

    def _account(self, name, args, kwargs, out):
        ws, rank = self.ws, self.rank
        if ws < 2:
            return
        group = kwargs.get("group", None)
        sent = recv = 0
        if name in ("send", "isend"):
            sent = _nbytes(args[0])
        elif name in ("recv", "irecv"):
            recv = _nbytes(args[0])
        elif name == "all_reduce":
            n = _nbytes(args[0])  # batched: a list
            sent = recv = n * 2 * (ws - 1) // ws if ws > 2 else n
        elif name == "all_gather":
            sent, recv = (ws - 1) * _nbytes(args[0]), (ws - 1) * _nbytes(args[0])
        elif name == "broadcast":
            src = args[1] if len(args) > 1 else kwargs["src"]
            group = args[2] if len(args) > 2 else group
            n = _nbytes(args[0])
            if src == rank:
                sent = n * (ws - 1)
            else:
                recv = n
        elif name in ("reduce", "gather"):
            dst = args[1] if len(args) > 1 else kwargs["dst"]
            n = _nbytes(args[0])
            if dst == rank:
                recv = n * (ws - 1)
            else:
                sent = n
        elif name == "scatter":
            src = args[1]
            if src == rank:
                sent = sum(_nbytes(x) for i, x in enumerate(args[0]) if i != rank)
            else:
                recv = _nbytes(out)
        elif name == "send_obj":
            group = args[2] if len(args) > 2 else group
            sent = len(pickle.dumps(args[0]))
        elif name == "recv_obj":
            group = args[1] if len(args) > 1 else group
            recv = len(pickle.dumps(out))
        elif name == "broadcast_obj":
            src = args[1]
            group = args[2] if len(args) > 2 else group
            n = len(pickle.dumps(out if out is not None else args[0]))
            if src == rank:
                sent = n * (ws - 1)
            else:
                recv = n
        key = ("ttp:" if self._is_ttp(group) else "") + name
        self.calls[key] += 1
        self.sent[key] += sent
        self.recv[key] += recv

    def summary(self):
        party = {k: v for k, v in self.calls.items() if not k.startswith("ttp:") and k != "barrier"}
        ttp = {k: v for k, v in self.calls.items() if k.startswith("ttp:")}
        return {
            "sent_bytes": sum(v for k, v in self.sent.items() if not k.startswith("ttp:")),
            "recv_bytes": sum(v for k, v in self.recv.items() if not k.startswith("ttp:")),
            "rounds": sum(party.values()),
            "calls": dict(sorted(party.items())),
            "ttp_calls": dict(sorted(ttp.items())),
            "ttp_recv_bytes": sum(v for k, v in self.recv.items() if k.startswith("ttp:")),
            "ttp_sent_bytes": sum(v for k, v in self.sent.items() if k.startswith("ttp:")),
        }


# --- one party ---------------------------------------------------------------------------------


def _tensor_bytes(obj) -> int:
    if torch.is_tensor(obj):
        return obj.nelement() * obj.element_size()
    if hasattr(obj, "share") and torch.is_tensor(getattr(obj, "share")):
        return _tensor_bytes(obj.share)
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(x) for x in obj)
    if isinstance(obj, dict):
        return sum(_tensor_bytes(x) for x in obj.values())
    return 0


def _numel(v) -> int:
    if isinstance(v, (list, tuple)):
        return sum(_numel(x) for x in v)
    try:
        return int(v.nelement())
    except Exception:
        return 0


class NodeProfiler:
    """Per graph node: wall/cpu seconds, bytes sent, communication calls, in/out elements."""

    def __init__(self, model, traffic):
        self.traffic = traffic
        self.active = False
        self.rows = []
        for name, mod in model._modules.items():
            if type(mod).__name__ in ("Parameter", "Constant"):
                continue
            # the class's bound forward (crypten.nn.Module.__getattribute__ wraps `forward` lookups)
            orig = object.__getattribute__(mod, "forward")
            object.__setattr__(mod, "forward", self._wrap(name, type(mod).__name__, orig))

    def _wrap(self, name, op, fn):
        def wrapped(x):
            if not self.active:
                return fn(x)
            tr = self.traffic
            s0, c0 = sum(tr.sent.values()), sum(v for k, v in tr.calls.items() if k != "barrier")
            t0, p0 = time.perf_counter(), time.process_time()
            out = fn(x)
            self.rows.append({
                "node": name, "op": op,
                "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - p0,
                "sent": sum(tr.sent.values()) - s0,
                "calls": sum(v for k, v in tr.calls.items() if k != "barrier") - c0,
                "in_numel": _numel(x), "out_numel": _numel(out),
            })
            return out

        return wrapped

    def by_op(self):
        agg = {}
        for r in self.rows:
            a = agg.setdefault(r["op"], {"n": 0, "wall_s": 0.0, "cpu_s": 0.0, "sent": 0, "calls": 0})
            a["n"] += 1
            for k in ("wall_s", "cpu_s", "sent", "calls"):
                a[k] += r[k]
        return dict(sorted(agg.items(), key=lambda kv: -kv[1]["wall_s"]))


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def party(args):
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    register_converters()
    ReduceMax.impl = args.reducemax
    c = comm.get()
    rank, ws = c.get_rank(), c.get_world_size()
    traffic = Traffic(c)
    model_src, input_src = 0, (1 if ws > 1 else 0)

    ref = torch.load(args.onnx + ".ref.pt", weights_only=False)
    with open(args.onnx, "rb") as f:
        model = crypten.nn.from_onnx(f)
    model.eval()
    model.encrypt(src=model_src)
    profiler = NodeProfiler(model, traffic) if args.profile else None
    x = ref["input"]
    assert tuple(x.shape) == (1, 3, args.size, args.size), f"ONNX/ref input is {tuple(x.shape)}, --size {args.size}"
    x_enc = crypten.cryptensor(x if rank == input_src else torch.empty_like(x), src=input_src)
    setup_s = time.perf_counter() - t_start
    provider = crypten.mpc.get_default_provider()

    with crypten.no_grad():
        # warm-up (traced: it records the tuple requests of one inference)
        if args.precache:
            crypten.trace(True)
        t0 = time.perf_counter()
        model(x_enc)
        warmup_s = time.perf_counter() - t0
        fill_s = 0.0
        cache_bytes = cache_tuples = 0
        if args.precache:
            crypten.trace(False)
            t0 = time.perf_counter()
            crypten.fill_cache()  # offline phase
            fill_s = time.perf_counter() - t0
            cache_tuples = sum(len(v) for v in provider.tuple_cache.values())
            cache_bytes = _tensor_bytes(provider.tuple_cache)
        rss_before = _rss_mib()

        # timed, online-only inference
        c.barrier()
        c.reset_communication_stats()
        traffic.reset()
        TupleProvider.cache_misses = 0
        if profiler is not None:
            profiler.active = True
        t0, c0 = time.perf_counter(), time.process_time()
        y_enc = model(x_enc)
        online_s = time.perf_counter() - t0
        online_cpu_s = time.process_time() - c0
        if profiler is not None:
            profiler.active = False
            with open(f"{args.profile}.rank{rank}.json", "w") as f:
                json.dump(profiler.rows, f)
        crypten_stats = dict(c.get_communication_stats())
        online = traffic.summary()
        cache_left = sum(len(v) for v in provider.tuple_cache.values()) if args.precache else None
        cache_misses = TupleProvider.cache_misses

        t0 = time.perf_counter()
        y = y_enc.get_plain_text()
        reveal_s = time.perf_counter() - t0
    ref_out = ref["output"].to(y.dtype)
    return {
        "rank": rank,
        "online_s": online_s,
        "online_cpu_s": online_cpu_s,
        "crypten_stats": crypten_stats,
        **online,
        "reveal_s": reveal_s,
        "setup_s": setup_s,
        "warmup_s": warmup_s,
        "fill_cache_s": fill_s,
        "cache_tuples": cache_tuples,
        "cache_tuples_left_after_run": cache_left,
        "cache_misses_in_timed_run": cache_misses,
        "cache_bytes": cache_bytes,
        "peak_rss_mib": _rss_mib(),
        "rss_before_online_mib": rss_before,
        "output": y.tolist(),
        "ref_output": ref_out.tolist(),
        "max_abs_err": (y - ref_out).abs().max().item(),
        "ref_max_abs": ref_out.abs().max().item(),
        "meta": {k: ref[k] for k in ("model", "width", "size", "stream", "bn", "opset", "params")},
        "torch_threads": torch.get_num_threads(),
        "by_op": profiler.by_op() if profiler is not None else None,
        "nodes_wall_s": sum(r["wall_s"] for r in profiler.rows) if profiler is not None else None,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--onnx", default=None, help="default build/crypten/dfdnet_rgb_{size}_fold.onnx")
    ap.add_argument("--provider", default="TFP", choices=["TFP", "TTP"],
                    help="crypten cfg mpc.provider (TTP adds a dealer process)")
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--no-precache", dest="precache", action="store_false",
                    help="do not trace + fill_cache: tuples are then made inside the timed run")
    ap.add_argument("--reducemax", default="tree", choices=["tree", "api"])
    ap.add_argument("--profile", default=None, metavar="PREFIX",
                    help="per-node profile of the timed run to PREFIX.rank{0,1}.json (+ by_op in the JSON)")
    ap.add_argument("--max-method", default=None, help="override cfg.functions.max_method")
    args = ap.parse_args()
    if args.onnx is None:
        args.onnx = f"build/crypten/dfdnet_rgb_{args.size}_fold.onnx"
    args.onnx = os.path.abspath(args.onnx)

    cfg.mpc.provider = args.provider
    cfg.communicator.verbose = True
    if args.max_method:
        cfg.functions.max_method = args.max_method
    torch.set_num_threads(1)

    if args.provider == "TTP":
        # run_multiprocess starts the dealer as _launch(crypten.mpc.provider.TTPServer) and queues
        # its return value: hand it None instead of the server object (process groups, generators)
        from crypten.mpc.provider.ttp_provider import TTPServer

        def ttp_server():
            TTPServer()  # serves tuple requests until party 0 sends "terminate"

        crypten.mpc.provider.TTPServer = ttp_server

    t0 = time.perf_counter()
    runner = crypten.mpc.run_multiprocess(world_size=args.world_size)(party)
    results = runner(args)
    wall = time.perf_counter() - t0
    if not results:
        print(json.dumps({"error": "a party failed (see stderr)", "wall_s": wall}))
        return 1
    results = [r for r in results if isinstance(r, dict) and "rank" in r]
    r0 = results[0]
    out = {
        "framework": "CrypTen 0.4.1",
        "torch": torch.__version__,
        "provider": args.provider,
        "world_size": args.world_size,
        "precache": args.precache,
        "reducemax": args.reducemax,
        "max_method": cfg.functions.max_method,
        "precision_bits": cfg.encoder.precision_bits,
        "model": r0["meta"]["model"],
        "width": r0["meta"]["width"],
        "stream": r0["meta"]["stream"],
        "bn": r0["meta"]["bn"],
        "params": r0["meta"]["params"],
        "input": [1, 3, args.size, args.size],
        "onnx": args.onnx,
        "torch_threads": [r["torch_threads"] for r in results],
        "seconds": max(r["online_s"] for r in results),
        "seconds_per_party": [r["online_s"] for r in results],
        "cpu_seconds_per_party": [r["online_cpu_s"] for r in results],
        "load_avg_1m_at_end": os.getloadavg()[0],
        "bytes_sent_per_party": [r["sent_bytes"] for r in results],
        "bytes_recv_per_party": [r["recv_bytes"] for r in results],
        "rounds": r0["rounds"],
        "rounds_per_party": [r["rounds"] for r in results],
        "crypten_stats_per_party": [r["crypten_stats"] for r in results],
        "calls_per_party": [r["calls"] for r in results],
        "ttp_traffic_in_timed_run": [{"calls": r["ttp_calls"], "sent": r["ttp_sent_bytes"],
                                      "recv": r["ttp_recv_bytes"]} for r in results],
        "max_abs_err": r0["max_abs_err"],
        "ref_max_abs": r0["ref_max_abs"],
        "output": r0["output"],
        "ref_output": r0["ref_output"],
        "reveal_s": r0["reveal_s"],
        "setup_s_per_party": [r["setup_s"] for r in results],
        "warmup_s_per_party": [r["warmup_s"] for r in results],
        "fill_cache_s_per_party": [r["fill_cache_s"] for r in results],
        "cache_tuples_per_party": [r["cache_tuples"] for r in results],
        "cache_tuples_left_after_run": [r["cache_tuples_left_after_run"] for r in results],
        "cache_misses_in_timed_run": [r["cache_misses_in_timed_run"] for r in results],
        "cache_bytes_per_party": [r["cache_bytes"] for r in results],
        "peak_rss_mib_per_party": [r["peak_rss_mib"] for r in results],
        "wall_s": wall,
    }
    if args.profile:
        out["by_op_rank0"] = r0["by_op"]
        out["nodes_wall_s_per_party"] = [r["nodes_wall_s"] for r in results]
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
