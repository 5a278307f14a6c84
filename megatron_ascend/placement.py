"""Layer placement: which pipeline stage (and virtual stage) holds which part of the model.

The one function everything positional derives from: the trainer builds each model chunk from it (its layers,
``pre_process``, ``post_process``, MTP), the embedding group is the pipeline ranks it puts an embedding copy
on, the logging rank and the loss source are the rank that holds the loss. Pure Python on the config values
(no torch): config.validate_all runs it before any work starts, tools/show_layout.py prints it.

    p = place(num_layers, pp, vp=None, mtp_layers=0, layout=None, num_layer_list=(), noop_layers=(),
              first=None, last=None, tied=False)           # or placement_of(model_cfg, parallel_cfg)
    p.chunks(pp_rank)     -> [Stage for vp_rank 0 .. vp-1]  (a Stage: layer_ids, embedding, mtp, loss, ...)
    p.loss_pp_rank, p.embedding_pp_ranks, p.vp, p.format()

Parts, with Megatron-Core's layout letters: ``E`` the word embedding, ``t`` one decoder layer, ``m`` one MTP
depth, ``L`` the output head and the loss. Virtual stage ``k`` (model order) runs on pipeline rank ``k % pp`` as
its chunk ``k // pp`` (Megatron's interleaved assignment). ``E`` opens stage 0 and ``L`` closes the last stage
(the schedules feed stage 0 from the data and take the loss from the last stage), decoder layers come in
model order, and every MTP depth sits in one stage after the last decoder layer. The final norm runs where the
decoder stack ends: on the MTP stage when there is one, else on the loss stage.

Where the placement comes from (one of, checked in this order):

* ``layout`` -- ``--pipeline-model-parallel-layout``, Megatron-Core's string: stages separated by ``|``,
  ``X*n`` repeats a letter, ``(...)*n`` repeats a group (groups may nest), commas and spaces are cosmetic.
  ``"Et*3|(tt|)*29,m|L"`` is DeepSeek-V3's 61 layers on 32 virtual stages (PP 16 x VP 2): the embedding and 3
  layers, 29 stages of 2 layers, then MTP alone and the head + loss alone. VP = number of stages / PP.
  An MTP stage before the loss stage ("standalone" MTP) sends the main hidden states and each depth's hidden
  states concatenated along the sequence; the loss stage splits them.
* ``num_layer_list`` -- MindSpeed's ``--num-layer-list``: layer slots per pipeline stage (``pp`` numbers, each
  split evenly over its ``vp`` chunks) or per virtual stage in model order (``pp x vp`` numbers).
* ``first`` / ``last`` -- ``--decoder-first/last-pipeline-num-layers`` (config.pipeline_layer_split), else an
  even split.

Noop layers (MindSpeed's ``--noop-layers``, slot ids in ``--num-layers`` numbering) are identity layers that
only pad the split: 61 layers + noop 61,62,63 split as 64. They are placement, not model: they have no
parameters, and the real layers keep their own ids 0..num_layers-1 (the HuggingFace / checkpoint ids) in slot
order, so a checkpoint saved with noop layers is the checkpoint of the same model without them
(docs/PARALLELISM.md, "Layer placement"). With a layout string, place layers directly (no noop layers).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Tuple

from .config import ConfigError, pipeline_layer_split

LETTERS = "EtmL"
_STAGE_ORDER = re.compile(r"^E?t*m*L?$")


def _err(msg: str) -> ConfigError:
    return ConfigError(msg)


# ------------------------------------------------------------------------------------------------------------
# the layout grammar
# ------------------------------------------------------------------------------------------------------------
def parse_layout(text: str) -> List[str]:
    """Megatron-Core's layout string -> the letters of each virtual stage in model order
    (``"Et*2|(tt|)*2,mL"`` -> ``["Ett", "tt", "tt", "mL"]``)."""
    src = re.sub(r"[,\s]", "", text or "")
    if not src:
        raise _err("--pipeline-model-parallel-layout is empty; give stages such as 'Ett|tt|ttmL'")
    pos = 0

    def count() -> int:
        nonlocal pos
        m = re.match(r"\*(\d+)", src[pos:])
        if not m:
            return 1
        pos += m.end()
        return int(m.group(1))

    def seq(depth: int) -> str:
        nonlocal pos
        out = []
        while pos < len(src):
            c = src[pos]
            if c == ")":
                if depth == 0:
                    raise _err(f"--pipeline-model-parallel-layout {text!r}: ')' at position {pos} closes nothing")
                return "".join(out)
            if c == "(":
                pos += 1
                inner = seq(depth + 1)
                if pos >= len(src):
                    raise _err(f"--pipeline-model-parallel-layout {text!r}: '(' is never closed")
                pos += 1
                out.append(inner * count())
            elif c in LETTERS or c == "|":
                pos += 1
                out.append(c * count())
            else:
                raise _err(f"--pipeline-model-parallel-layout {text!r}: unknown character {c!r}; use E (embedding), "
                           f"t (decoder layer), m (MTP layer), L (loss), '|' between stages, X*n and (...)*n")
        return "".join(out)

    flat = seq(0)
    return flat.split("|")


# ------------------------------------------------------------------------------------------------------------
# the placement
# ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stage:
    """One virtual stage (one model chunk)."""

    index: int                       # model order: k = vp_rank * pp + pp_rank
    pp_rank: int
    vp_rank: int
    layer_ids: Tuple[int, ...]       # real decoder layers (their checkpoint / HF ids), in order
    noop_slots: Tuple[int, ...]      # noop-layer slots placed here (identity: nothing is built)
    embedding: bool                  # E: the word embedding (pre_process)
    mtp: bool                        # m: every MTP depth (and the final norm)
    loss: bool                       # L: output head and loss (post_process)
    mtp_in_input: bool               # the input carries MTP hidden states (MTP ran on an earlier stage)

    @property
    def final_norm(self) -> bool:
        return self.mtp or (self.loss and not self.mtp_in_input)

    def letters(self) -> str:
        return ("E" if self.embedding else "") + "t" * len(self.layer_ids) + ("m" if self.mtp else "") + \
            ("L" if self.loss else "")


@dataclass(frozen=True)
class Placement:
    pp: int
    vp: int
    num_layers: int                  # real decoder layers
    mtp_layers: int
    stages: Tuple[Stage, ...]        # model order
    tied: bool = False

    def chunks(self, pp_rank: int) -> List[Stage]:
        """The virtual stages of one pipeline rank, in chunk order."""
        if not 0 <= pp_rank < self.pp:
            raise _err(f"pipeline rank {pp_rank} is outside pipeline-model-parallel-size {self.pp}; "
                       f"use 0 <= pp_rank < {self.pp}")
        return [self.stages[v * self.pp + pp_rank] for v in range(self.vp)]

    @property
    def embedding_stage(self) -> Stage:
        return next(s for s in self.stages if s.embedding)

    @property
    def loss_stage(self) -> Stage:
        return next(s for s in self.stages if s.loss)

    @property
    def mtp_stage(self) -> Optional[Stage]:
        return next((s for s in self.stages if s.mtp), None)

    @property
    def loss_pp_rank(self) -> int:
        """The pipeline rank that computes the loss: logging and the logged losses come from it."""
        return self.loss_stage.pp_rank

    @property
    def embedding_pp_ranks(self) -> Tuple[int, ...]:
        """Pipeline ranks holding a copy of the word embedding: the embedding, the MTP stage (MTP embeds the
        shifted tokens with the shared embedding) and, when tied, the output head."""
        ranks = {self.embedding_stage.pp_rank}
        if self.mtp_stage is not None:
            ranks.add(self.mtp_stage.pp_rank)
        if self.tied:
            ranks.add(self.loss_stage.pp_rank)
        return tuple(sorted(ranks))

    def format(self) -> str:
        """A grid: one row per pipeline rank, one column per virtual stage (layer ids, noop slots, MTP, loss)."""
        rows = [f"placement: pp {self.pp} x vp {self.vp}, {self.num_layers} layers"
                + (f" + {self.mtp_layers} MTP" if self.mtp_layers else "")]
        for p in range(self.pp):
            cells = []
            for s in self.chunks(p):
                parts = (["E"] if s.embedding else []) + ([_span(s.layer_ids)] if s.layer_ids else []) + \
                        ([f"noop {_span(s.noop_slots)}"] if s.noop_slots else []) + \
                        (["MTP"] if s.mtp else []) + (["L"] if s.loss else [])
                cells.append(",".join(parts) or "(empty)")
            rows.append(f"  pp {p:>3}: " + " | ".join(cells))
        return "\n".join(rows)


def _span(ids: Sequence[int]) -> str:
    ids = list(ids)
    if len(ids) > 1 and ids == list(range(ids[0], ids[-1] + 1)):
        return f"{ids[0]}-{ids[-1]}"
    return " ".join(map(str, ids))


def _check_noop(noop: Sequence[int], slots: int) -> Tuple[int, ...]:
    noop = tuple(int(i) for i in noop)
    if len(set(noop)) != len(noop):
        raise _err(f"--noop-layers {','.join(map(str, noop))} lists a layer twice; list each slot once")
    bad = [i for i in noop if not 0 <= i < slots]
    if bad:
        raise _err(f"--noop-layers {','.join(map(str, bad))} outside the {slots} layer slots of --num-layers; use "
                   f"ids 0..{slots - 1}")
    return tuple(sorted(noop))


def _counts_per_stage(slots: int, pp: int, vp: int, num_layer_list: Sequence[int], first, last) -> List[int]:
    """Layer slots per virtual stage in model order."""
    if num_layer_list:
        if first is not None or last is not None:
            raise _err("--num-layer-list and --decoder-first/last-pipeline-num-layers both set the split; use one")
        nl = [int(n) for n in num_layer_list]
        if any(n < 0 for n in nl):
            raise _err(f"--num-layer-list {','.join(map(str, nl))} has a negative count")
        if sum(nl) != slots:
            raise _err(f"--num-layer-list {','.join(map(str, nl))} sums to {sum(nl)}, not --num-layers {slots}; "
                       f"make the counts add up to {slots}")
        if len(nl) == pp * vp:
            return nl
        if len(nl) != pp:
            raise _err(f"--num-layer-list has {len(nl)} entries; give one per pipeline stage ({pp}) or one per "
                       f"virtual stage ({pp * vp})")
        odd = [n for n in nl if n % vp]
        if odd:
            raise _err(f"--num-layer-list {','.join(map(str, nl))}: {odd[0]} layers do not split over {vp} virtual "
                       f"stages; give {pp * vp} counts (one per virtual stage) or multiples of {vp}")
        return [nl[p] // vp for v in range(vp) for p in range(pp)]
    counts = pipeline_layer_split(slots, pp, vp, first, last)  # [v][p]
    return [counts[v][p] for v in range(vp) for p in range(pp)]


def _from_layout(layout: str, num_layers: int, pp: int, vp: Optional[int], mtp_layers: int) -> List[str]:
    stages = parse_layout(layout)
    if len(stages) % pp:
        raise _err(f"--pipeline-model-parallel-layout has {len(stages)} stages, not a multiple of "
                   f"pipeline-model-parallel-size {pp}; give pp x vp stages separated by '|'")
    if vp is not None and len(stages) != pp * vp:
        raise _err(f"--pipeline-model-parallel-layout has {len(stages)} stages but pipeline-model-parallel-size {pp} "
                   f"x virtual stages {vp} = {pp * vp}; drop the virtual-pipeline flag (the layout sets it)")
    for k, s in enumerate(stages):
        if not _STAGE_ORDER.match(s):
            raise _err(f"--pipeline-model-parallel-layout stage {k} is {s!r}; a stage lists E, then t's, then m's, "
                       f"then L")
    flat = "".join(stages)
    if not stages[0].startswith("E") or flat.count("E") != 1:
        raise _err(f"--pipeline-model-parallel-layout {layout!r}: the embedding E must open the first stage, once")
    if not stages[-1].endswith("L") or flat.count("L") != 1:
        raise _err(f"--pipeline-model-parallel-layout {layout!r}: the loss L must close the last stage, once")
    if flat.count("t") != num_layers:
        raise _err(f"--pipeline-model-parallel-layout places {flat.count('t')} decoder layers (t) but the model has "
                   f"{num_layers}; give exactly {num_layers} t's")
    if flat.count("m") != mtp_layers:
        raise _err(f"--pipeline-model-parallel-layout places {flat.count('m')} MTP layers (m) but --mtp-num-layers is "
                   f"{mtp_layers}; give exactly {mtp_layers} m's")
    if mtp_layers:
        at = [k for k, s in enumerate(stages) if "m" in s]
        if len(at) > 1:
            raise _err(f"--pipeline-model-parallel-layout puts MTP layers in stages {at}; put all {mtp_layers} in "
                       f"one stage")
        if "t" in "".join(stages[at[0] + 1:]):
            raise _err("--pipeline-model-parallel-layout has decoder layers after the MTP layers; MTP follows the "
                       "last decoder layer")
    return stages


def place(num_layers: int, pp: int, vp: Optional[int] = None, *, mtp_layers: int = 0, layout: Optional[str] = None,
          num_layer_list: Sequence[int] = (), noop_layers: Iterable[int] = (), first: Optional[int] = None,
          last: Optional[int] = None, tied: bool = False) -> Placement:
    """The placement of ``num_layers`` real decoder layers (+ ``mtp_layers`` MTP depths) on ``pp`` pipeline
    ranks with ``vp`` virtual stages each (None: from the layout, else 1). Raises ConfigError naming the fix."""
    if pp < 1:
        raise _err(f"pipeline-model-parallel-size {pp} must be >= 1")
    noop_layers = tuple(noop_layers)
    if layout:
        if noop_layers or num_layer_list or first is not None or last is not None:
            raise _err("--pipeline-model-parallel-layout places every layer itself; drop --noop-layers / "
                       "--num-layer-list / --decoder-first/last-pipeline-num-layers")
        letters = _from_layout(layout, num_layers, pp, vp, mtp_layers)
        vp = len(letters) // pp
        if pp == 1 and vp > 1:
            raise _err(f"--pipeline-model-parallel-layout has {vp} stages at pipeline-model-parallel-size 1; virtual "
                       f"stages need pp > 1: give one stage, or raise --pipeline-model-parallel-size")
        counts = [s.count("t") for s in letters]
        noop_of = [()] * len(letters)
        flags = [("E" in s, "m" in s, "L" in s) for s in letters]
    else:
        vp = vp or 1
        if vp < 1:
            raise _err(f"virtual pipeline size {vp} must be >= 1")
        slots = num_layers + len(noop_layers)
        noop = set(_check_noop(noop_layers, slots))
        slot_counts = _counts_per_stage(slots, pp, vp, num_layer_list, first, last)
        counts, noop_of, start = [], [], 0
        for n in slot_counts:
            here = range(start, start + n)
            noop_of.append(tuple(i for i in here if i in noop))
            counts.append(n - len(noop_of[-1]))
            start += n
        k_last = pp * vp - 1
        flags = [(k == 0, k == k_last and mtp_layers > 0, k == k_last) for k in range(pp * vp)]
    stages, next_id = [], 0
    mtp_seen = False
    for k, (n, (emb, mtp, loss)) in enumerate(zip(counts, flags)):
        stages.append(Stage(index=k, pp_rank=k % pp, vp_rank=k // pp, layer_ids=tuple(range(next_id, next_id + n)),
                            noop_slots=noop_of[k], embedding=emb, mtp=mtp, loss=loss,
                            mtp_in_input=loss and mtp_seen and not mtp))
        mtp_seen = mtp_seen or mtp
        next_id += n
    # a chunk is one DDP / optimizer unit: two chunks of one rank cannot each hold a copy of the embedding
    for r in range(pp):
        holders = [s.index for s in stages if s.pp_rank == r and (s.embedding or s.mtp or (tied and s.loss))]
        if len(holders) > 1:
            raise _err(f"the placement puts two copies of the word embedding on pipeline rank {r} (virtual stages "
                       f"{holders}: embedding / MTP{' / tied head' if tied else ''}); put the MTP layers on another "
                       f"pipeline rank or in the same stage as the embedding or the loss")
    return Placement(pp=pp, vp=vp, num_layers=num_layers, mtp_layers=mtp_layers, stages=tuple(stages), tied=tied)


def virtual_size(num_layers: int, pp: int, layout: Optional[str] = None, noop_layers: Sequence[int] = (),
                 vp: Optional[int] = None, layers_per_virtual_stage: Optional[int] = None) -> Optional[int]:
    """VP from the flags: the layout's stage count / PP, --virtual-pipeline-model-parallel-size, or layer slots /
    (--num-layers-per-virtual-pipeline-stage x PP); None when none is given."""
    if layout:
        return len(parse_layout(layout)) // pp if pp else None
    if vp:
        return vp
    if layers_per_virtual_stage:
        slots = num_layers + len(tuple(noop_layers))
        total = layers_per_virtual_stage * pp
        if slots % total:
            raise _err(f"num-layers {slots} is not a multiple of num-layers-per-virtual-pipeline-stage "
                       f"{layers_per_virtual_stage} x pipeline-model-parallel-size {pp} = {total}; pick a divisor")
        return slots // total
    return None


def placement_of(model_cfg, par) -> Placement:
    """The placement a ModelConfig and a ParallelConfig describe (what the trainer and validate_all use)."""
    vp_flag = par.virtual_pipeline_model_parallel_size
    if par.pipeline_model_parallel_layout:
        vp = vp_flag  # checked against the layout's stage count
        if par.num_layers_per_virtual_pipeline_stage:
            raise _err("--pipeline-model-parallel-layout sets the virtual stages; drop "
                       "--num-layers-per-virtual-pipeline-stage")
    else:
        vp = virtual_size(model_cfg.num_hidden_layers, par.pp, None, par.noop_layers, vp_flag,
                          par.num_layers_per_virtual_pipeline_stage)
    return place(model_cfg.num_hidden_layers, par.pp, vp, mtp_layers=model_cfg.num_nextn_predict_layers,
                 layout=par.pipeline_model_parallel_layout, num_layer_list=par.num_layer_list,
                 noop_layers=par.noop_layers, first=par.decoder_first_pipeline_num_layers,
                 last=par.decoder_last_pipeline_num_layers, tied=model_cfg.tie_word_embeddings)
