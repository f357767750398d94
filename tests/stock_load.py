"""Stock transformers (with compressed-tensors) reading a saved folder, apart from compress: in a fresh process that
never imports compress, so nothing compress registers or patches can help it load."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch


def stock_logits(folder: Path, ids: torch.Tensor, dtype: str = "float32") -> torch.Tensor:
    """The logits that AutoModelForCausalLM.from_pretrained(folder, dtype=...) computes for `ids`, in float32 (a
    stock-loading failure is an AssertionError carrying the child's error)."""
    work = Path(folder).parent
    torch.save(ids, work / "stock_ids.pt")
    script = (f"import sys, torch; from transformers import AutoModelForCausalLM\n"
              f"m = AutoModelForCausalLM.from_pretrained(r'{folder}', dtype=torch.{dtype})\n"
              f"ids = torch.load(r'{work / 'stock_ids.pt'}')\n"
              f"with torch.no_grad(): out = m(input_ids=ids).logits.float()\n"
              f"assert 'compress' not in sys.modules, 'stock loading imported compress'\n"
              f"torch.save(out, r'{work / 'stock_logits.pt'}')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return torch.load(work / "stock_logits.pt")
