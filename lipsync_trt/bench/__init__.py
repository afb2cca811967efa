"""Every benchmark: `python -m lipsync_trt.bench [NAME] [options]` (`--help` lists them; `commands` finds each module
that sets BENCHMARK = (name, line) and has main(argv)): offline (the default: backends and batch sizes against the
SyncTalk_2D baseline), serve (the streaming server under concurrent streams), distributed (Ray batch and Ray Serve
against no Ray), template-cache, live (idle frames and push() of `LipSync.live`), webrtc (the WebRTC door),
and the Pipecat door's.

cli (offline's options, the run), inputs, configs (what is measured), offline (loading and sampling), baseline +
reference (the SyncTalk_2D per-frame structure, also the tests' oracle), measure (timers, memory, summaries),
machine, flops, analysis, report (table, JSON, compare), plot; serve, distributed, template_cache, live, webrtc
(the other benchmarks), commands (the listing and the dispatch).
"""
