"""tools/compare_runs.py and tools/run_report.py (one report module, monitoring/report): every number in
summary.json equals what the TensorBoard events, run_metadata.json and rank_stats.jsonl it came from say; the
figures exist and are drawn; runs whose recipe, data or model differ are refused unless allowed; and the HTML is
read in a real browser (headless Chromium): every figure loaded (naturalWidth > 0) and the screenshot shows a
drawn figure at each figure's place.

The runs are written here the way a training run writes them (TrainingLogger -> TensorBoard,
run_metadata.collect -> run_metadata.json, rank_stats.jsonl lines) with known curves, so the expected numbers
are computed independently: four runs of one recipe -- A (seed 1), B (seed 2: the noise pair), C (bf16: +0.05
after step 10), D (TP2 layout: A + 1e-4, half the step time, rank 1 a straggler)."""
import json
import math
import os
import shutil
import statistics
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))

pytest.importorskip("matplotlib")

STEPS = 40
TARGET = 3.0
BASE_ARGS = ("--num-layers 3 --hidden-size 32 --ffn-hidden-size 64 --num-attention-heads 4 --q-lora-rank 16 "
             "--kv-lora-rank 16 --qk-head-dim 8 --qk-pos-emb-head-dim 4 --v-head-dim 8 --num-experts 4 "
             "--moe-ffn-hidden-size 16 --n-shared-experts 1 --moe-router-topk 2 --first-k-dense-replace 1 "
             "--mtp-num-layers 1 --vocab-size 64 --seq-length 16 --micro-batch-size 1 --global-batch-size 4 "
             "--train-iters 40 --lr 3e-3 --mock-data")


def _noise(seed, step):
    return 0.02 * math.sin(1.7 * step + seed)


def _loss(run, step):
    base = 2.0 + 4.0 * math.exp(-step / 10.0)
    if run == "B":
        return base + _noise(2, step)
    a = base + _noise(1, step)
    if run == "C":
        return a + (0.05 if step > 10 else 0.0)
    if run == "D":
        return a + 1e-4
    return a


STEP_SECONDS = {"A": 0.5, "B": 0.5, "C": 0.6, "D": 0.25, "E": 0.5}


def _write_run(root, run, seed, extra_args="", model_over=None, metadata=True):
    from megatron_ascend.arguments import build_configs, parse_args
    from megatron_ascend.monitoring import Throughput, TensorBoardWriter, TrainingLogger
    from megatron_ascend.monitoring import run_metadata
    from megatron_ascend.monitoring.moe_stats import load_imbalance_scalars
    d = os.path.join(root, run)
    w = TensorBoardWriter(d)
    log = TrainingLogger(w, STEPS, 5, Throughput(1e6, 2, 1.0), print_fn=None)
    secs = STEP_SECONDS[run]
    for it in range(1, STEPS + 1):
        log.record_iteration(it, it * 4, {"lm loss": _loss(run, it), "mtp_1 loss": _loss(run, it) + 0.1},
                             lr=1e-3, global_batch_size=4, grad_norm=1.0, skipped=False, tokens=64, seconds=secs,
                             extra_scalars=load_imbalance_scalars({1: [it % 5 + 1, 2, 3, 4], 2: [1, 1, 1, 1],
                                                                   3: [4, 0, 2, 2]}))
        if it % 20 == 0:
            log.record_validation(it, it * 4, {"lm loss": _loss(run, it) - 0.01})
    w.close()
    if not metadata:
        return d
    args = parse_args((BASE_ARGS + f" --seed {seed} " + extra_args).split())
    model, par, opt, train, data = build_configs(args, 2)
    if model_over:
        import dataclasses
        model = dataclasses.replace(model, **model_over)
    os.environ["MEGATRON_ASCEND_RECIPE"] = json.dumps({"name": "unit", "version": 1, "target_loss": TARGET})
    try:
        meta = run_metadata.collect(args=args, stage="pretrain", model=model, parallel=par, optimizer=opt,
                                    training=train, data=data, devices=[{"kind": "cpu", "name": "cpu", "host": "h",
                                                                         "memory_bytes": 8 << 30}] * 2,
                                    vp=1, num_microbatches=2, global_batch_size=4, flops_per_token=1e6,
                                    peak_tflops=1.0, peak_source="unit")
    finally:
        del os.environ["MEGATRON_ASCEND_RECIPE"]
    run_metadata.write_json(os.path.join(d, run_metadata.METADATA_FILE), meta)
    with open(os.path.join(d, run_metadata.RANK_STATS_FILE), "w") as f:
        for first in range(1, STEPS + 1, 5):
            its = list(range(first, first + 5))
            probe = [2.0, 1.0 if run == "D" else 2.0]
            f.write(json.dumps({"iterations": its, "step_seconds_max": [secs] * 5,
                                "step_seconds_min": [secs * 0.9] * 5, "rank_step_seconds_mean": [secs, secs],
                                "rank_mem_allocated_bytes": [100, 200],
                                "rank_mem_max_allocated_bytes": [1000 + first, 2000 + first],
                                "rank_mem_reserved_bytes": [100, 200], "rank_probe_tflops": probe}) + "\n")
    return d


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("runs"))
    return {"A": _write_run(root, "A", 1), "B": _write_run(root, "B", 2),
            "C": _write_run(root, "C", 1, "--bf16"),
            "D": _write_run(root, "D", 1, "--tensor-model-parallel-size 2 --sequence-parallel"), "root": root}


@pytest.fixture(scope="module")
def compared(runs):
    import compare_runs
    out = os.path.join(runs["root"], "cmp")
    assert compare_runs.main([runs[k] for k in "ABCD"] + ["--labels", "A", "B", "C", "D", "--out", out]) == 0
    return out, json.load(open(os.path.join(out, "summary.json")))


@pytest.fixture(scope="module")
def single(runs):
    import run_report
    out = os.path.join(runs["root"], "single")
    assert run_report.main([runs["A"], "--out", out]) == 0
    return out


def _tb(path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(path, size_guidance={"scalars": 0})
    acc.Reload()
    return {t: {e.step: e.value for e in acc.Scalars(t)} for t in acc.Tags()["scalars"]}


def _smooth(values, w):
    return [sum(values[max(0, i - w + 1): i + 1]) / len(values[max(0, i - w + 1): i + 1]) for i in range(len(values))]


def test_numbers_equal_their_sources(runs, compared):
    out, s = compared
    w = s["window"]
    assert w == 2 and s["baseline"] == "A" and s["target_loss"] == TARGET
    tb = {k: _tb(runs[k]) for k in "ABCD"}
    for k in "ABCD":
        r = s["runs"][k]
        loss = [tb[k]["lm loss"][i] for i in range(1, STEPS + 1)]
        assert r["lm loss first"] == loss[0] and r["lm loss last"] == loss[-1]
        assert r["lm loss validation last"] == tb[k]["lm loss validation"][40]
        assert r["throughput"]["tflops_per_device_median"] == statistics.median(tb[k]["throughput"].values())
        assert r["throughput"]["tokens_per_sec_median"] == statistics.median(tb[k]["tokens-per-sec"].values())
        assert r["throughput"]["mfu"] == pytest.approx(r["throughput"]["tflops_per_device_median"] / 1.0)
        # time to target: the first step whose trailing mean is <= target, its tokens and summed step seconds
        sm = _smooth(loss, w)
        step = next(i + 1 for i, v in enumerate(sm) if v <= TARGET)
        t = r["time_to_target"]
        assert t["step"] == step and t["tokens"] == step * 64
        assert t["seconds"] == pytest.approx(step * STEP_SECONDS[k]) and t["device_seconds"] == pytest.approx(
            2 * step * STEP_SECONDS[k])
        assert r["memory"]["rank_peak_bytes"] == [1000 + 36, 2000 + 36]
        assert r["moe"]["layers"] == [1, 2, 3] and r["moe"]["per_layer"]["2"]["last"] == 1.0
        assert r["moe"]["per_layer"]["3"]["max"] == tb[k]["moe/tokens_per_expert_imbalance_layer_3"][1]
        assert r["step_time"]["median"] == STEP_SECONDS[k] and r["step_time"]["count"] == STEPS
    # the seed pair was found in the metadata; its band and each run's difference follow from the curves
    assert s["noise"]["runs"] == ["A", "B"] and s["noise"]["seeds"] == [1, 2]
    la = [tb["A"]["lm loss"][i] for i in range(1, STEPS + 1)]
    sa = _smooth(la, w)
    sb = _smooth([tb["B"]["lm loss"][i] for i in range(1, STEPS + 1)], w)
    d = [abs(y - x) for x, y in zip(sa, sb)]
    band = [max(d[max(0, i - w): i + w + 1]) for i in range(STEPS)]
    assert s["noise"]["max_band"] == pytest.approx(max(band), rel=1e-12)
    sc = _smooth([tb["C"]["lm loss"][i] for i in range(1, STEPS + 1)], w)
    dc = s["differences"]["C"]
    assert dc["final"] == pytest.approx(sc[-1] - sa[-1], rel=1e-9) and dc["final"] == pytest.approx(0.05, abs=1e-6)
    assert dc["fraction_inside"] == pytest.approx(sum(abs(y - x) <= b for x, y, b in zip(sa, sc, band)) / STEPS)
    assert dc["agree_after"] is None and dc["fraction_inside"] < 0.5  # 0.05 is above a ~0.02-0.04 band
    dd = s["differences"]["D"]
    assert dd["agree_after"] == 1 and dd["fraction_inside"] == 1.0
    assert dd["max_abs_raw"] == max(abs(tb["D"]["lm loss"][i] - tb["A"]["lm loss"][i]) for i in range(1, STEPS + 1))
    # stragglers: rank 1 of D probes at half the median
    assert s["runs"]["D"]["stragglers"]["stragglers"] == [1] and s["runs"]["A"]["stragglers"]["stragglers"] == []
    text = " ".join(s["verdict"])
    assert "D: the curves agree with A within the seed-noise band at every step" in text
    assert "C: the curves leave the seed-noise band" in text
    assert "D reaches loss 3 at step" in text and "2x faster per device" in text
    assert "straggler ranks [1]" in text


def test_figures_are_drawn(compared):
    from matplotlib.image import imread
    out, s = compared
    names = {f["file"] for f in s["figures"]}
    assert {"loss.png", "loss_diff.png", "loss_cost.png", "throughput.png", "step_time.png", "stragglers.png",
            "memory.png", "moe_0.png", "moe_3.png"} <= names
    page = open(os.path.join(out, "index.html")).read()
    for n in names:
        img = imread(os.path.join(out, n))
        assert img.shape[0] > 200 and img.shape[1] > 400 and img[..., :3].std() > 0.05, n
        assert f"src='{n}'" in page
    assert "Verdict" in page and "seed-noise band" in page


def test_refuses_different_runs_unless_allowed(runs, tmp_path, capsys):
    import compare_runs
    other = _write_run(str(tmp_path), "E", 1, model_over={"hidden_size": 48})
    out = str(tmp_path / "cmp")
    assert compare_runs.main([runs["A"], other, "--out", out]) == 2
    err = capsys.readouterr().err
    assert "refusing to compare" in err and "model hidden_size = 48 (vs 32)" in err and "--allow-different model" in err
    assert not os.path.exists(os.path.join(out, "index.html"))
    assert compare_runs.main([runs["A"], other, "--out", out, "--allow-different", "model"]) == 0
    page = open(os.path.join(out, "index.html")).read()
    assert "class='warn'" in page and "hidden_size" in page
    s = json.load(open(os.path.join(out, "summary.json")))
    assert s["allowed_differences"] == ["model"]
    bare = _write_run(str(tmp_path / "bare"), "E", 1, metadata=False)
    assert compare_runs.main([runs["A"], bare, "--out", out]) == 2
    assert "no run_metadata.json" in capsys.readouterr().err
    assert compare_runs.main([runs["A"], runs["C"], "--out", out, "--noise", "A", "Z"]) == 2
    assert compare_runs.main([runs["A"], runs["C"], "--out", out, "--allow-different", "colour"]) == 2


def test_run_report_one_run(runs, single):
    out = single
    s = json.load(open(os.path.join(out, "summary.json")))
    r = s["runs"]["A"]
    tb = _tb(runs["A"])
    assert r["iterations"] == STEPS and r["lm loss last"] == tb["lm loss"][STEPS]
    assert r["MFU median (logged, own peak)"] == statistics.median(tb["mfu"].values())
    assert r["time_to_target"]["target"] == TARGET and s["verdict"] == [] and s["noise"] is None
    assert os.path.getsize(os.path.join(out, "loss.png")) > 1000


# -- the browser -----------------------------------------------------------------------------------------------
def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _browser(url_path, *flags):
    exe = _chromium()
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--virtual-time-budget=5000",
           *flags, "file://" + url_path]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _figures_in_dom(dom):
    import re
    body = re.search(r"<body([^>]*)>", dom).group(1)
    attrs = dict(re.findall(r'(data-[a-z-]+)="([^"]*)"', body))
    imgs = [dict(re.findall(r'(data-[a-z-]+|src)="([^"]*)"', m)) for m in re.findall(r"<img[^>]*>", dom)]
    return attrs, imgs


def test_reports_in_a_real_browser(compared, single, tmp_path):
    if _chromium() is None:
        pytest.skip("no Chromium on this machine (apt-get install chromium; .ci/run installs it when it can): "
                    "the browser check of the reports did not run")
    from matplotlib.image import imread
    for out in (compared[0], single):
        page = os.path.join(out, "index.html")
        r = _browser(page, "--window-size=1280,1000", "--dump-dom")  # the screenshot's width: same layout
        assert r.returncode == 0, r.stderr[-2000:]
        attrs, imgs = _figures_in_dom(r.stdout)
        figs = json.load(open(os.path.join(out, "summary.json")))["figures"]
        assert int(attrs["data-figures"]) == len(figs) == len(imgs) > 5
        assert attrs["data-figures-failed"] == "0"
        assert all(int(i["data-natural-width"]) > 0 for i in imgs)
        height = int(attrs["data-page-height"])
        shot = str(tmp_path / "shot.png")
        r = _browser(page, "--window-size=1280,%d" % height, f"--screenshot={shot}")
        assert r.returncode == 0 and os.path.exists(shot), r.stderr[-2000:]
        px = imread(shot)[..., :3]
        for i in imgs:
            x, y, w, h = (int(v) for v in i["data-rect"].split(","))
            assert w > 200 and h > 150, i
            region = px[y + 5:y + h - 5, x + 5:x + w - 5]
            assert region.shape[0] > 100, (i, px.shape)
            # a drawn figure: not blank, and holds coloured (non-grey) pixels of the plotted lines / image
            assert region.std() > 0.05, i["src"]
            chroma = region.max(axis=-1) - region.min(axis=-1)
            assert (chroma > 0.3).mean() > 0.001, i["src"]
    # a figure that cannot load is named on the page and counted (the check can fail)
    broken = str(tmp_path / "broken")
    shutil.copytree(single, broken)
    os.remove(os.path.join(broken, "loss.png"))
    dom = _browser(os.path.join(broken, "index.html"), "--window-size=1280,1000", "--dump-dom").stdout
    attrs, imgs = _figures_in_dom(dom)
    assert attrs["data-figures-failed"] == "1"
    assert [i["src"] for i in imgs if i["data-natural-width"] == "0"] == ["loss.png"]
