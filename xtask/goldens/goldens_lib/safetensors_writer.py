"""Byte-reproducible safetensors writer shared by the golden generators.

`safetensors.torch.save_file` serialises `__metadata__` in hash order, which changes from run to
run; this writer sorts the header so two runs give identical files.
"""

import json
from pathlib import Path

import numpy as np
import torch

_ST_DTYPES = {
    torch.float32: ("F32", np.float32),
    torch.int64: ("I64", np.int64),
    torch.uint8: ("U8", np.uint8),
    torch.int8: ("I8", np.int8),
}


def save_file(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Writes `tensors` (names sorted) with `metadata` as `__metadata__` (keys sorted)."""
    header: dict = {"__metadata__": {k: str(metadata[k]) for k in sorted(metadata)}}
    blobs, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        code, np_dtype = _ST_DTYPES[t.dtype]
        data = t.numpy().astype(np.dtype(np_dtype).newbyteorder("<")).tobytes()
        header[name] = {"dtype": code, "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for b in blobs:
            f.write(b)
