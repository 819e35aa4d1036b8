#!/usr/bin/env python3
"""Dequantize a (Q4_1/Q8_0/...) GGUF into an f32 / f16 / bf16 GGUF of the same model.

    python tools/convert_gguf.py SRC.gguf DST.gguf --type f32|f16|bf16

Everything is copied as-is (all KV metadata, tensor names, tensor order, shapes,
and llama.cpp's Q/K row permutation), except:
  * every tensor with >= 2 dims is dequantized to f32 and re-encoded as --type;
  * 1-D tensors (norms) are written as F32;
  * general.file_type is set to the matching LlamaFileType (ALL_F32 / MOSTLY_F16 / MOSTLY_BF16).
The numerical values are exactly the dequantized Q4_1/Q8_0 values (f32), or those
values rounded to f16 / bf16 (round-to-nearest-even, as gguf.quants does).

Needs the `gguf` and `numpy` packages (see tools/bench-requirements.txt).
"""
import argparse
import sys

import numpy as np
import gguf
from gguf import GGMLQuantizationType as QT, GGUFValueType as VT

TYPES = {
    "f32": (QT.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (QT.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (QT.BF16, gguf.LlamaFileType.MOSTLY_BF16),
}
# Keys the writer emits itself (header) or that we override.
SKIP_KEYS = {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count", "general.architecture", "general.file_type"}


def field_value(field):
    """Return (value, vtype, sub_type) for add_key_value."""
    main = field.types[0]
    if main == VT.ARRAY:
        sub = field.types[-1]
        if len(field.types) != 2:
            raise NotImplementedError(f"nested array in {field.name}")
        return field.contents(), VT.ARRAY, sub
    return field.contents(), main, None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--type", choices=sorted(TYPES), required=True)
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args(argv)
    qtype, ftype = TYPES[args.type]

    r = gguf.GGUFReader(args.src)
    arch = r.fields["general.architecture"].contents()
    align_field = r.fields.get("general.alignment")
    w = gguf.GGUFWriter(args.dst, arch, endianess=r.endianess)

    for key, field in r.fields.items():
        if key in SKIP_KEYS:
            continue
        val, vt, sub = field_value(field)
        w.add_key_value(key, val, vt, sub)
    w.add_file_type(int(ftype))

    total_in = total_out = 0
    for t in r.tensors:
        # t.data: numpy view in GGUF (reversed) row-major order, e.g. (rows, bytes_per_row) for quantized.
        if t.tensor_type in (QT.F32, QT.F16):
            f32 = np.asarray(t.data, dtype=np.float32)
        else:
            f32 = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        # logical shape in numpy order (outermost first)
        np_shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        f32 = f32.reshape(np_shape)
        out_type = qtype if f32.ndim >= 2 else QT.F32
        if out_type == QT.F32:
            data = np.ascontiguousarray(f32)
            w.add_tensor(t.name, data, raw_dtype=QT.F32)
        elif out_type == QT.F16:
            data = np.ascontiguousarray(f32.astype(np.float16))
            w.add_tensor(t.name, data, raw_dtype=QT.F16)
        else:
            data = gguf.quants.quantize(f32, QT.BF16)  # uint8 bytes, shape (..., 2*ne0)
            w.add_tensor(t.name, data, raw_dtype=QT.BF16)  # byte shape -> logical shape in writer
        total_in += int(t.n_bytes)
        total_out += data.nbytes
        if not args.quiet:
            print(f"{t.name:32s} {t.tensor_type.name:5s} -> {out_type.name:4s} {list(np_shape)}", file=sys.stderr)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"wrote {args.dst}: {len(r.tensors)} tensors, {total_in/1e6:.1f} MB -> {total_out/1e6:.1f} MB of tensor data "
          f"({args.type})", file=sys.stderr)
    if align_field is not None:
        print("note: source had general.alignment; copied as-is", file=sys.stderr)


if __name__ == "__main__":
    main()
