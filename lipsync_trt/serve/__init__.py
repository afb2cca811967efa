"""Real-time streaming server (issue #6), the transport over the library's streaming core (lipsync_trt.stream)
and batcher (lipsync_trt.batcher): the binary WebSocket protocol (protocol.py), chunk ids and in-order answers
(session.py), the batcher plus JPEG/ZIP packing (scheduler.py), the aiohttp app and browser client (server.py,
static/) and the `serve` subcommand (cli.py). docs/PROTOCOL.md describes the wire format.

aiohttp is imported only by server.py / cli.py (pip install 'lipsync_trt[serve]')."""
