"""Analytic planner: exact model-state memory, activation memory, communication volume and step time of a
layout, and a search over layouts (tools/plan.py). See docs/PLANNER.md.

Modules: params (exact parameter counts per rank), memory (bytes per rank), comm (collective payloads and
their time), step_time (FLOPs, bubble, exposed communication), enumerate (evaluate / search), presets, report.
"""
from .enumerate import MemoryOptions, Plan, evaluate, search  # noqa: F401
from .layout import Cluster, Layout  # noqa: F401
from .memory import ActivationOptions, Precision, model_state_bytes  # noqa: F401
from .params import rank_params, stage_split, total_params  # noqa: F401
