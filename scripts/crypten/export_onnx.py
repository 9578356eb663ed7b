"""Export ONE stream (the RGB stream) of DFDNet to ONNX for CrypTen 0.4.1.

Run in the project venv, with onnx made importable from a side directory (nothing is installed
into the project's .venv; from the repository root):

    source .venv/bin/activate
    PYTHONPATH=build/crypten/export_deps python scripts/crypten/export_onnx.py \
        --model dfdnet --size 128 [--bn fold|keep] [--out PATH]

The network is the RGB stream of `examples/models.py:_fused(name, size)` (same seed and
initialisation as `dfdnet()` / `dfdnet_s()`), in eval mode. The ONNX graph is the plain export of
that module: no layer is rewritten. Two CBAM ops have no CrypTen 0.4.1 ONNX converter
(GlobalMaxPool from AdaptiveMaxPool2d(1), ReduceMax from torch.amax(dim=1)); run.py supplies
converters for them that call CrypTen's own max primitive.

Writes PATH (.onnx) and PATH with .ref.pt: the fixed input, the plaintext output of this same
module (float64 and float32 evaluations) and metadata (model, width, size, bn, opset).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch


def load_examples_models():
    path = Path(__file__).resolve().parents[2] / "examples" / "models.py"
    spec = importlib.util.spec_from_file_location("secdfd_examples_models", path)
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="dfdnet", choices=["dfdnet", "dfdnet-s"])
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--stream", default="rgb", choices=["rgb"])
    ap.add_argument("--bn", default="fold", choices=["fold", "keep"],
                    help="fold: conv+BN folded by secdfd.common.ml.export.fold_stream (the form the "
                         "secdfd servers run); keep: BatchNormalization nodes kept in the ONNX graph")
    ap.add_argument("--opset", type=int, default=13)
    ap.add_argument("--seed", type=int, default=1234, help="seed of the fixed input")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    torch.set_num_threads(1)
    from secdfd.common.ml.dfdnet import get_spec
    from secdfd.common.ml.export import fold_stream

    models = load_examples_models()
    t0 = time.time()
    fused = models._fused(args.model, args.size)  # seeds 0, builds both streams, eval()
    net = fused.rgb.eval()
    if args.bn == "fold":
        net = fold_stream(net, "rgb").eval()
    width = get_spec(args.model).width

    out = Path(args.out or f"build/crypten/{args.model}_{args.stream}_{args.size}_{args.bn}.onnx")
    out.parent.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(args.seed)
    x = torch.rand(1, 3, args.size, args.size, generator=g)  # an RGB image in [0, 1]
    with torch.no_grad():
        y32 = net(x)
        y64 = net.double()(x.double())
        net.float()

    kwargs = dict(
        input_names=["input"], output_names=["output"], opset_version=args.opset,
        do_constant_folding=False, export_params=True, dynamo=False,
    )
    if args.bn == "keep":
        # keep BatchNormalization nodes (eval-mode peephole would fuse them into the convs)
        kwargs["training"] = torch.onnx.TrainingMode.PRESERVE
    torch.onnx.export(net, (x,), str(out), **kwargs)

    import onnx

    m = onnx.load(str(out))
    ops: dict[str, int] = {}
    for node in m.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    nparams = sum(p.numel() for p in net.parameters())
    ref = {
        "input": x, "output": y32, "output64": y64,
        "model": args.model, "width": width, "size": args.size, "stream": args.stream,
        "bn": args.bn, "opset": args.opset, "params": nparams, "ops": ops,
    }
    torch.save(ref, str(out) + ".ref.pt")
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB) and {out}.ref.pt in {time.time() - t0:.1f}s")
    print(f"params {nparams}, output {y32.tolist()}, |out| max {y32.abs().max().item():.4g}")
    print("ONNX ops:", dict(sorted(ops.items())))


if __name__ == "__main__":
    sys.exit(main())
