"""Side-by-side benchmarks of runtimed against containerd 1.6: `bench/run [--quick] [--rows ...]`.

main.py     the command: namespace and /run set-up, the order of rows, exit status, clean-up
daemons.py  the processes it starts (registry, runtimed, containerd) on private temp paths
images.py   the benchmark images, generated from a seed and cached in bench/.cache/
rows.py     the measurements, one function per row group
measure.py  Row (samples, median, ratio, verdict) and /proc readings (RSS, PSS, CPU)
report.py   the console table, bench/results/latest.md and latest.png
"""
