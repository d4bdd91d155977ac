"""GPU catalog: the per-type figures the roofline cost model needs, each with its public source.

Figures are dense (no structured sparsity) BF16/FP16 tensor TFLOP/s, memory as the driver reports it
(GiB), memory bandwidth (GB/s, 1e9 bytes/s) and the intra-node GPU-to-GPU link per direction (GB/s):
NVLink figures are the datasheet's total bidirectional bandwidth halved; PCIe figures are the x16
slot's one-direction rate (consumer cards without peer-to-peer go through host memory, so a lower
effective figure is used and said so). ``ref_price`` is a reference spot-or-community $/h per GPU
taken from the catalog snapshot in ``shared/data/catalogs`` (2026-11-28); it is used only to put a
price on pools the user already owns (``--pool``) and for the built-in offer table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


class UnknownGpu(ValueError):
    """A GPU type the catalog has no figures for."""


@dataclass(frozen=True)
class GpuSpec:
    """Peak figures of one accelerator type (or of a calibrated CPU, for the cost-model check)."""

    name: str
    tflops: float  # dense bf16/fp16 tensor TFLOP/s
    memory_gib: float  # usable device memory as the driver reports it
    mem_gbs: float  # memory bandwidth, GB/s
    link_gbs: float  # intra-node GPU<->GPU, per direction, GB/s
    link: str  # what that link is
    source: str  # where the figures come from
    ref_price: float = 0.0  # reference $/h per GPU (see module docstring)
    bf16: bool = True  # False: fp16 only (T4, V100, Turing)
    # What the serving stack sustains of the datasheet, relative to what NVIDIA parts sustain (the cost
    # model's efficiency factors are NVIDIA-calibrated, so 1.0 for them): see the MI300X entry.
    compute_derate: float = 1.0
    memory_derate: float = 1.0

    @property
    def flops(self) -> float:
        return self.tflops * 1e12

    @property
    def mem_bytes_per_s(self) -> float:
        return self.mem_gbs * 1e9

    @property
    def sustained_flops(self) -> float:
        """Datasheet FLOP/s x this part's derate (what the cost model's efficiency factor applies to)."""
        return self.tflops * 1e12 * self.compute_derate

    @property
    def sustained_mem_bytes_per_s(self) -> float:
        return self.mem_gbs * 1e9 * self.memory_derate

    @property
    def memory_bytes(self) -> float:
        return self.memory_gib * 2**30

    @property
    def link_bytes_per_s(self) -> float:
        return self.link_gbs * 1e9


NV = "https://www.nvidia.com/en-us/data-center/"
_PCIE4 = ("PCIe 4.0 x16", 32.0)
_PCIE5 = ("PCIe 5.0 x16", 64.0)
_PCIE4_NOP2P = ("PCIe 4.0 x16, no P2P (through host)", 25.0)


def _g(name: str, tflops: float, mem: float, bw: float, link: tuple[str, float], src: str, price: float,
       bf16: bool = True, derate: tuple[float, float] = (1.0, 1.0)) -> GpuSpec:
    return GpuSpec(name, tflops, mem, bw, link[1], link[0], src, price, bf16, *derate)


GPUS: dict[str, GpuSpec] = {
    g.name: g
    for g in [
        _g("B200", 2250.0, 179.0, 7700.0, ("NVLink 5 (1.8 TB/s total)", 900.0),
           NV + "dgx-b200/ (72 PFLOPS FP8 sparse per 8 GPUs -> 2.25 PFLOPS BF16 dense per GPU; 1.44 TB, 62 TB/s)",
           4.99),
        _g("H200", 989.5, 140.4, 4800.0, ("NVLink 4 (900 GB/s total)", 450.0),
           NV + "h200/ (1,979 TFLOPS BF16 with sparsity; 141 GB HBM3e, 4.8 TB/s)", 2.47),
        _g("GH200", 989.5, 94.5, 4000.0, ("NVLink-C2C to Grace (single GPU)", 450.0),
           NV + "grace-hopper-superchip/ (H100 compute, 96 GB HBM3, 4 TB/s)", 1.49),
        _g("H100", 989.5, 79.6, 3350.0, ("NVLink 4 (900 GB/s total)", 450.0),
           NV + "h100/ (SXM5: 1,979 TFLOPS BF16 sparse, 80 GB, 3.35 TB/s)", 2.69),
        _g("H100-PCIE", 756.5, 79.6, 2000.0, _PCIE5,
           NV + "h100/ (PCIe: 1,513 TFLOPS BF16 sparse, 80 GB, 2 TB/s)", 2.0),
        _g("H100-NVL", 835.5, 93.0, 3900.0, _PCIE5,
           NV + "h100/ (NVL: 1,671 TFLOPS BF16 sparse, 94 GB, 3.9 TB/s)", 2.59),
        _g("A100-80GB", 312.0, 79.2, 2039.0, ("NVLink 3 (600 GB/s total)", 300.0),
           NV + "a100/ (SXM 80GB: 312 TFLOPS BF16 dense, 2,039 GB/s)", 1.39),
        _g("A100-80GB-PCIE", 312.0, 79.2, 1935.0, _PCIE4,
           NV + "a100/ (PCIe 80GB: 312 TFLOPS BF16 dense, 1,935 GB/s)", 1.19),
        _g("A100", 312.0, 39.4, 1555.0, ("NVLink 3 (600 GB/s total)", 300.0),
           NV + "a100/ (40GB: 312 TFLOPS BF16 dense, 1,555 GB/s)", 1.29),
        _g("L40S", 362.05, 44.5, 864.0, _PCIE4,
           NV + "l40s/ (362.05 TFLOPS BF16 dense, 48 GB GDDR6, 864 GB/s)", 0.86),
        _g("L40", 181.05, 44.5, 864.0, _PCIE4,
           "https://images.nvidia.com/content/Solutions/data-center/vgpu-L40-datasheet.pdf (181.05 BF16 dense)", 0.69),
        _g("A40", 149.7, 44.5, 696.0, _PCIE4,
           "https://images.nvidia.com/content/Solutions/data-center/a40/nvidia-a40-datasheet.pdf (149.7 BF16)", 0.40),
        _g("RTXA6000", 154.8, 47.5, 768.0, _PCIE4,
           "https://www.nvidia.com/content/dam/en-zz/Solutions/design-visualization/quadro-product-literature/"
           "proviz-print-nvidia-rtx-a6000-datasheet-us-nvidia-1454980-r9-web%20(1).pdf (309.7 sparse)", 0.49),
        _g("RTX6000-Ada", 364.2, 47.5, 960.0, _PCIE4,
           "https://www.nvidia.com/en-us/design-visualization/rtx-6000/ (1,457 FP8 TOPS sparse -> 364 BF16 dense)",
           0.77),
        _g("RTX6000", 130.5, 23.6, 672.0, ("PCIe 3.0 x16", 16.0),
           "https://www.nvidia.com/content/dam/en-zz/Solutions/design-visualization/quadro-product-literature/"
           "quadro-rtx-6000-us-nvidia-704093-r4-web.pdf (Quadro RTX 6000, 130.5 FP16 tensor)", 0.50, bf16=False),
        _g("L4", 121.0, 22.5, 300.0, _PCIE4,
           NV + "l4/ (242 TFLOPS BF16 sparse, 24 GB, 300 GB/s)", 0.43),
        _g("A10G", 70.0, 22.0, 600.0, _PCIE4,
           "https://www.baseten.co/blog/nvidia-a10-vs-a10g-for-ml-model-inference/ (A10G: 70 TFLOPS BF16 tensor, "
           "24 GB, 600 GB/s)", 1.006),
        _g("A10", 125.0, 22.5, 600.0, _PCIE4,
           NV + "products/a10-gpu/ (250 TFLOPS BF16 sparse, 24 GB, 600 GB/s)", 0.75),
        _g("RTX5090", 209.5, 31.4, 1792.0, ("PCIe 5.0 x16, no P2P (through host)", 40.0),
           "https://images.nvidia.com/aem-dam/Solutions/geforce/blackwell/nvidia-rtx-blackwell-gpu-architecture.pdf "
           "(209.5 BF16 w/ FP32 acc dense)", 0.69),
        _g("RTX4090", 165.2, 23.6, 1008.0, _PCIE4_NOP2P,
           "https://images.nvidia.com/aem-dam/Solutions/geforce/ada/nvidia-ada-gpu-architecture.pdf "
           "(165.2 BF16 w/ FP32 acc dense, 1,008 GB/s)", 0.34),
        _g("RTX3090", 71.0, 23.6, 936.0, _PCIE4_NOP2P,
           "https://www.nvidia.com/content/PDF/nvidia-ampere-ga-102-gpu-architecture-whitepaper-v2.pdf "
           "(71 BF16 w/ FP32 acc dense, 936 GB/s)", 0.22),
        _g("T4", 65.0, 14.6, 320.0, ("PCIe 3.0 x16", 12.0),
           NV + "tesla-t4/ (65 TFLOPS FP16 mixed precision, 16 GB, 320 GB/s)", 0.35, bf16=False),
        _g("V100", 125.0, 15.8, 900.0, ("NVLink 2 (300 GB/s total)", 150.0),
           NV + "v100/ (SXM2: 125 TFLOPS tensor FP16, 16 GB, 900 GB/s)", 0.55, bf16=False),
        _g("V100-32GB", 125.0, 31.7, 900.0, ("NVLink 2 (300 GB/s total)", 150.0),
           NV + "v100/ (SXM2 32GB: 125 TFLOPS tensor FP16, 900 GB/s)", 0.75, bf16=False),
        # Derated: public measurements put MI300X's sustained BF16 GEMM rate at about 45-50% of its datasheet
        # (SemiAnalysis, "MI300X vs H100 vs H200 Benchmark Part 1", Dec 2024: ~620 of 1,307 TFLOP/s; also
        # https://aiweekly.co/alerts/amd-mi300x-hits-only-45-of-peak-flops-in-practice: ~45% of peak FLOPs,
        # ~81% of peak memory bandwidth) where Hopper sustains ~75% (an H200 here: 745-798 of 989.5 TFLOP/s
        # on 8192^3 bf16, ~87-91% of its HBM bandwidth): 0.48 / 0.75 ~ 0.65 of compute and 0.81 / 0.89 ~ 0.9
        # of memory relative to the NVIDIA-calibrated efficiency factors. Estimates, not a measurement here.
        _g("MI300X", 1307.4, 191.5, 5300.0, ("Infinity Fabric (448 GB/s total peer)", 224.0),
           "https://www.amd.com/en/products/accelerators/instinct/mi300/mi300x.html (1,307.4 BF16 dense, 192 GB)",
           2.49, derate=(0.65, 0.9)),
    ]
}

# Spellings seen in SkyPilot catalogs (AWS, GCP, Lambda, RunPod, Vast) and in user input.
_ALIASES: dict[str, str] = {
    "H100SXM": "H100", "H100SXM5": "H100", "H100-SXM": "H100", "H100PCIE": "H100-PCIE", "H100NVL": "H100-NVL",
    "H200SXM": "H200", "H200-SXM": "H200", "A10080GB": "A100-80GB", "A10080GBSXM": "A100-80GB",
    "A10080GBPCIE": "A100-80GB-PCIE", "A10040GB": "A100", "A100SXM4": "A100", "A100-40GB": "A100",
    "A6000": "RTXA6000", "RTXA6000": "RTXA6000", "RTX6000ADA": "RTX6000-Ada", "L40S": "L40S", "L40": "L40",
    "RTX4090": "RTX4090", "GEFORCERTX4090": "RTX4090", "4090": "RTX4090", "RTX3090": "RTX3090", "3090": "RTX3090",
    "RTX5090": "RTX5090", "V10032GB": "V100-32GB", "V100": "V100", "T4": "T4", "L4": "L4", "A10G": "A10G",
    "A10": "A10", "A40": "A40", "B200": "B200", "GH200": "GH200", "MI300X": "MI300X", "RTX6000": "RTX6000",
}


def _key(name: str) -> str:
    return re.sub(r"[^A-Z0-9]", "", name.upper().replace("NVIDIA", ""))


_BY_KEY = {_key(k): v for k, v in _ALIASES.items()} | {_key(n): n for n in GPUS}


def canonical_gpu(name: str, memory_gib: float | None = None, instance_type: str = "") -> str:
    """Catalog name for a GPU as a cloud catalog or a user spells it; raises UnknownGpu.

    Some clouds use one name for two parts: Lambda's and Vast's ``A100`` is 40 or 80 GB, and
    ``H100`` is SXM or PCIe; the memory size or the instance type name decides.
    """
    key = _key(name)
    if key not in _BY_KEY:
        raise UnknownGpu(f"unknown GPU type {name!r}; known: {', '.join(sorted(GPUS))}")
    canon = _BY_KEY[key]
    itype = instance_type.lower()
    if canon == "A100" and memory_gib is not None and memory_gib > 60:
        canon = "A100-80GB"
    if canon == "H100" and "pcie" in itype:
        canon = "H100-PCIE"
    if canon == "H100" and ("nvl" in itype or (memory_gib is not None and memory_gib > 85)):
        canon = "H100-NVL"  # 94 GB, e.g. Vast's H100_NVL instances list their accelerator as H100
    if canon == "V100" and memory_gib is not None and memory_gib > 20:
        canon = "V100-32GB"
    return canon


def gpu_spec(name: str, memory_gib: float | None = None) -> GpuSpec:
    """Figures for a GPU type by any known spelling; raises UnknownGpu."""
    return GPUS[canonical_gpu(name, memory_gib)]
