"""docs/USER_GUIDE.md's commands run as pasted: every ```bash block is split into commands the way a shell
does (backslash continuations joined, comments dropped) and each command is checked:

* no command starts with an option (a line that lost its continuation backslash);
* the entry points (``torchrun ... -m megatron_ascend.pretrain / posttrain``) parse with their own parser and
  pass every configuration rule (build_configs) at the torchrun world size, with DeepSeek-V3's config.json
  (written from ModelConfig's V3 defaults) where the command names one;
* the tools (tools/*.py, ``python -m megatron_ascend.training.generate``) parse their arguments with their
  own parsers (argparse stops them right after parsing: nothing runs);
* the scripts the guide runs with ``bash`` exist.
"""
import argparse
import importlib
import importlib.util
import json
import os
import re
import shlex

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUIDE = os.path.join(REPO, "docs", "USER_GUIDE.md")


def guide_commands(path=GUIDE):
    """[(line number, command text)] of every command in the guide's ```bash blocks."""
    out, block = [], None
    for i, line in enumerate(open(path, encoding="utf-8").read().splitlines(), start=1):
        if line.startswith("```bash"):
            block = []
            continue
        if line.startswith("```") and block is not None:
            cur, first = "", None
            for n, ln in block:
                text = ln.split(" #")[0].rstrip() if not ln.lstrip().startswith("#") else ""
                if not text.strip() and not cur:
                    continue
                first = first or n
                if text.endswith("\\"):
                    cur += text[:-1] + " "
                    continue
                cur += text
                if cur.strip():
                    out.append((first, cur.strip()))
                cur, first = "", None
            if cur.strip():
                out.append((first, cur.strip()))
            block = None
            continue
        if block is not None:
            block.append((i, line))
    return out


COMMANDS = guide_commands()


class _Parsed(Exception):
    pass


def _parse_only(monkeypatch):
    """argparse parses, records the namespace and stops the program right there."""
    seen = {}
    real = argparse.ArgumentParser.parse_args

    def parse_args(self, args=None, namespace=None):
        seen["ns"] = real(self, args, namespace)
        raise _Parsed()
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_args)
    return seen


def _v3_config(tmp):
    from megatron_ascend.config import ModelConfig
    d = os.path.join(tmp, "DeepSeek-V3")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(ModelConfig().to_hf_dict(), f)


def test_guide_has_commands():
    names = " ".join(c for _, c in COMMANDS)
    assert "megatron_ascend.pretrain" in names and "megatron_ascend.posttrain" in names \
        and "tools/preprocess_data.py" in names


@pytest.mark.parametrize("line,cmd", COMMANDS, ids=[f"line{n}" for n, _ in COMMANDS])
def test_guide_command_runs_as_pasted(line, cmd, tmp_path, monkeypatch):
    tokens = shlex.split(cmd)
    assert not tokens[0].startswith("-"), f"USER_GUIDE.md:{line}: a command starts with {tokens[0]!r} (a lost '\\')"
    if tokens[0] == "pip":
        return
    if tokens[0] == "bash":
        assert os.path.isfile(os.path.join(REPO, tokens[1])), f"USER_GUIDE.md:{line}: {tokens[1]} does not exist"
        return
    if tokens[0] == "torchrun":
        i = tokens.index("-m")
        nproc = int(re.search(r"--nproc[_-]per[_-]node[ =](\d+)", cmd).group(1))
        module, argv = tokens[i + 1], tokens[i + 2:]
        assert module in ("megatron_ascend.pretrain", "megatron_ascend.posttrain"), (line, module)
        from megatron_ascend.arguments import build_configs
        from megatron_ascend.training.entry import parse
        monkeypatch.chdir(tmp_path)
        _v3_config(str(tmp_path))
        args = parse(argv, "pretrain" if module.endswith("pretrain") else "sft")
        build_configs(args, nproc)  # every config rule at the launched world size
        return
    assert tokens[0] == "python", (line, cmd)
    if tokens[1] == "-m":
        target, argv = tokens[2], tokens[3:]
        main = importlib.import_module(target).main
    else:
        target, argv = tokens[1], tokens[2:]
        spec = importlib.util.spec_from_file_location("guide_tool", os.path.join(REPO, target))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        main = mod.main if not target.endswith("preprocess_data.py") else \
            importlib.import_module("megatron_ascend.data.preprocess").main
    seen = _parse_only(monkeypatch)
    with pytest.raises(_Parsed):
        main(argv)
    assert seen["ns"] is not None, (line, cmd)


def test_a_missing_continuation_is_caught(tmp_path):
    """The check itself: the guide's old pretrain example (a comment where the backslash belongs) fails it."""
    p = tmp_path / "g.md"
    p.write_text("```bash\ntorchrun --nproc_per_node 8 -m megatron_ascend.pretrain \\\n"
                 "    --model-config DeepSeek-V3/config.json           # or the architecture flags\n"
                 "    --tensor-model-parallel-size 2 \\\n    --bf16\n```\n")
    cmds = guide_commands(str(p))
    assert [c.split()[0] for _, c in cmds] == ["torchrun", "--tensor-model-parallel-size"]
