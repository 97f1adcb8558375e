#!/usr/bin/env python3
"""Count repeated FFN neurons of a student checkpoint (issue 31).

For every layer: the number of neurons whose (gate row, up row, down column) equals an earlier
neuron's exactly, and the number whose largest cosine to another neuron over the concatenated
triple exceeds 0.9999. Usage: twin_neurons.py STUDENT_DIR [STUDENT_DIR...] (needs numpy).
"""
import json
import struct
import sys

import numpy as np


def tensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        assert t["dtype"] == "F32", (name, t["dtype"])
        a, b = t["data_offsets"]
        out[name] = np.frombuffer(data[a:b], dtype=np.float32).reshape(t["shape"])
    return out


def main():
    for d in sys.argv[1:]:
        t = tensors(f"{d}/model.safetensors")
        layers = sorted({int(k.split(".")[2]) for k in t if ".mlp.gate_proj" in k})
        for l in layers:
            p = f"model.layers.{l}.mlp"
            g, u, dn = t[f"{p}.gate_proj.weight"], t[f"{p}.up_proj.weight"], t[f"{p}.down_proj.weight"]
            trip = np.concatenate([g, u, dn.T], axis=1).astype(np.float64)
            exact = len(trip) - len({row.tobytes() for row in trip})
            unit = trip / np.linalg.norm(trip, axis=1, keepdims=True)
            cos = unit @ unit.T
            np.fill_diagonal(cos, -1.0)
            twins = int((cos.max(axis=1) > 0.9999).sum())
            print(f"{d} layer {l}: {len(trip)} neurons, {exact} exact repeats, {twins} with a twin at cosine > 0.9999, max cosine {cos.max():.6f}")


if __name__ == "__main__":
    main()
