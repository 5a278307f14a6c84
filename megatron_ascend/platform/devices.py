"""The device table: every per-device figure a plan or an MFU figure depends on, each with its source and grade.

One ``DeviceSpec`` per device: dense bf16 TFLOP/s, HBM GiB, HBM TB/s, devices per node (the fast-interconnect
domain), intra-node and inter-node GB/s per device. ``tools/plan.py --device``, the planner presets and
the trainer's MFU peak (``peak_flops.peak_tflops`` -> ``monitoring.throughput.resolve_peak_tflops``) all read
this table; nothing else holds a device figure.

Conventions (the same for every row):
* TFLOP/s: dense bf16 tensor throughput (vendor "with sparsity" figures halved).
* HBM GiB: the vendor's "GB" figure read as GiB. HBM is sold in binary-sized stacks (H100: 5 x 16 GiB); the
  runtime shows 0.4-0.6 % less (H100 81,559 MiB), which the planner's usable fraction (95 %) covers.
* Bandwidths are per device and per direction, vendor peak: a bidirectional NVLink / HCCS total is halved; a
  NIC's Gb/s is divided by 8. Measured collective bandwidth is lower (DeepEP reaches 153-158 of the H800's
  200 GB/s NVLink); the planner costs communication at these peaks, compute at an assumed efficiency.
* Ascend 910C is listed per *die*: one 910C package is two dies, each a logical device (an A3 node shows 16).

Grades (the scheme of ../shared/reference/ascend_npu.md §0, used for every device):
* H: stated in the vendor's own document or the project's primary references, taken as is;
* M: derived by arithmetic from such a statement (sparse -> dense, per system -> per device, per package ->
  per die, bidirectional -> one direction), or a platform figure that depends on the deployment;
* L: only third-party or secondary sources, or sources that disagree. Measure and override (plan.py flags,
  --peak-tflops) before trusting a plan built on an L figure.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from ..config import ConfigError

GRADES = ("H", "M", "L")


@dataclass(frozen=True)
class Figure:
    value: float
    grade: str  # H | M | L
    source: str  # document + section or URL, and the arithmetic when derived

    def __post_init__(self):
        if self.grade not in GRADES:
            raise ValueError(f"grade {self.grade!r} is not one of {GRADES}")


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    description: str
    tflops: Figure  # dense bf16 peak per device
    hbm_gib: Figure
    hbm_tbps: Figure
    devices_per_node: Figure  # the fast-interconnect domain (NVLink / HCCS / UB)
    intra_node_gbps: Figure  # GB/s per device, one direction
    inter_node_gbps: Figure  # GB/s per device, one direction (IB / RoCE NIC)
    aliases: Tuple[str, ...] = ()  # other names the runtime reports (torch_npu / CUDA device names)

    FIGURES = ("tflops", "hbm_gib", "hbm_tbps", "devices_per_node", "intra_node_gbps", "inter_node_gbps")

    def figures(self) -> Dict[str, Figure]:
        return {k: getattr(self, k) for k in self.FIGURES}

    def values(self) -> Dict[str, float]:
        """Plain numbers, keyed like planner.layout.Cluster's fields (devices_per_node as an int)."""
        out = {k: f.value for k, f in self.figures().items()}
        out["devices_per_node"] = int(out["devices_per_node"])
        return out


# -- sources used by several rows ------------------------------------------------------------------------
_H100_DS = ("NVIDIA H100 Tensor Core GPU datasheet, 'Technical Specifications', H100 SXM column "
            "(https://www.nvidia.com/en-us/data-center/h100/); table read verbatim in "
            "https://archive-lib.hpctech.co.jp/gpuproduct/nvidia-h100.html")
_H200_DS = ("NVIDIA H200 Tensor Core GPU product page, 'Specifications', H200 SXM (https://www.nvidia.com/en-us/"
            "data-center/h200/); same figures in MLCommons inference v4.1 "
            "NVIDIA/systems/H200-SXM-141GBx8_TRT_MaxQ.json")
_A100_DS = ("NVIDIA A100 Tensor Core GPU datasheet, 'Specifications', A100 80GB SXM column "
            "(https://www.nvidia.com/en-us/data-center/a100/)")
_B200_DS = ("NVIDIA DGX B200 / HGX B200 specifications (https://www.nvidia.com/en-us/data-center/dgx-b200/); "
            "per-GPU figures in MLCommons inference v6.0 Nebius/systems/nebius_b200_n1.json")
_GB200_DS = ("NVIDIA GB200 NVL72 specifications (https://www.nvidia.com/en-us/data-center/gb200-nvl72/); "
             "per-GPU memory in MLCommons inference v6.1 Crusoe/systems/GB200-NVL72_GB200-186GB_aarch64x16_Dynamo.json")
_DSV3 = "DeepSeek-V3 technical report (arXiv 2412.19437) §3.1-3.2, as quoted in deepseek_architecture.md §7"
_A2 = "ascend_npu.md §10 (Atlas 800T A2)"
_SKU = ("Ascend op-MFU-calculator skill text (https://www.skill4agent.com/en/skill/ascend-ai-coding-awesome-"
        "ascend-skills/external-mindstudio-op-mfu-calculator), performance_reliability_anchors.md §A3; no Huawei "
        "datasheet in the corpora. MindSpeed's simulator assumes 280 (mindspeed/core/memory/compress/utils.py), "
        "a measured 910B bf16 GEMM reached 328 (gameofdimension/limulidae)")
_910B_HBM_BW = ("ascend_npu.md §10 ('~1.6 TB/s, commonly quoted; secondary sources disagree': 0.4 TB/s on "
                "boardor.com, 1.2 TB/s on oryoy.com); took the commonly quoted figure. It only times the Adam step")
_910B_HCCS = ("ascend_npu.md §10: HCCS full mesh, 7 links x 56 GB/s = 392 GB/s per NPU, read as both directions "
              "-> 196 GB/s one way; a measured 8-card all_gather bus bandwidth of 149 GB/s (limulidae README) "
              "fits 196, not 392, per direction")
_910B_NIC = ("ascend_npu.md §10: RoCE v2 on the NPU, typically 8 x 200 GbE per A2 server = one 200 Gb/s port per "
             "NPU -> 25 GB/s")


def _fig(value, grade, source):
    return Figure(float(value), grade, source)


def _nvidia(name, description, tflops, hbm, bw, node, intra, inter, aliases=()):
    return DeviceSpec(name, description, _fig(*tflops), _fig(*hbm), _fig(*bw), _fig(*node), _fig(*intra),
                      _fig(*inter), tuple(aliases))


def _ascend_910b(sku, tflops, hbm, bw, aliases=()):
    return DeviceSpec(
        f"Ascend910{sku}", f"Ascend 910{sku} (Atlas 800T A2, 8 NPUs per node)",
        _fig(tflops, "L", f"910{sku} bf16/fp16 peak from the {_SKU}"),
        hbm, bw,
        _fig(8, "H", f"{_A2}: 8 x 910B per Atlas 800T A2 node; MindSpeed-LLM A2 scripts NPUS_PER_NODE=8"),
        _fig(196, "L", _910B_HCCS),
        _fig(25, "L", _910B_NIC), tuple(aliases))


_HBM_64 = _fig(64, "M", f"{_A2}: MindSpeed / MindSpeed-LLM require >= 64 GB per NPU (H); per-SKU capacity M")
_BW_16 = _fig(1.6, "L", _910B_HBM_BW)

DEVICES: Dict[str, DeviceSpec] = {d.name: d for d in (
    _ascend_910b("B1", 378.9, _HBM_64, _BW_16),
    _ascend_910b("B2", 353.9, _HBM_64, _BW_16, aliases=("Ascend910B2C",)),
    _ascend_910b("B3", 294.9, _HBM_64, _BW_16),
    _ascend_910b("B4", 270.0,
                 _fig(32, "L", "ascend_npu.md §10 ('some sources give 32 GB for 910B4'); oryoy.com lists a 32 GB "
                               "HBM2E 910B part"),
                 _fig(1.2, "L", "oryoy.com (32 GB HBM2E part: 1.2 TB/s); no Huawei figure for the 910B4")),
    DeviceSpec(
        "Ascend910C", "Ascend 910C, one die (a 910C package is two dies = two logical devices; A3 node = 16)",
        _fig(376, "L", "CloudMatrix384 paper (arXiv 2506.12708) as summarised on reportify.ai/social-media/"
                       "688413268697636: 752 TFLOPS bf16 dense per dual-die 910C -> 376 per die. ascend_npu.md §10 "
                       "derives ~390 per die from CM384's ~300 PFLOPS / 384 (M/L): took the per-package figure"),
        _fig(64, "M", "ascend_npu.md §10: ~48 TB HBM per CloudMatrix384 / 384 packages = ~128 GB per 910C -> "
                      "64 per die (4 x 16 GiB HBM2E stacks)"),
        _fig(1.6, "L", "ascend_npu.md §10: TechPowerUp quotes 3.2 TB/s per 910C (8 x HBM2E) -> 1.6 per die"),
        _fig(16, "H", "ascend_npu.md §10: an A3 node shows 16 devices (hiascend MindCluster, Atlas 800T A3 / "
                      "Atlas 900 A3 SuperPoD); MindSpeed-LLM A3 scripts NPUS_PER_NODE=16"),
        _fig(196, "L", "784 GB/s per 910C package both ways (besthub.dev roadmap article) -> 392 one way -> 196 "
                       "per die; the CloudMatrix384 analysis on chinaresearchcollective.substack.com quotes 'UB "
                       "196 GB/s / NPU'. ascend_npu.md §10 gives 196-392 and says measure. Inside one A3 SuperPoD "
                       "every die is on UB: pass --inter-node-gbps 196 to model that"),
        _fig(25, "L", "one 200 Gb/s RoCE port per die (the A2 rate; ascend_npu.md §10). The same CM384 analysis "
                      "gives a 76.8 Tb/s RDMA plane for 384 packages = 12.5 GB/s per die; both are third-party"),
        aliases=("Ascend910_9391", "Ascend910_9392", "Ascend910_9381", "Ascend910_9382")),
    _nvidia("H100", "NVIDIA H100 SXM5 80 GB (HGX / DGX H100)",
            (989, "M", f"{_H100_DS}: BF16 Tensor Core 1,979 TFLOPS with sparsity, 'specifications 1/2 lower "
                       "without sparsity' -> 989.4"),
            (80, "H", f"{_H100_DS}: GPU memory 80 GB HBM3 (5 stacks)"),
            (3.35, "H", f"{_H100_DS}: GPU memory bandwidth 3,350 GB/s"),
            (8, "H", "DGX H100 / HGX H100: 8 GPUs on one NVSwitch baseboard"),
            (450, "M", f"{_H100_DS}: NVLink 900 GB/s (both directions, 18 links) -> 450 one way"),
            (50, "M", "DGX H100: 8 x ConnectX-7 400 Gb/s, one per GPU -> 50 GB/s; Megatron-MoE-ModelZoo H100 runs "
                      "state 'InfiniBand 8x50 GB/s' (best_practice/Qwen3/readme.md)"),
            aliases=("H100 SXM", "H100-SXM", "H100 80GB HBM3")),
    _nvidia("H200", "NVIDIA H200 SXM 141 GB (HGX / DGX H200)",
            (989, "M", f"{_H200_DS}: the H100's GH100 compute (BF16 1,979 TFLOPS with sparsity) -> 989.4 dense"),
            (141, "H", f"{_H200_DS}: 141 GB HBM3e"),
            (4.8, "H", f"{_H200_DS}: 4.8 TB/s"),
            (8, "H", "HGX H200: 8 GPUs per baseboard (MLCommons system file above: accelerators_per_node 8)"),
            (450, "M", f"{_H200_DS}: NVLink 900 GB/s both ways -> 450 one way"),
            (50, "M", "one 400 Gb/s ConnectX-7 per GPU as on DGX H100 -> 50 GB/s (deployment-dependent)")),
    _nvidia("H800", "NVIDIA H800 SXM5 80 GB (the export H100: NVLink cut to 400 GB/s, FP64 cut)",
            (989, "M", "H100 SXM5 tensor throughput (the export limits cut NVLink and FP64, not bf16; "
                       "performance_reliability_anchors.md §A1 uses 989 as the H800 bf16 peak)"),
            (80, "M", f"{_DSV3}: H800 80 GB, the H100 SXM5's memory"),
            (3.35, "M", f"{_H100_DS}: the H100 SXM5's HBM3 system, unchanged on the H800"),
            (8, "H", f"{_DSV3}: 'each node contains 8 GPUs connected by NVLink and NVSwitch'"),
            (200, "M", "H800 NVLink 400 GB/s both ways (philisun.com H800 vs H100 analysis) -> 200 one way. "
                       f"{_DSV3} states 160 GB/s, what DeepSeek's kernels reach (DeepEP measures 153-158): took "
                       "the vendor peak, the rule for every row"),
            (50, "H", f"{_DSV3}: InfiniBand 50 GB/s per GPU (ConnectX-7 400 Gb/s)")),
    _nvidia("H20", "NVIDIA H20 96 GB (the export Hopper for China)",
            (148, "L", "huggingface.co/hardware/h20 (TFLOPS 148) and willitrunai.com/es/gpus/h20-96gb "
                       "(148 TFLOPS FP16 dense); no NVIDIA datasheet in the corpora"),
            (96, "L", "willitrunai.com/es/gpus/h20-96gb: 96 GB HBM3 (a 141 GB variant also exists)"),
            (4.0, "L", "willitrunai.com/es/gpus/h20-96gb: 4.0 TB/s"),
            (8, "M", "HGX H20: the 8-GPU NVSwitch baseboard of every SXM Hopper part (as HGX H100 / DGX H100)"),
            (450, "L", "willitrunai.com/es/gpus/h20-96gb: NVLink 4.0 900 GB/s retained -> 450 one way"),
            (50, "L", "one 400 Gb/s NIC per GPU, as on HGX H100 (deployment-dependent)")),
    _nvidia("A100", "NVIDIA A100 SXM4 80 GB (HGX / DGX A100)",
            (312, "M", f"{_A100_DS}: BF16 Tensor Core 624 TFLOPS with sparsity -> 312 dense"),
            (80, "H", f"{_A100_DS}: 80 GB HBM2e"),
            (2.039, "H", f"{_A100_DS}: 2,039 GB/s"),
            (8, "H", "DGX A100 user guide (DU-09821-001), 'Hardware Overview': 8 x A100"),
            (300, "M", f"{_A100_DS}: NVLink 600 GB/s both ways -> 300 one way"),
            (25, "M", "DGX A100: 8 x ConnectX-6 200 Gb/s HDR, one per GPU -> 25 GB/s"),
            aliases=("A100-SXM4", "A100 SXM")),
    _nvidia("A800", "NVIDIA A800 SXM4 80 GB (the export A100: NVLink cut to 400 GB/s)",
            (312, "M", f"{_A100_DS}: the A100's compute (export limit is NVLink) -> 312 dense"),
            (80, "M", f"{_A100_DS}: the A100 80 GB's memory"),
            (2.039, "M", f"{_A100_DS}: the A100 80 GB SXM's 2,039 GB/s"),
            (8, "M", "HGX A800: the 8-GPU NVSwitch baseboard of the SXM A100 (as DGX A100, DU-09821-001)"),
            (200, "L", "A800 NVLink 400 GB/s both ways (secondary sources) -> 200 one way"),
            (25, "L", "one 200 Gb/s NIC per GPU, as on DGX A100 (deployment-dependent)")),
    _nvidia("B200", "NVIDIA B200 180 GB (HGX / DGX B200)",
            (2250, "M", f"{_B200_DS}: HGX B200 FP16/BF16 36 PFLOPS with sparsity for 8 GPUs -> 2.25 PFLOPS dense "
                        "per GPU (torchtitan's get_peak_flops uses 2.25e15)"),
            (180, "H", f"{_B200_DS}: 1,440 GB for 8 GPUs; nebius_b200_n1.json: accelerator_memory_capacity 180 GB"),
            (8.0, "M", f"{_B200_DS}: HGX B200 64 TB/s for 8 GPUs -> 8 TB/s (later NVIDIA pages say 7.7)"),
            (8, "H", f"{_B200_DS}: 8 GPUs per DGX / HGX B200"),
            (900, "M", f"{_B200_DS}: '18x 5th Gen NVLink, 14.4 TB/s aggregated' for 8 -> 1.8 TB/s per GPU both "
                       "ways -> 900 one way"),
            (50, "M", f"{_B200_DS}: '8x ConnectX-7 IB NDR 400Gb/s' -> 50 GB/s per GPU")),
    _nvidia("GB200", "NVIDIA GB200 (Blackwell GPU of a GB200 NVL72 rack, 186 GB)",
            (2500, "M", f"{_GB200_DS}: NVL72 FP16/BF16 360 PFLOPS with sparsity for 72 GPUs -> 2.5 PFLOPS dense "
                        "per GPU (torchtitan's get_peak_flops uses 2.5e15)"),
            (186, "H", f"{_GB200_DS}: accelerator_memory_capacity 186 GB"),
            (8.0, "M", f"{_GB200_DS}: NVL72 576 TB/s HBM3e for 72 GPUs -> 8 TB/s"),
            (72, "M", f"{_GB200_DS}: one NVLink domain of 72 GPUs (a compute tray holds 4); the planner's 'node' "
                      "is the NVLink domain"),
            (900, "M", f"{_GB200_DS}: NVLink 5 1.8 TB/s per GPU both ways -> 900 one way"),
            (50, "L", "one ConnectX-7 400 Gb/s per GPU (the MLCommons GB200 system lists 4 ConnectX-7 per 4-GPU "
                      "tray; deployment-dependent)")),
)}


def _key(name: str) -> str:
    return name.replace(" ", "").replace("-", "").replace("_", "").lower()


def _names() -> Dict[str, str]:
    """Normalised name or alias -> table key."""
    out = {}
    for d in DEVICES.values():
        for n in (d.name,) + d.aliases:
            out[_key(n)] = d.name
    return out


def known_devices() -> Tuple[str, ...]:
    return tuple(DEVICES)


def find_device(device_name: Optional[str]) -> Optional[DeviceSpec]:
    """The table entry for a name as a user or the runtime spells it, or None.

    An exact name or alias (case, spaces, '-' and '_' ignored) wins; otherwise the longest table name contained
    in it ("NVIDIA H100 80GB HBM3" -> H100, "NVIDIA GB200" -> GB200 not B200, "Ascend910_9391" -> Ascend910C)."""
    if not device_name:
        return None
    names = _names()
    k = _key(device_name)
    if k in names:
        return DEVICES[names[k]]
    hits = [n for n in names if n and n in k]
    if not hits:
        return None
    return DEVICES[names[max(hits, key=len)]]


def device_spec(device_name: str) -> DeviceSpec:
    """``find_device`` or one ConfigError naming the device and listing the known ones."""
    spec = find_device(device_name)
    if spec is None:
        raise ConfigError(f"device {device_name!r} is not in the device table (megatron_ascend/platform/"
                          f"devices.py); known devices: {', '.join(known_devices())}. For another device leave "
                          f"--device out and pass every figure: --tflops --hbm-gib --hbm-tbps --devices-per-node "
                          f"--intra-node-gbps --inter-node-gbps")
    return spec


def table_rows() -> Tuple[Tuple[str, str, float, str, str], ...]:
    """(device, figure, value, grade, source) for every entry: what docs/PLANNER.md's device table prints."""
    return tuple((d.name, k, f.value, f.grade, f.source) for d in DEVICES.values() for k, f in d.figures().items())

