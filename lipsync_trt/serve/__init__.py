"""Real-time streaming server (issue #6), the transport over the library's streaming core (lipsync_trt.stream)
and batcher (lipsync_trt.batcher): the binary WebSocket protocol (protocol.py), chunk ids and in-order answers
(session.py), one client connection whatever carries it (connection.py), the models and the batcher plus JPEG/ZIP
packing (scheduler.py), the options (config.py), the HTTP answers as plain data (routes.py) and /metrics (metrics.py),
the server with its aiohttp app, thread and CLI runner (server.py), the browser client (static/), WebRTC
(webrtc.py) and the `serve` subcommand (cli.py). docs/PROTOCOL.md describes the wire format.

aiohttp is imported only by server.py / cli.py, prometheus_client only when /metrics is asked for (both: pip install
'lipsync_trt[serve]')."""
