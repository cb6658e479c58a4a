"""What the GPU this rank drives is doing, sampled through NVML (and GPM on Hopper or newer).

`GpuSampler` runs a daemon thread in the rank's own process. It samples the physical GPU behind
torch's current CUDA device: CUDA ordinals are not NVML indices (CUDA_VISIBLE_DEVICES renumbers
devices, and may name them by UUID or MIG id), so the device is resolved by its UUID (or PCI bus
id) from torch, falling back to CUDA_VISIBLE_DEVICES; `physical_gpu` does that mapping and is a
pure function of strings. Keys (floats):

    gpu/util_pct, gpu/mem_util_pct     nvmlDeviceGetUtilizationRates (driver's own window, 1/6-1 s)
    gpu/mem_used_gib, gpu/mem_total_gib
    gpu/power_w                        nvmlDeviceGetPowerUsage
    gpu/energy_j                       total-energy counter, joules since the sampler was made
    gpu/sm_clock_mhz
    gpu/throttle                       share of samples with a clock-event reason other than
                                       idle or application-clocks setting (1.0: all of them)
    gpu/throttle_reasons               the raw reason bitmask, OR-ed over the snapshot window
    gpu/temp_c
    gpu/pcie_tx_gbps, gpu/pcie_rx_gbps     GB/s (1e9 B/s) from the cumulative PCIe byte
                                           counters differenced between samples
    gpu/nvlink_tx_gbps, gpu/nvlink_rx_gbps GB/s from the cumulative NVLink data counters (KiB),
                                           summed over links
    gpu/sm_active_pct, gpu/sm_occupancy_pct, gpu/tensor_active_pct, gpu/dram_bw_util_pct  (GPM)

`gpu/util_pct` is the share of time any kernel ran: a loop of tiny kernels reads high while the
SMs idle (28% against 0% GPM SM activity on an H200); `gpu/sm_active_pct` is the honest one.

A metric the device or driver lacks is reported once through `notice`, listed in `unavailable`,
and not asked for again. Without NVML (no driver, as on CI) `available` is False, `snapshot()`
returns {} and one notice line says why.

Cost. Each sample is about a dozen NVML calls (one batched nvmlDeviceGetFieldValues for the
counters, one GPM sample and metrics computation). ctypes releases the GIL during each call, so
the training thread only pays for the Python around them. What each call costs on a GPU is not
known here: this was written on a machine without one. There the failing path (NVML library
not found) costs 0.2 ms for the first sampler built in a process and 30 us for later ones, once,
at construction; sample() and snapshot() then return {} in under 1 us and no thread runs.
`perf/monitor_overhead.py` times `sample()` on whatever machine it runs on.
"""

from __future__ import annotations

import os
import re
import time
from typing import Callable, Sequence

import pynvml as nv

from dsfm.monitor.sampler import BackgroundSampler

GPU_KEYS = ("gpu/util_pct", "gpu/mem_util_pct", "gpu/mem_used_gib", "gpu/mem_total_gib",
            "gpu/power_w", "gpu/energy_j", "gpu/sm_clock_mhz", "gpu/throttle",
            "gpu/throttle_reasons", "gpu/temp_c", "gpu/pcie_tx_gbps", "gpu/pcie_rx_gbps",
            "gpu/nvlink_tx_gbps", "gpu/nvlink_rx_gbps", "gpu/sm_active_pct",
            "gpu/sm_occupancy_pct", "gpu/tensor_active_pct", "gpu/dram_bw_util_pct")

# Clock-event reasons that are not throttling: the GPU is idle, or clocks were set on purpose.
NOT_THROTTLING = 0x1 | 0x2          # GpuIdle | ApplicationsClocksSetting
_ALL_LINKS = 0xFFFFFFFF             # scopeId UINT_MAX: NVLink counter summed over all links
_GIB = 1024 ** 3
_GPM_MIN_S = 0.1                    # NVML: GPM samples closer than 100 ms are not meaningful
_GPM = {"gpu/sm_active_pct": nv.NVML_GPM_METRIC_SM_UTIL,
        "gpu/sm_occupancy_pct": nv.NVML_GPM_METRIC_SM_OCCUPANCY,
        "gpu/tensor_active_pct": nv.NVML_GPM_METRIC_ANY_TENSOR_UTIL,
        "gpu/dram_bw_util_pct": nv.NVML_GPM_METRIC_DRAM_BW_UTIL}
# key: (field id, scope id, bytes per counter unit)
_COUNTERS = {"gpu/pcie_tx_gbps": (nv.NVML_FI_DEV_PCIE_COUNT_TX_BYTES, 0, 1),
             "gpu/pcie_rx_gbps": (nv.NVML_FI_DEV_PCIE_COUNT_RX_BYTES, 0, 1),
             "gpu/nvlink_tx_gbps": (nv.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX, _ALL_LINKS, 1024),
             "gpu/nvlink_rx_gbps": (nv.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX, _ALL_LINKS, 1024)}
# nvmlValueType_t → (union member, counter width in bits; 0 for a double)
_VALUE = {nv.NVML_VALUE_TYPE_DOUBLE: ("dVal", 0),
          nv.NVML_VALUE_TYPE_UNSIGNED_INT: ("uiVal", 32),
          nv.NVML_VALUE_TYPE_UNSIGNED_LONG: ("ulVal", 64),
          nv.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG: ("ullVal", 64),
          nv.NVML_VALUE_TYPE_SIGNED_LONG_LONG: ("sllVal", 64),
          nv.NVML_VALUE_TYPE_SIGNED_INT: ("siVal", 32),
          nv.NVML_VALUE_TYPE_UNSIGNED_SHORT: ("usVal", 16)}


# ---------------------------------------------------------------- which GPU (pure functions)

def parse_visible_devices(value: str) -> list[int | str]:
    """CUDA_VISIBLE_DEVICES as CUDA reads it: indices or `GPU-`/`MIG-` ids separated by commas,
    up to the first entry that is neither (so "-1" or "" hide every device); a repeated entry
    hides them all."""
    out: list[int | str] = []
    for token in value.split(","):
        token = token.strip()
        if re.fullmatch(r"\+?\d+", token):
            out.append(int(token))
        elif token.startswith(("GPU-", "MIG-")):
            out.append(token)
        else:
            break
    return out if len(set(out)) == len(out) else []


def physical_gpu(cuda_index: int, *, uuid: str | None = None, pci_bus_id: str | None = None,
                 visible_devices: str | None = None,
                 nvml_uuids: Sequence[str] = ()) -> int | str:
    """The NVML name of CUDA device `cuda_index` of this process: an NVML index (int), a UUID
    (`GPU-…`, or `MIG-…` for a MIG instance) or a PCI bus id (str).

    `uuid` is torch's `get_device_properties(i).uuid` as a string (no prefix; it names a MIG
    instance when CUDA runs on one), `pci_bus_id` a "domain:bus:device.function" string,
    `visible_devices` the CUDA_VISIBLE_DEVICES value and `nvml_uuids` the UUIDs of NVML's
    devices 0, 1, … . The first of these that is given decides. CUDA_VISIBLE_DEVICES indices
    are taken as NVML indices, which holds when CUDA_DEVICE_ORDER=PCI_BUS_ID or the GPUs are
    all alike (CUDA's default order puts the fastest first; NVML's follows the PCI bus).
    """
    if uuid:
        bare = re.sub(r"^(GPU|MIG)-", "", str(uuid).strip(), flags=re.IGNORECASE).lower()
        for known in nvml_uuids:
            if known.lower() == f"gpu-{bare}":
                return known
        return f"MIG-{bare}" if nvml_uuids else f"GPU-{bare}"
    if pci_bus_id:
        return pci_bus_id
    if visible_devices is None:
        return cuda_index
    visible = parse_visible_devices(visible_devices)
    if not 0 <= cuda_index < len(visible):
        raise ValueError(f"CUDA device {cuda_index} is not among "
                         f"CUDA_VISIBLE_DEVICES={visible_devices!r} ({len(visible)} visible)")
    entry = visible[cuda_index]
    if isinstance(entry, int) or entry.startswith("MIG-") or not nvml_uuids:
        return entry
    matches = [u for u in nvml_uuids if u.lower().startswith(entry.lower())]
    if len(matches) != 1:
        raise ValueError(f"CUDA_VISIBLE_DEVICES entry {entry!r} matches "
                         f"{len(matches)} of the GPUs NVML lists (needs exactly one)")
    return matches[0]


def readable_uuids(count: int, uuid_of: Callable[[int], str],
                   error: type[Exception]) -> list[str]:
    """The UUIDs of NVML's devices 0 … count-1 that NVML can read: a GPU it cannot (lost, or
    outside this job's device cgroup: NVML_ERROR_NO_PERMISSION) is left out, so that it does not
    stop the GPU metrics of every other rank on the node."""
    out = []
    for i in range(count):
        try:
            out.append(str(uuid_of(i)))
        except error:
            continue
    return out


def pci_bus_id_of(domain: int, bus: int, device: int) -> str:
    """The bus id NVML's nvmlDeviceGetHandleByPciBusId accepts, as nvidia-smi prints it."""
    return f"{domain:08X}:{bus:02X}:{device:02X}.0"


# ---------------------------------------------------------------- NVML plumbing

def _init() -> str | None:
    """nvmlInit (reference-counted; pair with nvmlShutdown), or why it failed."""
    try:
        nv.nvmlInit()
    except (nv.NVMLError, OSError) as exc:     # OSError: a broken libnvidia-ml
        return f"NVML could not initialize ({exc})"
    return None


def nvml_problem() -> str | None:
    """Why NVML cannot be used in this process (None when it can)."""
    problem = _init()
    if problem is None:
        nv.nvmlShutdown()
    return problem


def all_local_gpus() -> list[int]:
    """NVML indices of every GPU on this machine ([] without NVML)."""
    if _init() is not None:
        return []
    try:
        return list(range(nv.nvmlDeviceGetCount()))
    finally:
        nv.nvmlShutdown()


def _open(target: int | str):
    if isinstance(target, int):
        return nv.nvmlDeviceGetHandleByIndex(target)
    if target.startswith(("GPU-", "MIG-")):
        return nv.nvmlDeviceGetHandleByUUID(target)
    return nv.nvmlDeviceGetHandleByPciBusId(target)


def _torch_target(device: int | None) -> int | str:
    """NVML name of this process's CUDA device (torch's current one when `device` is None)."""
    import torch

    if not torch.cuda.is_available():
        raise LookupError("this process has no CUDA device (torch.cuda.is_available() is False)")
    index = torch.cuda.current_device() if device is None else int(device)
    props = torch.cuda.get_device_properties(index)
    uuid = getattr(props, "uuid", None)
    pci = None
    if all(hasattr(props, a) for a in ("pci_domain_id", "pci_bus_id", "pci_device_id")):
        pci = pci_bus_id_of(props.pci_domain_id, props.pci_bus_id, props.pci_device_id)
    uuids = readable_uuids(nv.nvmlDeviceGetCount(),
                           lambda i: nv.nvmlDeviceGetUUID(nv.nvmlDeviceGetHandleByIndex(i)),
                           nv.NVMLError)
    return physical_gpu(index, uuid=str(uuid) if uuid is not None else None, pci_bus_id=pci,
                        visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
                        nvml_uuids=uuids)


def _field(value) -> tuple[float, int]:
    """(value, counter width in bits) of one nvmlFieldValue_t."""
    member, bits = _VALUE[value.valueType]
    return float(getattr(value.value, member)), bits


# ---------------------------------------------------------------- probes

class _Probe:
    """One group of metrics read together; `read` raises NVMLError when the group fails."""

    keys: tuple[str, ...] = ()

    def read(self, now: float) -> dict[str, float]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _Call(_Probe):
    def __init__(self, keys: tuple[str, ...], fn: Callable[[], dict[str, float]]):
        self.keys, self.fn = keys, fn

    def read(self, now: float) -> dict[str, float]:
        return self.fn()


class _Energy(_Probe):
    keys = ("gpu/energy_j",)

    def __init__(self, handle):
        self.handle, self.base = handle, None

    def read(self, now: float) -> dict[str, float]:
        mj = nv.nvmlDeviceGetTotalEnergyConsumption(self.handle)    # mJ since driver load
        if self.base is None:
            self.base = mj
        return {"gpu/energy_j": (mj - self.base) / 1e3}


class _Throttle(_Probe):
    keys = ("gpu/throttle", "gpu/throttle_reasons")

    def __init__(self, handle):
        self.handle = handle
        self.fn = getattr(nv, "nvmlDeviceGetCurrentClocksEventReasons", None)

    def read(self, now: float) -> dict[str, float]:
        try:
            if self.fn is None:
                raise nv.NVMLError(nv.NVML_ERROR_FUNCTION_NOT_FOUND)
            mask = self.fn(self.handle)
        except nv.NVMLError_FunctionNotFound:       # driver older than the rename (R535)
            self.fn = nv.nvmlDeviceGetCurrentClocksThrottleReasons
            mask = self.fn(self.handle)
        return {"gpu/throttle": float(bool(mask & ~NOT_THROTTLING)),
                "gpu/throttle_reasons": float(mask)}


class _Counters(_Probe):
    """Cumulative byte counters, all in one nvmlDeviceGetFieldValues call, as GB/s between
    samples (not nvmlDeviceGetPcieThroughput, which sees only a 20 ms window)."""

    def __init__(self, handle, drop: Callable[[tuple[str, ...], str], None]):
        self.handle, self.drop = handle, drop
        # key → ([(field id, scope id), …] summed, bytes per unit)
        self.requests = {k: ([(f, s)], unit) for k, (f, s, unit) in _COUNTERS.items()}
        self.prev: dict[str, tuple[float, float, float]] = {}

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(self.requests)

    def _per_link(self, key: str) -> bool:
        """A driver that rejects the all-links scope: ask link by link instead."""
        fid, scope = self.requests[key][0][0]
        if scope != _ALL_LINKS:
            return False
        try:
            (count,) = nv.nvmlDeviceGetFieldValues(self.handle,
                                                   [nv.NVML_FI_DEV_NVLINK_LINK_COUNT])
        except nv.NVMLError:
            return False
        links = int(_field(count)[0]) if count.nvmlReturn == nv.NVML_SUCCESS else 0
        if links <= 0:
            return False
        self.requests[key] = ([(fid, link) for link in range(links)], self.requests[key][1])
        return True

    def read(self, now: float) -> dict[str, float]:
        order = [(key, req) for key, (reqs, _) in self.requests.items() for req in reqs]
        values = nv.nvmlDeviceGetFieldValues(self.handle, [req for _, req in order])
        totals: dict[str, list] = {}
        failed: dict[str, int] = {}
        for (key, _), v in zip(order, values):
            if v.nvmlReturn != nv.NVML_SUCCESS:
                failed.setdefault(key, v.nvmlReturn)
                continue
            value, bits = _field(v)
            total = totals.setdefault(key, [0.0, bits, v.timestamp])
            total[0] += value
        out = {}
        for key in list(self.requests):
            if key not in totals:           # every scope of it failed
                if not self._per_link(key):
                    del self.requests[key]
                    self.drop((key,), str(nv.NVMLError(failed[key])))
                continue
            value, bits, stamp_us = totals[key]
            t_field = stamp_us / 1e6 if stamp_us > 0 else 0.0
            prev = self.prev.get(key)
            self.prev[key] = (value, t_field, now)
            if prev is None:
                continue
            # the driver's own timestamps when it gives them, else ours
            dt = t_field - prev[1] if t_field and prev[1] else now - prev[2]
            delta = value - prev[0]
            if delta < 0 and bits == 32 and len(self.requests[key][0]) == 1:
                delta += 2 ** 32            # a 32-bit counter wrapped
            if dt > 0 and delta >= 0:
                out[key] = delta * self.requests[key][1] / dt / 1e9
        return out


class _Gpm(_Probe):
    """GPM metrics (Hopper or newer) from two samples taken at least 100 ms apart."""

    def __init__(self, handle, drop: Callable[[tuple[str, ...], str], None]):
        self.handle, self.drop = handle, drop
        if nv.nvmlDeviceIsMigDeviceHandle(handle):
            raise LookupError("GPM per MIG instance is not sampled (nvmlGpmMigSampleGet)")
        if not nv.nvmlGpmQueryDeviceSupport(handle).isSupportedDevice:
            raise LookupError("GPM is not supported on this GPU (Hopper or newer only)")
        self.metrics = dict(_GPM)
        self.bufs = [nv.nvmlGpmSampleAlloc(), nv.nvmlGpmSampleAlloc()]   # [previous, next]
        self.t_prev: float | None = None
        self.request = nv.c_nvmlGpmMetricsGet_t()

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(self.metrics)

    def read(self, now: float) -> dict[str, float]:
        if self.t_prev is not None and now - self.t_prev < _GPM_MIN_S:
            return {}
        nv.nvmlGpmSampleGet(self.handle, self.bufs[1])
        out = {}
        if self.t_prev is not None:
            req = self.request
            req.version = nv.NVML_GPM_METRICS_GET_VERSION
            req.numMetrics = len(self.metrics)
            req.sample1, req.sample2 = self.bufs[0], self.bufs[1]
            for i, metric in enumerate(self.metrics.values()):
                req.metrics[i].metricId = metric
            nv.nvmlGpmMetricsGet(req)
            for i, key in enumerate(list(self.metrics)):
                m = req.metrics[i]
                if m.nvmlReturn == nv.NVML_SUCCESS:
                    out[key] = float(m.value)
                else:
                    del self.metrics[key]
                    self.drop((key,), str(nv.NVMLError(m.nvmlReturn)))
        self.bufs.reverse()
        self.t_prev = now
        return out

    def close(self) -> None:
        for buf in self.bufs:
            nv.nvmlGpmSampleFree(buf)
        self.bufs = []


# ---------------------------------------------------------------- the sampler

class GpuSampler(BackgroundSampler):
    """Samples one GPU every `interval_s` on a daemon thread (see the module docstring).

    `device` is this process's CUDA device index (torch's current device when None; build the
    sampler after torch.cuda.set_device). `nvml_index` samples a physical GPU by its NVML index
    instead, for a monitor outside the training processes. The energy baseline is taken here,
    at construction.
    """

    _LAST = frozenset({"gpu/energy_j"})
    _OR = frozenset({"gpu/throttle_reasons"})
    name = "GPU sampler"

    def __init__(self, device: int | None = None, interval_s: float = 1.0, *,
                 nvml_index: int | None = None, notice: Callable[[str], None] = print):
        super().__init__(interval_s, notice)
        self._available = False
        self._unavailable: dict[str, str] = {}
        self._probes: list[_Probe] = []
        self.label = "GPU"
        problem = _init()
        if problem is not None:
            self._fail(problem)
            return
        try:
            target = nvml_index if nvml_index is not None else _torch_target(device)
            self.handle = _open(target)
        except (nv.NVMLError, LookupError, ValueError) as exc:
            nv.nvmlShutdown()
            self._fail(f"cannot find this process's GPU in NVML: {exc}")
            return
        self._available = True
        self.label = f"GPU {target} ({nv.nvmlDeviceGetName(self.handle)})"
        self._build_probes()
        self._read()                    # baselines for counters, energy and GPM; reports gaps

    @property
    def available(self) -> bool:
        return self._available

    @property
    def unavailable(self) -> dict[str, str]:
        """Metric → why it is not sampled."""
        return dict(self._unavailable)

    def _fail(self, reason: str) -> None:
        self._unavailable = dict.fromkeys(GPU_KEYS, reason)
        self.notice(f"GPU metrics unavailable: {reason}")

    def _drop(self, keys: tuple[str, ...], reason: str) -> None:
        keys = tuple(k for k in keys if k not in self._unavailable)
        if keys:
            self._unavailable.update(dict.fromkeys(keys, reason))
            self.notice(f"{self.label}: {', '.join(keys)} unavailable ({reason}); "
                        "not sampled again")

    def _build_probes(self) -> None:
        h = self.handle

        def util():
            u = nv.nvmlDeviceGetUtilizationRates(h)
            return {"gpu/util_pct": float(u.gpu), "gpu/mem_util_pct": float(u.memory)}

        def memory():
            m = nv.nvmlDeviceGetMemoryInfo(h)
            return {"gpu/mem_used_gib": m.used / _GIB, "gpu/mem_total_gib": m.total / _GIB}

        self._probes = [
            _Call(("gpu/util_pct", "gpu/mem_util_pct"), util),
            _Call(("gpu/mem_used_gib", "gpu/mem_total_gib"), memory),
            _Call(("gpu/power_w",),
                  lambda: {"gpu/power_w": nv.nvmlDeviceGetPowerUsage(h) / 1e3}),
            _Energy(h),
            _Call(("gpu/sm_clock_mhz",), lambda: {
                "gpu/sm_clock_mhz": float(nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM))}),
            _Throttle(h),
            _Call(("gpu/temp_c",), lambda: {
                "gpu/temp_c": float(nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU))}),
            _Counters(h, self._drop),
        ]
        try:
            self._probes.append(_Gpm(h, self._drop))
        except (nv.NVMLError, LookupError) as exc:
            self._drop(tuple(_GPM), str(exc))

    def _read(self) -> dict[str, float]:
        now = time.monotonic()
        out: dict[str, float] = {}
        for probe in list(self._probes):
            try:
                out.update(probe.read(now))
            except Exception as exc:    # NVMLError mostly; any failure retires the group
                reason = str(exc) if isinstance(exc, nv.NVMLError) else \
                    f"{type(exc).__name__}: {exc}"
                self._probes.remove(probe)
                self._drop(probe.keys, reason)
                continue
            if not probe.keys:
                self._probes.remove(probe)
        return out

    def _close(self) -> None:
        if not self._available:
            return
        for probe in self._probes:
            try:
                probe.close()
            except nv.NVMLError:
                pass
        self._probes = []
        nv.nvmlShutdown()
