"""A vision checkpoint's exported model (qdrop export --checkpoint Q --out Q/model.onnx) scored three ways on
its test images: the PyTorch simulation, ONNX Runtime's float Q/DQ graph (graph optimisation off) and its
integer graph (all optimisations: QLinearConv, QLinearAdd, ...). Prints top-1 of each and the pairwise top-1
agreement and max |logit difference|: tells whether a deployed-vs-simulated difference comes from the integer
kernels' arithmetic or from the float arithmetic the simulation shares with the Q/DQ graph.

    python benchmarks/vision_ort_levels.py Q --data ../shared/data/imagenet/samples
"""
import argparse
import json

import numpy as np
import torch

from qdrop.data import load_split
from qdrop.export.check import ort_session
from qdrop.export.x86 import describe_cpu
from qdrop.pipeline import load_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a qdrop quantize output folder holding model.onnx")
    ap.add_argument("--data", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    qmodel, _, info = load_checkpoint(args.checkpoint, data=args.data)
    qmodel.eval()
    test = load_split(info.dataset, "test", data=args.data, preprocess=info.preprocess)
    x, y = test.x, test.y.numpy()
    batches = [x[i:i + args.batch] for i in range(0, len(x), args.batch)]
    with torch.no_grad():
        logits = {"simulation": torch.cat([qmodel(b) for b in batches]).numpy()}
    for level, name in (("none", "ort_float_qdq"), ("all", "ort_integer")):
        sess = ort_session(f"{args.checkpoint}/model.onnx", level=level, threads=args.threads)
        inp = sess.get_inputs()[0].name
        logits[name] = np.concatenate([sess.run(None, {inp: b.numpy()})[0] for b in batches])
    names = list(logits)
    out = dict(samples=len(y), cpu=describe_cpu(), top1={k: round(100 * float((v.argmax(1) == y).mean()), 2) for k, v in logits.items()},
               pairs={f"{a} vs {b}": dict(agreement=round(100 * float((logits[a].argmax(1) == logits[b].argmax(1)).mean()), 2),
                                          max_abs_diff=round(float(np.abs(logits[a] - logits[b]).max()), 4))
                      for i, a in enumerate(names) for b in names[i + 1:]})
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
