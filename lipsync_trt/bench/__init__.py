"""The benchmarks: `python -m lipsync_trt.bench` (offline: backends and batch sizes against the SyncTalk_2D
baseline) and `python -m lipsync_trt.serve.bench` (the streaming server under concurrent streams).

cli (options, the run), inputs, configs (what is measured), offline (loading and sampling), baseline + reference
(the SyncTalk_2D per-frame structure, also the tests' oracle), measure (timers, memory, summaries), machine,
flops, analysis, report (table, JSON, compare), plot.
"""
