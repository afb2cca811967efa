"""Real-time streaming server (issue #6): the binary WebSocket protocol (protocol.py), per-stream state
(session.py), cross-stream batching (scheduler.py), the aiohttp app and browser client (server.py, static/)
and the `serve` subcommand (cli.py). docs/PROTOCOL.md describes the wire format.

aiohttp is imported only by server.py / cli.py (pip install 'lipsync_trt[serve]')."""
