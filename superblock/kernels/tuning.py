"""Per-GPU choice of backend and Triton launch configuration for bsr_linear, measured once and cached.

A choice is keyed by the problem (out x in, block, density in percent, dtype / fp32 precision, bias and
activation, token-count bucket, x's layout where it is feature-major) inside a scope naming the device and the
torch / triton versions. The table lives in memory and in `$SUPERBLOCK_CACHE_DIR/tuning.json` (default
`~/.cache/superblock/tuning.json`), so a GPU is measured once; `tuning_table()` / `load_tuning()` let an export
manifest carry it to another machine. `configure(tune=False)` skips measuring (built-in defaults are used instead);
`configure(cache_dir=...)` moves the table. export.py / evaluate.py set both from their `kernels.tune` /
`kernels.cache_dir` keys; a process that sets neither starts from the environment (SUPERBLOCK_TUNE=0,
SUPERBLOCK_CACHE_DIR, SUPERBLOCK_TUNE_FOR).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from superblock.io import write_text_atomically
from superblock.kernels import _runners, _triton_bsr
from superblock.timing import capture_graph, interleaved_ms, time_cuda, time_graph

FORMAT = "superblock-tuning"
VERSION = 1
TARGETS = ("eager", "graph")  # what `auto` optimizes: eager calls (host cost counts) or GPU time (CUDA graphs)
# The rules that keep a block-sparse kernel over cuBLAS, in one place (tuning, export's layout=auto, serving's
# model-level check). A product's backend: a non-dense choice must beat dense by this factor, so timing noise never
# makes `auto` slower than dense.
DENSE_MARGIN = 0.97
# A layer kept block-sparse by export (layout=auto): not slower than dense beyond this fraction (timing noise) at any
# batch size, and faster at one.
TIE_TOLERANCE = 0.02


def beats_dense(sparse: float, dense: float, margin: float = DENSE_MARGIN) -> bool:
    """Whether a sparse time is enough faster than the dense one to choose it (times in any one unit)."""
    return sparse <= margin * dense


def not_slower_than_dense(sparse: float, dense: float, tolerance: float = TIE_TOLERANCE) -> bool:
    """Whether a sparse time is within `tolerance` of the dense one (0: strictly no slower)."""
    return sparse <= dense * (1.0 + tolerance)


class EnvVar:
    """One environment variable, read when used at the cost of a dict lookup (`os.environ.get` encodes the name on
    every call, and eager `auto` calls read the tuning target on every call). Follows os.environ as it changes."""

    def __init__(self, name: str) -> None:
        self.name = name
        env = os.environ
        self._data = getattr(env, "_data", None)
        encode = getattr(env, "encodekey", None)
        self._key = encode(name) if isinstance(self._data, dict) and encode is not None else None
        self._raw: object = None
        self._value: str | None = None

    def get(self, default: str) -> str:
        if self._key is None:
            return os.environ.get(self.name, default)
        raw = self._data.get(self._key)
        if raw is None:
            return default
        if raw is not self._raw:
            self._raw, self._value = raw, os.environ.decodevalue(raw)
        return self._value


_TUNE, _CACHE_DIR, _TUNE_FOR = EnvVar("SUPERBLOCK_TUNE"), EnvVar("SUPERBLOCK_CACHE_DIR"), EnvVar("SUPERBLOCK_TUNE_FOR")


@dataclass
class TuningState:
    """Everything `auto` remembers in this process, in one place: the table of measured choices (memory, and
    whether its disk copy was read), its generation, and the knobs. One instance lives as long as the process
    (`STATE`); `clear_tuning()` empties its table, `configure` / `set_tuning_target` set its knobs. A knob left
    None is read from the environment when it is used (SUPERBLOCK_TUNE, SUPERBLOCK_CACHE_DIR, SUPERBLOCK_TUNE_FOR)."""

    table: dict[str, dict[str, dict]] = field(default_factory=dict)
    generation: int = 0  # bumped whenever the table changes (record, load, clear): memoized choices key on it
    disk_loaded: bool = False
    warned_write: bool = False  # one warning for an unwritable cache, not one per measurement
    tune: bool | None = None
    cache_dir: str | None = None
    target: str | None = None
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    def may_measure(self) -> bool:
        tune = self.tune
        return tune if tune is not None else _TUNE.get("1") != "0"

    def cache_root(self) -> str | None:
        return self.cache_dir or _CACHE_DIR.get("") or None

    def tuning_target(self) -> str:
        target = self.target or _TUNE_FOR.get("eager")
        return target if target in TARGETS else "eager"


STATE = TuningState()


# ----------------------------------------------------------------------------------------------------------
# launch configurations


def _cfg(block_m: int, group: int, warps: int, stages: int, tma: bool = False, kb: int = 1) -> dict:
    cfg = {"BLOCK_M": block_m, "G": group, "num_warps": warps, "num_stages": stages, "TMA": tma}
    if kb > 1:
        cfg["KB"] = kb
    return cfg


SMEM_BYTES = 200 * 1024  # H100/H200 allow 227 KB per block; leave room for the epilogue's layout change


def _fit(c: dict, bh: int, bw: int, elt: int) -> dict:
    """Shrink a configuration until its pipelined tiles fit in shared memory."""
    c = dict(c)
    c["G"] = max(1, min(c["G"], 256 // bh))

    def smem(c):
        return c["num_stages"] * (c["BLOCK_M"] + c["G"] * bh) * bw * c.get("KB", 1) * elt

    while smem(c) > SMEM_BYTES and c["num_stages"] > 2:
        c["num_stages"] -= 1
    while smem(c) > SMEM_BYTES and c["G"] > 1:
        c["G"] //= 2
    while smem(c) > SMEM_BYTES and c["BLOCK_M"] > 32:
        c["BLOCK_M"] //= 2
    return c


def tall_thin(bh: int, bw: int) -> bool:
    """Tiles of 64 or more output rows by at most 32 inputs: the ones the packed (KB) steps are for."""
    return bh >= 64 and bw <= 32


def packed_configs(large: bool, bw: int) -> list[dict]:
    """Tall thin tiles (64 or more rows by 16 or 32 columns): the tiled kernel multiplying KB kept blocks per step,
    so each MMA sees 64 or 128 inputs and the loop over a block row's blocks runs a KB-th as often. KB * bw of 64 and
    128; deeper pipelines for the short steps."""
    out = []
    for kw in (64, 128):
        kb = max(2, kw // bw)
        if large:
            out += [_cfg(128, 1, 4, 3, kb=kb), _cfg(128, 1, 8, 3, kb=kb), _cfg(256, 1, 8, 2, kb=kb)]
        else:
            out += [_cfg(64, 1, 4, 3, kb=kb), _cfg(128, 1, 8, 3, kb=kb)]
    return out


DECODE_MAX_TOKENS = 64  # the decode kernel competes up to this many tokens


def decode_configs(M: int, bh: int, bw: int, blocks_per_row: float) -> list[dict]:
    """Decode-kernel configurations (SPLIT >= 1) for few tokens: one token tile of up to 64 rows, and SPLIT
    programs per block row so that each program reads 1, 2, 4 or 8 kept blocks on average (BAL: at most, each row
    split by its own length). Fewer blocks per program put more loads in flight (few tokens: the weight read is the
    whole cost); more keep the fp32 partial sums, which grow with M * SPLIT, small."""
    block_m = min(DECODE_MAX_TOKENS, max(16, 1 << (max(int(M), 1) - 1).bit_length()))

    def split_for(per_program: int) -> int:  # programs per block row so that each reads ~per_program blocks
        return min(64, 1 << max(0, math.ceil(math.log2(max(blocks_per_row / per_program, 1.0)))))

    out = []
    for per_program in (1, 2, 4, 8):
        out.append({**_cfg(block_m, 1, 4, 3 if per_program >= 4 else 2), "SPLIT": split_for(per_program)})
    # balanced by kept blocks: long block rows get more programs, short ones fewer (the SPLIT split stands in
    # inside a trace)
    for per_program in (2, 4):
        cfg = _cfg(block_m, 1, 4, 3 if per_program >= 4 else 2)
        out.append({**cfg, "SPLIT": split_for(per_program), "BAL": per_program})
    if tall_thin(bh, bw):  # a program's blocks in one or two packed steps (KB, 64-128 inputs)
        for per_program, kb in ((4, 4), (8, 8), (8, 4)):
            out.append({**_cfg(block_m, 1, 4, 2, kb=max(2, min(kb, 128 // bw))), "SPLIT": split_for(per_program)})
        kb = max(2, min(4, 128 // bw))
        out.append({**_cfg(block_m, 1, 4, 2, kb=kb), "SPLIT": split_for(8), "BAL": 8})
    return out


def candidate_configs(
    M: int,
    bh: int,
    bw: int,
    dtype: torch.dtype,
    precision: str = "ieee",
    target: str = "eager",
    blocks_per_row: float | None = None,
) -> list[dict]:
    """Short list of launch configurations worth measuring for one problem; the first is the default.

    Distilled from the sweep in docs/kernel_notes.md (H200, Triton 3.6): with many tokens the TMA variant
    with 128-token tiles, 4 warps and 2 stages wins for blocks >= 32 (each block row has only a few blocks,
    so deeper pipelines buy nothing and cost occupancy); 16-wide blocks want 2-4 block rows per program;
    with few tokens the descriptor set-up costs more than TMA saves (not under CUDA graphs: target "graph" adds
    TMA and smaller tiles there); fp32 in IEEE runs on the FMA units. With at most DECODE_MAX_TOKENS tokens and
    `blocks_per_row` (kept blocks / block rows) given, the decode kernel's configurations (decode_configs) join.
    """
    large = M > 8192
    if dtype == torch.float32 and precision == "ieee":
        # few tokens: small tiles, so that enough programs share the FMA work of long block rows
        cands = (
            [_cfg(64, 1, 4, 2), _cfg(128, 1, 8, 3)]
            if large
            else [_cfg(64, 1, 4, 2), _cfg(32, 1, 4, 2), _cfg(16, 1, 4, 2)]
        )
    elif bh <= 16:
        cands = (
            [_cfg(128, 4, 4, 2), _cfg(128, 2, 4, 2), _cfg(256, 2, 8, 2)]
            if large
            else [_cfg(64, 4, 4, 2), _cfg(128, 2, 4, 2)]
        )
    elif dtype == torch.float32:  # tf32 / tf32x3 on tensor cores
        cands = (
            [_cfg(64, 1, 4, 2, True), _cfg(128, 1, 4, 2, True), _cfg(64, 1, 4, 2)]
            if large
            else [_cfg(64, 1, 4, 2), _cfg(128, 1, 4, 2)]
        )
    elif large:
        cands = [_cfg(128, 1, 4, 2, True), _cfg(256, 1, 8, 2, True), _cfg(256, 1, 4, 2, True), _cfg(128, 1, 4, 2)]
    else:
        cands = [_cfg(64, 1, 4, 3), _cfg(128, 1, 8, 3), _cfg(32, 1, 4, 2)]
        if target == "graph":
            # under CUDA graphs the TMA descriptors' host cost is gone, and few tokens want more, smaller programs
            cands += [_cfg(64, 1, 4, 2, True), _cfg(128, 1, 4, 2, True), _cfg(16, 1, 2, 2), _cfg(32, 1, 2, 3)]
    if tall_thin(bh, bw) and not (dtype == torch.float32 and precision == "ieee"):
        cands += packed_configs(large, bw)  # after the others: the default stays first
    if blocks_per_row is not None and M <= DECODE_MAX_TOKENS:
        cands += decode_configs(M, bh, bw, blocks_per_row)  # after the tiled ones: the default stays first
    elt = 2 if dtype in (torch.float16, torch.bfloat16) else 4
    out, seen = [], set()
    for c in cands:
        c = _fit(c, bh, bw, elt)
        sig = tuple(sorted(c.items()))
        if sig not in seen:
            seen.add(sig)
            out.append(c)
    return out


def default_config(
    M,
    N,
    K,
    bh,
    bw,
    dtype,
    precision="ieee",
    nnz=None,
    has_bias=False,
    activation=None,
    target: str | None = None,
    x_feature_major: bool = False,
) -> dict:
    """Launch configuration for backend='triton': the measured one if this problem was tuned (for `target`,
    else for eager; for x's layout), else the first candidate."""
    if nnz is not None and torch.cuda.is_available():
        scope = scope_for()
        for tgt in dict.fromkeys((target or get_tuning_target(), "eager")):
            key = problem_key(M, N, K, bh, bw, nnz, dtype, precision, has_bias, activation, tgt, x_feature_major)
            entry = lookup(scope, key)
            if entry is not None and "triton_config" in entry:
                return entry["triton_config"]
    return candidate_configs(M, bh, bw, dtype, precision)[0]


# ----------------------------------------------------------------------------------------------------------
# keys and the table


def token_bucket(m: int) -> int:
    """Token counts are tuned per power-of-two bucket (197 -> 256, 50432 -> 65536)."""
    return 1 << max(4, (max(int(m), 1) - 1).bit_length())


def generation() -> int:
    """Changes whenever the table does: a memoized choice made at another generation may be stale."""
    return STATE.generation


_device_names: dict = {}


def _device_name(device: torch.device | None) -> str:
    # asking the driver takes ~10 us: once per device (a per-call cost in `auto` before it was memoized)
    index = torch.cuda.current_device() if device is None or device.index is None else device.index
    if index not in _device_names:
        _device_names[index] = torch.cuda.get_device_name(index)
    return _device_names[index]


def scope_for(device: torch.device | None = None) -> str:
    if isinstance(device, torch.device) and device.type != "cuda":
        device = None
    name = _device_name(device) if torch.cuda.is_available() else "cpu"
    tv = getattr(_triton_bsr.triton, "__version__", "none") if _triton_bsr.HAS_TRITON else "none"
    return f"{name}|torch-{torch.__version__}|triton-{tv}"


def set_tuning_target(target: str) -> None:
    """What `auto` optimizes: "eager" (default; host launch overhead counts, which favours cuBLAS at small
    token counts) or "graph" (GPU time only, for models run as CUDA graphs). Also SUPERBLOCK_TUNE_FOR."""
    STATE.target = check_target(target)


def check_target(target: str | None, allow_none: bool = False) -> str | None:
    """`target` if it is a tuning target ("eager" | "graph"; None too with allow_none), else a ValueError."""
    if target not in TARGETS and not (allow_none and target is None):
        extra = " or None" if allow_none else ""
        raise ValueError(f"tuning target must be one of {TARGETS}{extra}, got {target!r}")
    return target


def get_tuning_target() -> str:
    return STATE.tuning_target()


def problem_key(
    M, N, K, bh, bw, nnz, dtype, precision, has_bias, activation, target: str = "eager", x_feature_major: bool = False
) -> str:
    """The table's key of one product. A feature-major x (a transposed view, as a layer's feature-major hand-off
    gives the next) reads differently and is measured on its own: its key ends in "|xT"; token-major keys are as
    they were before the layout counted."""
    n_blocks = math.ceil(N / bh) * math.ceil(K / bw)
    density = round(100.0 * nnz / n_blocks)
    dt = str(dtype).replace("torch.", "")
    if dtype == torch.float32:
        dt += "-" + precision
    key = f"{N}x{K}|b{bh}x{bw}|d{density}|{dt}|bias{int(bool(has_bias))}|{activation or 'none'}|m{token_bucket(M)}"
    key = key if target == "eager" else key + "|" + target
    return key + "|xT" if x_feature_major else key


def configure(tune: bool | None = None, cache_dir: str | os.PathLike | None = None) -> None:
    """Whether `auto` may measure (tune=False: built-in defaults) and where the table lives on disk (cache_dir;
    default ~/.cache/superblock). Arguments left None keep their value. A new cache_dir is read on next use."""
    if tune is not None:
        STATE.tune = bool(tune)
    if cache_dir is not None:
        with STATE.lock:
            STATE.cache_dir = str(cache_dir)
            STATE.disk_loaded = False


def cache_path() -> Path:
    root = STATE.cache_root()
    base = Path(root) if root else Path.home() / ".cache" / "superblock"
    return base / "tuning.json"


def _check_table(obj) -> dict[str, dict[str, dict]]:
    if not isinstance(obj, dict) or obj.get("format") != FORMAT or not isinstance(obj.get("scopes"), dict):
        raise ValueError(f"not a {FORMAT} table (expected keys 'format', 'version', 'scopes')")
    if obj.get("version") != VERSION:
        raise ValueError(f"unsupported {FORMAT} version {obj.get('version')!r} (this code reads {VERSION})")
    for scope, entries in obj["scopes"].items():
        if not isinstance(entries, dict):
            raise ValueError(f"scope {scope!r} must map problem keys to choices")
        for key, entry in entries.items():
            if not isinstance(entry, dict) or entry.get("backend") not in _runners.KERNEL_BACKENDS:
                raise ValueError(f"bad choice for {key!r} in {scope!r}: {entry!r}")
    return obj["scopes"]


def _read_disk() -> dict[str, dict[str, dict]]:
    path = cache_path()
    if not path.exists():
        return {}
    try:
        return _check_table(json.loads(path.read_text()))
    except (OSError, ValueError) as err:  # a damaged cache is only a cache
        warnings.warn(f"ignoring tuning cache {path}: {err}", stacklevel=3)
        return {}


def _ensure_loaded() -> None:
    with STATE.lock:
        if STATE.disk_loaded:
            return
        table = STATE.table
        for scope, entries in _read_disk().items():
            table.setdefault(scope, {}).update({k: v for k, v in entries.items() if k not in table.get(scope, {})})
        STATE.disk_loaded = True


def _write_disk(scope: str, key: str, entry: dict) -> None:
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        scopes = _read_disk()  # merge: other processes may have written meanwhile
        scopes.setdefault(scope, {})[key] = entry
        payload = json.dumps({"format": FORMAT, "version": VERSION, "scopes": scopes}, indent=1, sort_keys=True)
        write_text_atomically(path, payload)  # umask permissions, like any other file we write
    except OSError as err:
        if not STATE.warned_write:
            warnings.warn(f"could not write tuning cache {path}: {err}", stacklevel=3)
            STATE.warned_write = True


def tuning_table(scope: str | None = None) -> dict:
    """The measured choices (all scopes, or one) as a JSON-able dict, e.g. for an export manifest."""
    _ensure_loaded()
    with STATE.lock:
        table = STATE.table
        scopes = copy.deepcopy(table if scope is None else {scope: table.get(scope, {})})
    return {"format": FORMAT, "version": VERSION, "scopes": scopes}


def load_tuning(table: dict, persist: bool = False) -> None:
    """Merge a table from tuning_table() (e.g. from an export manifest); entries in it win."""
    scopes = _check_table(table)
    _ensure_loaded()
    with STATE.lock:
        STATE.generation += 1
        for scope, entries in scopes.items():
            STATE.table.setdefault(scope, {}).update(copy.deepcopy(entries))
    if persist:
        for scope, entries in scopes.items():
            for key, entry in entries.items():
                _write_disk(scope, key, entry)


def clear_tuning() -> None:
    """Forget the in-memory table (the disk cache is read again on next use)."""
    with STATE.lock:
        STATE.generation += 1
        STATE.table.clear()
        STATE.disk_loaded = False


def lookup(scope: str, key: str) -> dict | None:
    _ensure_loaded()
    with STATE.lock:
        return STATE.table.get(scope, {}).get(key)


def record(scope: str, key: str, entry: dict, persist: bool = True) -> None:
    with STATE.lock:
        STATE.generation += 1
        STATE.table.setdefault(scope, {})[key] = entry
    if persist:
        _write_disk(scope, key, entry)


# ----------------------------------------------------------------------------------------------------------
# measuring


def _can_measure(x: torch.Tensor) -> bool:
    if not STATE.may_measure():
        return False
    if torch.cuda.is_current_stream_capturing():
        return False
    compiling = getattr(torch.compiler, "is_compiling", None)
    return not (compiling is not None and compiling())


def _time_triton(args, precision: str, candidates: list[dict]):
    """GPU time of each Triton launch configuration that runs here: ({label: ms}, {label: config}, runner).
    `runner(cfg, out)` launches into `out`; `runner(cfg)` makes the call as layers and the functional op make it
    (the launch bound to the weight, _runners.bind_triton, allocating its output), so that an eager time holds the
    host cost callers pay, no more and no less."""
    x2d, values, crow, col, shape, bias, activation = args
    layouts: dict[tuple[int, int], tuple] = {}
    bound: dict[int, tuple] = {}
    y = torch.empty(x2d.shape[0], shape[0], device=x2d.device, dtype=x2d.dtype)

    def run_cfg(cfg, out=None):
        group, per_program = int(cfg.get("G", 1)), int(cfg.get("BAL", 0))
        if (group, per_program) not in layouts:  # the derived tensors a plan would keep: grouped layout, work list
            lc, lcol, gidx = _runners.layout_for(crow, col, group)
            if per_program:
                gidx = _triton_bsr.balanced_work(lc, int(values.shape[0]), per_program, activation == "silu_mul")
            layouts[(group, per_program)] = (lc, lcol, gidx)
        lc, lcol, gidx = layouts[(group, per_program)]
        if out is None and _runners.bindable(x2d.device):
            found = bound.get(id(cfg))  # bound once per config (kept beside it): timed calls are the calls layers make
            if found is None:
                run = _runners.bind_triton(values, lc, lcol, gidx, bias is not None, shape, activation, precision, cfg)
                found = bound[id(cfg)] = (cfg, run)
            return found[1](x2d, bias)
        return _runners.run_triton(x2d, values, lc, lcol, gidx, bias, shape[0], activation, precision, cfg, out)

    gpu_ms: dict[str, float] = {}
    configs: dict[str, dict] = {}
    for cfg in candidates:
        label = "triton:" + ",".join(f"{k}={v}" for k, v in cfg.items())
        run = lambda c=cfg: run_cfg(c, y)  # noqa: E731
        try:
            run()
        except Exception:  # e.g. out of shared memory for this tile shape
            continue
        try:
            gpu_ms[label] = time_graph(run)
        except Exception:  # capture not possible here: eager timing
            gpu_ms[label] = time_cuda(run)
        configs[label] = cfg
    return gpu_ms, configs, run_cfg


def measure(
    args,
    precision: str,
    candidates: list[dict] | None = None,
    backends=_runners.KERNEL_BACKENDS,
    target: str = "eager",
):
    """Time every backend (and every Triton candidate) on these arguments; returns {label: ms}, best entry.

    args = (x2d, values, crow, col, (out, in), bias, activation). Triton configurations (the decode kernel's among
    them for few tokens) compete on GPU time; the winner then against the other backends on eager time (target
    "eager": bursts of back-to-back calls interleaved across the finalists, launch overhead included:
    timing.interleaved_ms) or GPU time (target "graph")."""
    x2d, values, crow, col, shape, bias, activation = args
    graph = target == "graph"
    gpu_ms: dict[str, float] = {}
    configs: dict[str, dict] = {}
    best_cfg = None
    if "triton" in backends and _runners.triton_usable(x2d, values):
        if not candidates:
            per_row = values.shape[0] / max(crow.numel() - 1, 1)
            candidates = candidate_configs(x2d.shape[0], *values.shape[1:], x2d.dtype, precision, target, per_row)
        gpu_ms, configs, run_cfg = _time_triton(args, precision, candidates)
        if gpu_ms:
            best_cfg = min(gpu_ms, key=gpu_ms.get)
    finalists = {}  # the backends' eager calls: {label: fn()}
    if best_cfg is not None:
        finalists[best_cfg] = lambda: run_cfg(configs[best_cfg])
    if "torch" in backends and x2d.dtype in (torch.float16, torch.bfloat16, torch.float32):
        crow64, col64 = crow.to(torch.int64), col.to(torch.int64)
        torch_call = lambda: _runners.run_torch(x2d, values, crow64, col64, shape, bias, activation)  # noqa: E731
        with contextlib.suppress(Exception):  # e.g. no torch kernel for this block shape
            torch_call()
            finalists["torch"] = torch_call
    if "dense" in backends:
        w = _runners.bsr_to_dense(values, crow, col, shape)
        finalists["dense"] = lambda: _runners.run_dense(x2d, w, bias, activation)
    times = _graph_times(finalists, gpu_ms) if graph else interleaved_ms(finalists, x2d.device)
    return times, _entry(times, configs, gpu_ms, best_cfg)


def _graph_times(finalists: dict, gpu_ms: dict[str, float]) -> dict[str, float]:
    """GPU time of each finalist: a Triton config's from its candidate timing, the others' from CUDA-graph replays
    (CUDA events where a capture fails). A finalist whose replay computes something else than its eager call is left
    out: a replay that skips or repeats stale work can look fast, and the graph target would then serve it."""
    times = {}
    for label, fn in finalists.items():
        if label in gpu_ms:
            times[label] = gpu_ms[label]
            continue
        try:
            if not replays_as_called(fn):
                msg = f"auto: {label}'s CUDA-graph replay differs from its eager call; not chosen for graphs"
                warnings.warn(msg, RuntimeWarning, stacklevel=2)
                continue
            times[label] = time_graph(fn)
        except Exception:
            times[label] = time_cuda(fn)
    return times


def replays_as_called(fn, tolerance: float = 1e-2) -> bool:
    """Whether a CUDA-graph replay of fn() returns what an eager call of it returns (within `tolerance` of the
    output's largest magnitude: the same kernels on the same inputs differ at most by their sums' order)."""
    want = fn().float()
    outs: list[torch.Tensor] = []
    graph = capture_graph(lambda: outs.append(fn()))
    outs[-1].zero_()  # what the replay must write
    graph.replay()
    torch.cuda.synchronize()
    err = (outs[-1].float() - want).abs().max().item() if want.numel() else 0.0
    return err <= tolerance * want.abs().max().item() + 1e-6


def _entry(times: dict, configs: dict, gpu_ms: dict, best_cfg: str | None) -> dict:
    """The tuning-table entry of a measurement: the fastest backend, dense unless beaten by DENSE_MARGIN."""
    if not times:
        return {"backend": "dense", "times_us": {}}
    best = min(times, key=times.get)
    if "dense" in times and best != "dense" and not beats_dense(times[best], times["dense"]):
        best = "dense"
    entry = {"backend": "triton", "config": configs[best]} if best.startswith("triton:") else {"backend": best}
    if configs:  # kept for backend="triton" even when another backend wins
        entry["triton_config"] = configs[best_cfg]
        entry["gpu_us"] = {k: round(v * 1000.0, 2) for k, v in gpu_ms.items()}
    entry["times_us"] = {k: round(v * 1000.0, 2) for k, v in times.items()}
    return entry


def first_config(x2d: torch.Tensor, values: torch.Tensor, precision: str) -> dict:
    """The default launch configuration (the first candidate) for x [..., in] times these blocks."""
    m = x2d.numel() // x2d.shape[-1] if x2d.dim() else 0
    return candidate_configs(m, int(values.shape[1]), int(values.shape[2]), x2d.dtype, precision)[0]


def stand_in(x2d: torch.Tensor, values: torch.Tensor, precision: str) -> dict:
    """What `auto` runs where nothing may be measured (a trace, a CUDA-graph capture, SUPERBLOCK_TUNE=0, no
    tokens): the Triton kernel's default configuration where that kernel can run, else dense. No host sync."""
    if _runners.triton_usable(x2d, values):
        return {"backend": "triton", "config": first_config(x2d, values, precision), "measured": False}
    return {"backend": "dense", "measured": False}


def measured_choice(args, precision: str, target: str | None = None) -> dict:
    """The backend (and config) `auto` runs for these arguments: the stored measurement, else one made now, else
    a stand-in (dispatch.choose is the one entry point that decides; this is its measuring half).

    Measures only outside traces and CUDA-graph captures (and unless SUPERBLOCK_TUNE=0); a stand-in choice
    carries "measured": False."""
    x2d, values, crow, col, shape, bias, activation = args
    M = x2d.shape[0]
    bh, bw = values.shape[1:]
    target = target or get_tuning_target()
    x_t = _triton_bsr.feature_major(x2d)
    key = problem_key(
        M, shape[0], shape[1], bh, bw, values.shape[0], x2d.dtype, precision, bias is not None, activation, target, x_t
    )
    scope = scope_for(x2d.device)
    entry = lookup(scope, key)
    if entry is not None:
        return entry
    if M == 0 or not _can_measure(x2d):
        return stand_in(x2d, values, precision)
    with torch.no_grad():
        _, entry = measure(args, precision, target=target)
    record(scope, key, entry)
    return entry


choose = measured_choice  # the old name (beside dispatch.choose, which decides): works for one more release
