"""CLIs: tools/convert_ckpt.py both directions (prints memory figures) and tools/reshard.py (checks a layout,
rejects one that does not divide, rewrites a checkpoint one tensor at a time, equal tensors)."""
import os

import pytest
import torch

from tests.test_hf_conversion import assert_bitwise, build_hf, read_dir, save_hf


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("tools")
    hf_dir = save_hf(build_hf("v3"), str(root / "hf"), mtp=True)
    return hf_dir, str(root)


def test_convert_cli_round_trip(converted, capsys):
    from tools.convert_ckpt import main
    hf_dir, root = converted
    ma, back = os.path.join(root, "cli_ma"), os.path.join(root, "cli_back")
    main(["--direction", "hf2ma", "--load-dir", hf_dir, "--save-dir", ma, "--tensor-model-parallel-size", "2",
          "--expert-model-parallel-size", "4", "--no-progress"])
    out = capsys.readouterr().out
    assert "largest tensor" in out and "peak RSS" in out
    main(["--direction", "ma2hf", "--load-dir", ma, "--save-dir", back, "--max-shard-size", "50KB", "--no-progress"])
    assert "largest shard" in capsys.readouterr().out
    assert_bitwise(read_dir(hf_dir), read_dir(back))
    with pytest.raises(SystemExit) as e:
        main(["--direction", "hf2ma", "--load-dir", os.path.join(root, "nope"), "--save-dir", ma, "--no-progress"])
    assert e.value.code == 2 and "config.json" in capsys.readouterr().err


def test_reshard_tool_check_and_rewrite(converted, capsys):
    from megatron_ascend.checkpointing.dcp_io import tensor_index
    from megatron_ascend.checkpointing.hf import convert_hf_to_ma, convert_ma_to_hf
    from tools.reshard import main
    hf_dir, root = converted
    ma = os.path.join(root, "rs_ma")
    convert_hf_to_ma(hf_dir, ma, 1, 1, 1, progress=False)
    main(["--load-dir", ma, "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
          "--expert-model-parallel-size", "4"])
    assert "fits tp 2 pp 2 ep 4" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["--load-dir", ma, "--expert-model-parallel-size", "3"])
    assert e.value.code == 2 and "expert-model-parallel-size 3" in capsys.readouterr().err
    out = os.path.join(root, "rs_out")
    main(["--load-dir", ma, "--save-dir", out, "--tensor-model-parallel-size", "2", "--save-dtype", "bf16"])
    idx = tensor_index(os.path.join(out, "release"))
    assert idx["model.layers.1.mlp.experts.down_proj"][1] == torch.bfloat16
    assert idx["model.layers.1.mlp.gate.e_score_correction_bias"][1] == torch.float32
    back = os.path.join(root, "rs_back")
    convert_ma_to_hf(out, back, save_dtype="fp32", progress=False)
    orig, got = read_dir(hf_dir), read_dir(back)
    for k in orig:
        want = orig[k] if "e_score_correction_bias" in k else orig[k].to(torch.bfloat16).float()
        assert torch.equal(got[k], want), k
