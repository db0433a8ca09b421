"""Without the compiled extension the package still imports and runs (reference backend)."""

import json
import subprocess
import sys
import textwrap


def test_package_works_without_compiled_extension():
    code = textwrap.dedent("""
        import sys, json
        sys.modules["sparsekernels._C"] = None   # makes `from . import _C` raise ImportError
        import torch, sparsekernels as sk
        from sparsekernels import info
        layer = sk.SparseLinear(9, 5, sparsity=0.5)
        x = torch.randn(4, 9, requires_grad=True)
        y = layer(x)
        y.sum().backward()
        ref = x.detach() @ layer.to_dense().weight.detach().t() + layer.bias.detach()
        err = (y - ref).abs().max().item()
        try:
            with sk.use_backend("cpu"):
                layer(x)
            forced = "no error"
        except RuntimeError as exc:
            forced = str(exc)
        print(json.dumps({"info": info.collect(), "err": err, "forced": forced,
                          "grad": x.grad is not None and layer.values.grad is not None}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["info"]["compiled_extension"] is False
    assert result["info"]["load_error"]
    assert result["info"]["chosen"]["cpu/float32"] == "reference"
    assert result["err"] < 1e-5 and result["grad"]
    assert "compiled sparsekernels extension" in result["forced"] and "reference" in result["forced"]
