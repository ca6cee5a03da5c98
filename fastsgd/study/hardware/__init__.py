"""The hardware half: time (and energy) per optimizer step against batch size.

- :mod:`.step_time`: the measured sweep (``measure_step_times``) and its files
- :mod:`.fit`: the fitted model t(B) = t0 + B / throughput
- :mod:`.energy`: GPU energy per step from NVML power samples
"""
