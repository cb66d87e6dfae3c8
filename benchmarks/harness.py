"""What every benchmark measures inside its child process: time and peak memory of one call.

A benchmark runs each measurement in a fresh subprocess (its own script, so this module sits on
its path); ``measure`` times the call and reads the peak resident set from /proc (Linux).
"""

import time


def memory_kib() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                out[key] = int(value.split()[0])
    return out


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def measure(call, repeats: int) -> dict:
    """Run ``call`` (returning its outputs' byte count) once under the peak-memory probe, then time it."""
    import gc

    gc.collect()
    before = memory_kib()["VmRSS"]
    reset_peak()
    start = time.perf_counter()
    out_bytes = call()
    first = time.perf_counter() - start
    peak = memory_kib()["VmHWM"]
    gc.collect()
    times = [first]
    for _ in range(repeats - 1):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    growth_mib = (peak - before) / 1024
    return {"time": min(times), "peak_growth_mib": growth_mib, "beyond_outputs_mib": growth_mib - out_bytes / 2**20}
