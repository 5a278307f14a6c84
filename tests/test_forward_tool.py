"""tools/forward.py at (T, P, E) in {(1,1,1), (2,2,2), (1,2,4), (2,1,4)} on a checkpoint converted from a tiny
HF DeepSeek-V3 (and, at one layout, on the HF directory read directly) gives the logits of transformers on the
original directory within 1e-5 (fp32), and per-token losses equal to cross entropy of those logits."""
import os

import torch
import torch.nn.functional as F

from tests.harness import run_distributed
from tests.tolerance import MODEL_REL, assert_rel
from tests.test_hf_conversion import build_hf, save_hf

# (tp, pp, ep) -> world size with expert-tp 1: the smallest dp that lets ep fit in a stage (ep | tp * dp)
LAYOUTS = {(1, 1, 1): 1, (2, 2, 2): 4, (1, 2, 4): 8, (2, 1, 4): 4}


def body_forward(ckpt, hf_dir, ids_path, out_dir, tp, pp, ep):
    import torch.distributed as dist
    from tools.forward import build_parser, run_forward
    res = {}
    for src in ("ckpt", "hf") if hf_dir else ("ckpt",):
        out = os.path.join(out_dir, f"out_{src}_{tp}{pp}{ep}.pt")
        argv = (["--load", ckpt] if src == "ckpt" else ["--hf-dir", hf_dir]) + [
            "--input-ids", ids_path, "--output", out, "--tensor-model-parallel-size", str(tp),
            "--pipeline-model-parallel-size", str(pp), "--expert-model-parallel-size", str(ep)]
        r = run_forward(build_parser().parse_args(argv))
        from megatron_ascend.parallel_state import destroy_model_parallel
        destroy_model_parallel()
        dist.barrier()
        res[src] = None if r is None else out
    return res


def test_forward_tool_matches_transformers_at_layouts(tmp_path):
    from megatron_ascend.checkpointing.hf import convert_hf_to_ma
    model = build_hf("v3")
    hf_dir = save_hf(model, str(tmp_path / "hf"), mtp=True)
    ckpt = str(tmp_path / "ma")
    convert_hf_to_ma(hf_dir, ckpt, 2, 2, 2, progress=False)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 256, (2, 12), generator=g)
    labels = torch.randint(0, 256, (2, 12), generator=g)
    labels[0, :3] = -100
    ids_path = str(tmp_path / "ids.pt")
    torch.save({"input_ids": ids, "labels": labels}, ids_path)
    with torch.no_grad():
        ref = model(ids).logits.float()
    ref_loss = F.cross_entropy(ref.view(-1, 256), labels.view(-1), reduction="none", ignore_index=-100).view(2, 12)
    worst = 0.0
    for (tp, pp, ep), world in LAYOUTS.items():
        res = run_distributed(world, body_forward, ckpt, hf_dir if (tp, pp, ep) == (2, 1, 4) else None, ids_path,
                              str(tmp_path), tp, pp, ep, timeout=300)
        writers = [r for r in res if r["ckpt"] is not None]
        assert len(writers) == 1, res  # exactly one rank writes
        for src, path in writers[0].items():
            out = torch.load(path, weights_only=True)
            assert out["logits"].shape == (2, 12, 256) and out["logits"].dtype == torch.float32
            # the stated figure: logits (and their per-token losses) within 1e-5 of transformers
            err = assert_rel(out["logits"], ref, MODEL_REL, f"logits tp{tp} pp{pp} ep{ep} from {src}")
            worst = max(worst, err)
            assert_rel(out["loss"], ref_loss, MODEL_REL, f"per-token loss tp{tp} pp{pp} ep{ep} from {src}")
            assert float(out["loss"][0, :3].abs().sum()) == 0.0
    print(f"max |logits - transformers| over layouts: {worst:.3g}")


def test_forward_cli_rejects_bad_layout(tmp_path, capsys):
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    model = build_hf("v2")
    hf_dir = save_hf(model, str(tmp_path / "hf"))
    torch.save(torch.zeros(1, 4, dtype=torch.long), str(tmp_path / "ids.pt"))
    proc = subprocess.run([sys.executable, os.path.join(repo, "tools", "forward.py"), "--hf-dir", hf_dir,
                           "--input-ids", str(tmp_path / "ids.pt"), "--output", str(tmp_path / "o.pt"),
                           "--expert-model-parallel-size", "3"],
                          env=dict(os.environ, MEGATRON_ASCEND_DEVICE="cpu"), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "error:" in proc.stderr, proc.stderr[-1500:]
