"""Peak memory and wall time: `lcserve adapters merge` vs PEFT `merge_and_unload` + `save_pretrained`.

Both run on the same base and adapter (default: the embedded Gemma 3 270M and the demo
adapter), each in its own fresh Python process that reports its own peak RSS
(`getrusage(RUSAGE_SELF).ru_maxrss`), so imports count the same for both. The goal: lcserve's
streaming merge needs under half of PEFT's peak memory.

    python benchmarks/bench_merge.py [--base DIR] [--adapter DIR] [--dtype bf16|fp16|fp32] [--json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LCSERVE = """
import json, resource, sys
from lcserve.adapters.merge import merge_adapter
from lcserve.adapters.reader import read_adapter
base, adapter, out, dtype = sys.argv[1:5]
merge_adapter(read_adapter(adapter), base, out, dtype=None if dtype == "base" else dtype)
print(json.dumps({"peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""

PEFT = """
import json, resource, sys
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
base, adapter, out, dtype = sys.argv[1:5]
torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "base": "auto"}[dtype]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch_dtype)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out, safe_serialization=True)
AutoTokenizer.from_pretrained(base).save_pretrained(out)
print(json.dumps({"peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def run(name: str, script: str, base: Path, adapter: Path, dtype: str, workdir: Path) -> dict:
    out = workdir / name
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", script, str(base), str(adapter), str(out), dtype], capture_output=True, text=True
    )
    seconds = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    peak = json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_kib"] * 1024
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    return {"method": name, "peak_rss_bytes": peak, "wall_seconds": round(seconds, 2), "weights_bytes": size}


def main() -> None:
    from lcserve.paths import demo_adapter_dir, embedded_model_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, default=embedded_model_dir())
    parser.add_argument("--adapter", type=Path, default=demo_adapter_dir())
    parser.add_argument("--dtype", choices=["base", "bf16", "fp16", "fp32"], default="base")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    for path, hint in ((args.base, "lcserve embedded prepare"), (args.adapter, "lcserve embedded train-adapter")):
        if not path.exists():
            raise SystemExit(f"{path} not found; run `{hint}`")

    with tempfile.TemporaryDirectory(prefix="bench-merge-") as tmp:
        rows = [
            run("lcserve merge", LCSERVE, args.base, args.adapter, args.dtype, Path(tmp)),
            run("PEFT merge_and_unload", PEFT, args.base, args.adapter, args.dtype, Path(tmp)),
        ]
    ratio = rows[0]["peak_rss_bytes"] / rows[1]["peak_rss_bytes"]
    result = {
        "base": str(args.base),
        "adapter": str(args.adapter),
        "dtype": args.dtype,
        "methods": rows,
        "peak_rss_ratio": round(ratio, 3),
        "goal": "ratio < 0.5",
        "goal_met": ratio < 0.5,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"base {args.base}\nadapter {args.adapter}\ndtype {args.dtype}\n")
    print(f"{'method':<24}{'peak RSS':>12}{'wall time':>12}{'weights':>12}")
    for r in rows:
        print(
            f"{r['method']:<24}{r['peak_rss_bytes'] / 2**20:>9.0f} MiB{r['wall_seconds']:>10.1f} s"
            f"{r['weights_bytes'] / 2**20:>8.0f} MiB"
        )
    print(f"\npeak RSS ratio lcserve / PEFT: {ratio:.2f} (goal < 0.5: {'met' if ratio < 0.5 else 'NOT met'})")


if __name__ == "__main__":
    main()
