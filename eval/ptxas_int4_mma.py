"""What ptxas makes of each launch setting of our int4 kernel (compress.quantize.int4_mma), without a GPU: registers a
thread, bytes spilled to local memory and static shared memory, compiled by NVRTC for one architecture (sm_90 by
default: H100, H200) with `--ptxas-options=-v`, and the warps a multiprocessor can hold from those figures:

    pip install nvidia-cuda-nvrtc-cu12     # NVRTC alone (~90 MB): no CUDA toolkit, no GPU
    python eval/ptxas_int4_mma.py --out eval/results/ptxas_int4_mma_sm90.json

Registers cap occupancy (ncu, H100: the one-row kernel at 60 registers kept half the warps; eval/results/
ncu_int4_mma_h100.txt), and a register cap (`__launch_bounds__`' minimum blocks) that forces spills trades that for
local-memory traffic, so these figures say which settings are worth timing on a GPU (eval/bench_int4_mma.py) before
any device time is spent. The shared-memory figure is also the check of int4_mma.shared_bytes, the bytes a setting
declares, which launch refuses above 48 KB."""

from __future__ import annotations

import argparse
import ctypes
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_int4_mma import SETTINGS  # noqa: E402

from compress.quantize import int4_mma  # noqa: E402

# sm_90's multiprocessor: 65,536 registers, allocated 256 a warp at a time; 64 warps; 228 KB of shared memory, of which
# 1 KB a block is reserved (CUDA C Programming Guide, "Compute Capability 9.0").
REGISTERS, REGISTER_UNIT, MAX_WARPS, SHARED, SHARED_RESERVED = 65536, 256, 64, 228 * 1024, 1024


def nvrtc() -> ctypes.CDLL:
    try:
        import nvidia.cuda_nvrtc
    except ImportError:
        raise SystemExit("NVRTC is not installed: pip install nvidia-cuda-nvrtc-cu12") from None
    folder = Path(list(nvidia.cuda_nvrtc.__path__)[0]) / "lib"
    return ctypes.CDLL(str(next(folder.glob("libnvrtc.so*"))))


def ptxas_report(library: ctypes.CDLL, source: str, name: str, arch: str) -> dict:
    """NVRTC compiles `source` for `arch`; ptxas's registers, spill bytes and static shared bytes of kernel `name`."""
    program = ctypes.c_void_p()
    if library.nvrtcCreateProgram(ctypes.byref(program), source.encode(), f"{name}.cu".encode(), 0, None, None):
        raise RuntimeError("nvrtcCreateProgram failed")
    options = [f"--gpu-architecture={arch}".encode(), b"-std=c++17", b"--ptxas-options=-v"]
    status = library.nvrtcCompileProgram(program, len(options), (ctypes.c_char_p * len(options))(*options))
    size = ctypes.c_size_t()
    library.nvrtcGetProgramLogSize(program, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    library.nvrtcGetProgramLog(program, log)
    library.nvrtcDestroyProgram(ctypes.byref(program))
    text = log.value.decode()
    if status:
        raise RuntimeError(f"NVRTC could not compile {name}: {text[:2000]}")

    def number(pattern: str) -> int:
        found = re.search(pattern, text)
        return int(found.group(1)) if found else 0

    return {"registers": number(r"Used (\d+) registers"), "spill_store_bytes": number(r"(\d+) bytes spill stores"),
            "spill_load_bytes": number(r"(\d+) bytes spill loads"), "shared_bytes": number(r"(\d+) bytes smem")}


def resident_warps(warps_per_block: int, registers: int, shared: int) -> int:
    """Warps of this kernel one sm_90 multiprocessor holds, by its registers, shared memory and warp limit."""
    per_warp = -(-registers * 32 // REGISTER_UNIT) * REGISTER_UNIT
    by_registers = REGISTERS // (per_warp * warps_per_block)
    by_shared = SHARED // (shared + SHARED_RESERVED)
    return min(by_registers, by_shared, MAX_WARPS // warps_per_block) * warps_per_block


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="sm_90")
    parser.add_argument("--rows", default="1,16", help="row counts (decode batch sizes) whose row tiles to compile")
    parser.add_argument("--out")
    args = parser.parse_args()
    library = nvrtc()
    rows = []
    for row_count in (int(r) for r in args.rows.split(",")):
        row_tiles = int4_mma._row_tiles(row_count)
        for setting in SETTINGS:
            for asymmetric in (False, True):
                declared = int4_mma.shared_bytes(row_tiles, setting, asymmetric)
                if declared > int4_mma.STATIC_SHARED_BYTES:
                    continue
                source = int4_mma.kernel_source("int4_mma", row_tiles, setting, asymmetric, False)
                report = ptxas_report(library, source, "int4_mma", args.arch)
                row = {"rows": row_count, "setting": list(setting), "asymmetric": asymmetric, **report,
                       "shared_bytes_declared": declared,
                       "resident_warps": resident_warps(setting[0], report["registers"], report["shared_bytes"])}
                rows.append(row)
                print(json.dumps(row), flush=True)
    mismatched = [r for r in rows if r["shared_bytes"] != r["shared_bytes_declared"]]
    print(f"{len(rows)} settings compiled; int4_mma.shared_bytes differs from ptxas in {len(mismatched)}")
    if args.out:
        Path(args.out).write_text(json.dumps({
            "arch": args.arch, "command": f"python eval/ptxas_int4_mma.py --arch {args.arch} --rows {args.rows}",
            "settings_order": "warps a block, k blocks a round, zero point in the integer units, PIPELINE, "
                              "warps a multiprocessor asked of the register allocator",
            "rows": rows}, indent=1) + "\n")
    if mismatched:
        raise SystemExit("int4_mma.shared_bytes is wrong for the settings above")


if __name__ == "__main__":
    main()
