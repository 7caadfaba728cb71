"""Per run and GPU, what nvidia-smi saw while the GPU was busy: SM clock, power, temperatures and how
often the driver held the clocks down, and why (bench/gpu_ddp_levers.sh PART=i).

    python bench/smi_summary.py smi.csv marks.txt

smi.csv is `nvidia-smi --query-gpu=timestamp,index,clocks.sm,... --format=csv -lms 500`; marks.txt
has one `HH:MM:SS.mmm NAME` line where each run starts (the last one ends the previous run).
"""
import sys

import pandas as pd

# nvidia-smi's clocks event reasons (nvml.h): the bits that mean the clocks were held down.
REASONS = {"power_cap": 0x4, "hw_slowdown": 0x8, "sw_thermal": 0x20, "hw_thermal": 0x40, "power_brake": 0x80}
BUSY_PERCENT = 50  # samples of compiling, loading and saving are left out


def main(smi_csv, marks_txt):
    smi = pd.read_csv(smi_csv, skipinitialspace=True)
    smi.columns = [c.split(" [")[0].replace("clocks.current.", "clocks.") for c in smi.columns]
    smi = smi[pd.to_numeric(smi["index"], errors="coerce").notna()]  # drops repeated headers
    stamp = pd.to_datetime(smi["timestamp"], format="%Y/%m/%d %H:%M:%S.%f")
    smi["t"] = (stamp - stamp.dt.normalize()).dt.total_seconds()  # seconds since midnight, as marks.txt
    for col in ("clocks.sm", "clocks.memory", "power.draw", "power.limit", "temperature.gpu",
                "temperature.memory", "utilization.gpu"):  # "1590 MHz", "[N/A]" -> 1590, NaN
        smi[col] = pd.to_numeric(smi[col].astype(str).str.split().str[0], errors="coerce")
    reason_col = next((c for c in smi.columns if "reasons" in c), None)  # absent on old drivers
    marks = [(pd.to_timedelta(t).total_seconds(), name) for t, name in
             (line.split()[:2] for line in open(marks_txt))]
    rows = []
    for (start, name), (end, _) in zip(marks, marks[1:]):
        run = smi[(smi["t"] >= start) & (smi["t"] < end) & (smi["utilization.gpu"] >= BUSY_PERCENT)]
        for gpu, g in run.groupby("index"):
            row = {"run": name, "gpu": gpu, "busy_samples": len(g),
                   "sm_mhz_median": g["clocks.sm"].median(), "sm_mhz_min": g["clocks.sm"].min(),
                   "power_w_median": g["power.draw"].median(), "power_limit_w": g["power.limit"].median(),
                   "temp_c_max": g["temperature.gpu"].max(), "mem_temp_c_max": g["temperature.memory"].max()}
            if reason_col:
                bits = g[reason_col].astype(str).map(lambda v: int(v, 16) if v.startswith("0x") else 0)
                for reason, bit in REASONS.items():
                    row[reason] = round(float((bits & bit).astype(bool).mean()), 2)
            rows.append(row)
    print(pd.DataFrame(rows).to_string(index=False))


if __name__ == "__main__":
    main(*sys.argv[1:3])
