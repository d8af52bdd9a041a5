"""Run an exported model by its file type: ``.xml`` through OpenVINO, ``.onnx`` through ONNX
Runtime. Nothing here imports torch: a stage on an exported model stays a light process."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform
import threading
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from ...common.errors import ModelError

log = logging.getLogger(__name__)

ENGINES = ("onnx", "openvino")
SUFFIX = {".onnx": "onnx", ".xml": "openvino"}


def available(engine: str) -> bool:
    """Whether the runtime for ``engine`` is installed (imported only to find out)."""
    import importlib.util

    module = {"onnx": "onnxruntime", "openvino": "openvino"}.get(engine)
    return module is not None and importlib.util.find_spec(module) is not None


def x86_cpu() -> bool:
    """OpenVINO's CPU plugin is at its best on Intel/AMD x86-64 CPUs."""
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


class Engine(ABC):
    """One loaded model: named float/int inputs in, outputs (in the model's order) out."""

    kind = ""

    def __init__(self, path: Path, threads: int = 0) -> None:
        self.path = path
        self.input_names: list[str] = []
        self.provider = ""
        self.threads = threads

    @abstractmethod
    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """One inference: the model's outputs, in order."""

    def use_threads(self, threads: int, max_copy_bytes: int | None = None) -> int:
        """Run the next inferences on ``threads`` intra-op threads; returns the count in use.
        Neither runtime changes a loaded model's thread count, so the engine keeps one session
        (ONNX Runtime) or compiled model (OpenVINO) per count it was asked for, made on first
        use: each holds its own copy of the weights and buffers (threads_policy follow asks for
        at most 2 counts on 2 cores, 4 with three model stages on more; docs/performance.md).
        A model whose weights exceed ``max_copy_bytes`` stays one loaded model: asked for more
        threads than it has, it is loaded again at that count in place of the old one; asked
        for fewer, it keeps its count."""
        if threads > 0 and threads != self.threads:
            if (max_copy_bytes is not None and self.threads > 0
                    and self.weight_bytes > max_copy_bytes):
                if threads < self.threads:
                    return self.threads
                self._drop_loaded()
            self._switch(threads)
            self.threads = threads
        return self.threads

    @cached_property
    def weight_bytes(self) -> int:
        """The size of the export's files: the graph, and OpenVINO's .bin or ONNX's external
        data beside it (read once: it is asked before every thread switch)."""
        files = (self.path, self.path.with_suffix(".bin"), Path(f"{self.path}.data"))
        return sum(f.stat().st_size for f in files if f.is_file())

    @abstractmethod
    def _switch(self, threads: int) -> None:
        """Make (or take from the cache) the model loaded for ``threads``."""

    @abstractmethod
    def _drop_loaded(self) -> None:
        """Forget every loaded session or compiled model (the next ``_switch`` makes one)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path.name}, {self.provider})"


class OnnxEngine(Engine):
    """ONNX Runtime: the CPU provider, or CUDA / TensorRT where the installed build has them
    and ``device`` is not the CPU."""

    kind = "onnx"

    def __init__(self, path: Path, threads: int = 0, device: str = "cpu",
                 varying_shapes: bool = False) -> None:
        super().__init__(path, threads)
        import onnxruntime as ort

        self.varying_shapes = varying_shapes
        self.providers = onnx_providers(ort.get_available_providers(), device)
        self.sessions: dict[int, Any] = {}
        self.session = self._session(threads)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.provider = self.session.get_providers()[0]

    def _session(self, threads: int) -> Any:
        if threads not in self.sessions:
            import onnxruntime as ort

            options = ort.SessionOptions()
            if threads > 0:
                options.intra_op_num_threads = threads
                options.inter_op_num_threads = 1
            options.log_severity_level = 3
            if self.varying_shapes:
                # no memory pattern (kept per input shape: detector TTA has three) and no arena
                # (it keeps its peak): with release_memory, a tiny detector's process after
                # 1600-px TTA went from 245 to 108 MiB resident; at real size it costs speed
                # (YOLOv9c 2.2 -> 2.9 s), kept for the memory (docs/performance.md)
                options.enable_mem_pattern = False
                options.enable_cpu_mem_arena = False
            # else the arena and pattern stay on: SigLIP-large's vision tower took 27.7 s per 8
            # crops without them, 19.8 s with them (dynamic int8: 10.3 -> 8.0 s)
            try:
                self.sessions[threads] = ort.InferenceSession(str(self.path), options,
                                                              providers=self.providers)
            except Exception as exc:  # noqa: BLE001 - any load failure is a ModelError
                raise ModelError(f"cannot load {self.path} with onnxruntime: {exc}") from exc
        return self.sessions[threads]

    def _switch(self, threads: int) -> None:
        self.session = self._session(threads)

    def _drop_loaded(self) -> None:
        self.sessions.clear()
        self.session = None

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return list(self.session.run(None, dict(feeds)))


def onnx_providers(present: Sequence[str], device: str) -> list[str]:
    """TensorRT, then CUDA, then the CPU (always last, the fallback) on a CUDA device; the CPU
    provider alone otherwise."""
    wanted = ["CPUExecutionProvider"]
    if device.startswith("cuda") or device == "auto":
        wanted = ["TensorrtExecutionProvider", "CUDAExecutionProvider", *wanted]
    return [p for p in wanted if p in present] or ["CPUExecutionProvider"]


class OpenVinoEngine(Engine):
    """OpenVINO's CPU plugin. fp32 exports run at f32 (the plugin's default on CPUs with bf16
    units is bf16, which moves SigLIP's embeddings by about 1e-2); fp16 exports run at the
    plugin's default precision (bf16 where the CPU has it)."""

    kind = "openvino"

    def __init__(self, path: Path, threads: int = 0, precision: str = "fp32",
                 device: str = "cpu") -> None:
        super().__init__(path, threads)
        import openvino as ov

        self.precision = precision
        self.core = ov.Core()
        self.target = "GPU" if device.startswith("cuda") and "GPU" in \
            self.core.available_devices else "CPU"
        try:
            self.model = self.core.read_model(str(path))
        except Exception as exc:  # noqa: BLE001 - any load failure is a ModelError
            raise ModelError(f"cannot load {path} with openvino: {exc}") from exc
        self.loaded: dict[int, tuple[Any, Any]] = {}
        self.weight_files = {str(f.resolve()) for f in (path, path.with_suffix(".bin"))}
        self.unpacked: set[int] = set()  # thread counts whose compiled model has not run yet
        self.shapes_run: set[tuple[Any, ...]] = set()  # (threads, input shapes) run before
        self.compiled, self.request = self._compiled(threads)
        self.input_names = [port.any_name for port in self.compiled.inputs]
        self.provider = f"openvino-{self.target}"

    def _compiled(self, threads: int) -> tuple[Any, Any]:
        """The model compiled for ``threads`` (one Core and one read model for every count)."""
        if threads not in self.loaded:
            config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
            if threads > 0:
                config["INFERENCE_NUM_THREADS"] = threads
            if self.precision == "fp32":
                config["INFERENCE_PRECISION_HINT"] = "f32"
            try:
                with DroppingPages(self.weight_files):
                    compiled = self.core.compile_model(self.model, self.target, config)
            except Exception as exc:  # noqa: BLE001 - any load failure is a ModelError
                raise ModelError(f"cannot load {self.path} with openvino: {exc}") from exc
            self.loaded[threads] = (compiled, compiled.create_infer_request())
            self.unpacked.add(threads)
        return self.loaded[threads]

    def _switch(self, threads: int) -> None:
        """The compiled model for ``threads``; the one left frees its intermediate buffers
        (each compiled model keeps its own, sized for the largest input it ran: YOLOv9c's
        1600-px TTA passes held ~280 MiB per copy), reallocated if it is used again."""
        previous = self.compiled
        self.compiled, self.request = self._compiled(threads)
        if previous is not None and previous is not self.compiled:
            previous.release_memory()

    def _drop_loaded(self) -> None:
        self.loaded.clear()
        self.shapes_run.clear()
        self.compiled = self.request = None
        release_memory()

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        if self.threads in self.unpacked:  # the first inference packs what compile did not
            self.unpacked.discard(self.threads)
            with DroppingPages(self.weight_files):
                result = self.request.infer(dict(feeds))
        else:
            result = self.request.infer(dict(feeds))
        outputs = [np.asarray(result[port]).copy() for port in self.compiled.outputs]
        shapes = (self.threads, *(np.shape(v) for v in feeds.values()))
        if shapes not in self.shapes_run:  # a new shape may have read weights (0.7 ms a look)
            if len(self.shapes_run) >= 1024:  # frames of many sizes: forget, do not grow
                self.shapes_run.clear()
            self.shapes_run.add(shapes)
            drop_file_pages(self.weight_files)
        return outputs


MADV_DONTNEED = 4


def drop_file_pages(paths: set[str]) -> int:
    """Unmap this process's resident pages of the read-only shared mappings of ``paths``
    (madvise DONTNEED); returns the bytes advised. OpenVINO maps an IR's .bin and its CPU
    plugin reads every weight once to pack its own copy (at compile time, or on the first
    inference of a dynamic shape), then keeps the mapping: resident, the weights counted twice
    (SigLIP-large int8: 314 + 337 MiB of mapped pages). The pages stay in the page cache (shared,
    reclaimable) and come back on the next read, so nothing is lost if the plugin reads them
    again; writable or private mappings are left alone."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            regions = [line.split(maxsplit=5) for line in maps]
    except OSError:
        return 0
    libc = _libc()
    if libc is None or not hasattr(libc, "madvise"):
        return 0
    done = 0
    for fields in regions:
        if len(fields) < 6 or fields[5].rstrip("\n") not in paths:
            continue
        perms = fields[1]
        if "w" in perms or "s" not in perms:
            continue
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), MADV_DONTNEED) == 0:
            done += hi - lo
    return done


class DroppingPages:
    """While the block runs (OpenVINO compiling a model, or its first inference, which read
    every weight of the mapped .bin once), drop the mapped pages every ``every_s`` from a
    thread, so the mapping and the plugin's packed copy are never resident whole at once."""

    def __init__(self, paths: set[str], every_s: float = 0.05) -> None:
        self.paths, self.every_s = paths, every_s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="drop-pages")

    def _run(self) -> None:
        while not self.stop.wait(self.every_s):
            drop_file_pages(self.paths)

    def __enter__(self) -> DroppingPages:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        drop_file_pages(self.paths)


def _libc() -> Any:
    """glibc, loaded once (None where there is none)."""
    global _LIBC
    if _LIBC is None:
        name = ctypes.util.find_library("c")
        _LIBC = ctypes.CDLL(name) if name else False
    return _LIBC or None


_LIBC: Any = None


def release_memory() -> None:
    """Give freed heap memory back to the system (glibc's malloc_trim): after a large input
    (a 1600-px frame with TTA) the allocator otherwise keeps its peak resident."""
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None) if libc is not None else None
    if trim is not None:
        trim(0)


def load_engine(path: Path | str, threads: int = 0, precision: str = "fp32",
                device: str = "cpu", varying_shapes: bool = False) -> Engine:
    """The engine for an exported file, chosen by its suffix. ``varying_shapes`` (the
    detector: TTA's three sizes, any frame size; the upscaler: any crop size) turns ONNX
    Runtime's per-shape memory pattern and its arena off, for memory."""
    path = Path(path)
    kind = SUFFIX.get(path.suffix.lower())
    if kind is None:
        raise ModelError(f"{path}: not an exported model (.onnx or .xml)")
    if not path.is_file():
        raise ModelError(f"exported model {path} does not exist")
    if not available(kind):
        raise ModelError(f"{path} needs the {kind} runtime, which is not installed")
    if kind == "onnx":
        return OnnxEngine(path, threads, device, varying_shapes)
    return OpenVinoEngine(path, threads, precision, device)
