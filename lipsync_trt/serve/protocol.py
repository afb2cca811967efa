"""The binary WebSocket protocol of the live lip-sync client (docs/PROTOCOL.md), kept byte for byte.

Request (client -> server), one binary message per 40 ms chunk:
    16-byte header, 4 x uint32 little-endian: [model-name length, frame id, audio byte length, reserved = 0]
    model name (UTF-8), then audio: float32 little-endian, 24 kHz mono, 960 samples (3,840 bytes).
    Audio byte length 0 = end of stream (an extension the original client never sends).
Response (server -> client), binary:
    16-byte header, 4 x uint32 little-endian: [status, frame id, zip length, reserved = 0]
    then `zip length` bytes: a ZIP holding frame.jpg + bbox.bin (4 float32 x1, y1, x2, y2) for status 0,
    error.txt (short UTF-8 reason) for errors, or nothing.
"""
from __future__ import annotations

import io
import struct
import zipfile
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np

from .. import recipe as R
from ..audio import check_samples
from ..errors import AudioError

HEADER = struct.Struct("<4I")
HEADER_BYTES = HEADER.size                   # 16
STREAM_RATE = 24000                          # Hz, the client's audio
CHUNK_SAMPLES = R.exact_div(STREAM_RATE, int(R.FPS))   # 960: 40 ms at 24 kHz = one video frame at 25 fps
CHUNK_SECONDS = CHUNK_SAMPLES / STREAM_RATE  # 0.04: a real-time client sends one chunk this often
CHUNK_BYTES = CHUNK_SAMPLES * 4              # 3,840
MAX_NAME_BYTES = 64                          # model (avatar) name
MAX_MESSAGE_BYTES = 16 * 1024                # larger requests are answered MALFORMED (connection kept)
WS_MAX_MESSAGE_BYTES = 1 << 20               # larger WebSocket messages close the connection (code 1009)
MAX_GAP_CHUNKS = 250                         # a frame id may skip at most this many chunks (10 s of silence)
BOX_BYTES = 16

FRAME_FILE, BOX_FILE, ERROR_FILE, REUSED_FILE = "frame.jpg", "bbox.bin", "error.txt", "reused.txt"


class Status(IntEnum):
    OK = 0                  # ZIP with frame.jpg + bbox.bin (+ reused.txt when the mouth is a reused one)
    MALFORMED = 1           # the request cannot be used (header, lengths, reserved, UTF-8, size, NaN/huge, id jump)
    UNKNOWN_MODEL = 2       # the model name is not an avatar this server was started with
    WRONG_SAMPLE_COUNT = 3  # audio byte length is neither 3,840 (960 samples) nor 0 (end of stream)
    OVERLOADED = 4          # frame dropped: queue of this stream full (policy reject) or too many streams
    INTERNAL = 5            # the server failed making this frame
    END = 6                 # after the last frame of a stream that the client ended; frame id = frames made


class ProtocolError(Exception):
    """A request the server answers with an error status (the connection stays open)."""

    def __init__(self, status: Status, reason: str, frame_id: int = 0):
        super().__init__(reason)
        self.status, self.reason, self.frame_id = Status(status), reason, frame_id


@dataclass
class Request:
    model: str
    frame_id: int
    audio: np.ndarray          # float32 (960,), or (0,) at end of stream

    @property
    def end(self) -> bool:
        return self.audio.size == 0


def encode_request(model: str, frame_id: int, audio: np.ndarray | None) -> bytes:
    """A request message; audio None or empty = end of stream."""
    name = model.encode("utf-8")
    data = b"" if audio is None else np.ascontiguousarray(audio, dtype="<f4").tobytes()
    return HEADER.pack(len(name), frame_id, len(data), 0) + name + data


def decode_request(msg: bytes, max_message: int = MAX_MESSAGE_BYTES) -> Request:
    """Parse and validate a request; ProtocolError (status + reason + frame id when readable) otherwise."""
    n = len(msg)
    if n < HEADER_BYTES:
        raise ProtocolError(Status.MALFORMED, f"message of {n} bytes is shorter than the 16-byte header")
    name_len, frame_id, audio_len, reserved = HEADER.unpack_from(msg)
    if n > max_message:
        raise ProtocolError(Status.MALFORMED, f"message of {n} bytes exceeds the limit of {max_message}", frame_id)
    if reserved != 0:
        raise ProtocolError(Status.MALFORMED, f"reserved header field is {reserved}, expected 0", frame_id)
    if name_len == 0 or name_len > MAX_NAME_BYTES:
        raise ProtocolError(Status.MALFORMED, f"model name length {name_len} is outside 1..{MAX_NAME_BYTES}", frame_id)
    if HEADER_BYTES + name_len + audio_len != n:
        raise ProtocolError(Status.MALFORMED, f"header says 16 + {name_len} + {audio_len} bytes, message has {n}",
                            frame_id)
    try:
        model = msg[HEADER_BYTES:HEADER_BYTES + name_len].decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(Status.MALFORMED, "model name is not valid UTF-8", frame_id) from None
    if audio_len % 4:
        raise ProtocolError(Status.MALFORMED, f"audio byte length {audio_len} is not a whole number of float32 samples",
                            frame_id)
    if audio_len not in (0, CHUNK_BYTES):
        raise ProtocolError(Status.WRONG_SAMPLE_COUNT, f"{audio_len // 4} samples; expected {CHUNK_SAMPLES} "
                            f"(40 ms at 24 kHz) or 0 (end of stream)", frame_id)
    audio = np.frombuffer(msg, dtype="<f4", count=audio_len // 4, offset=HEADER_BYTES + name_len).astype(np.float32)
    try:   # NaN/infinite, or finite but absurd (3e38): the library's one rule for samples
        check_samples(audio, f"chunk {frame_id}")
    except AudioError as exc:
        raise ProtocolError(Status.MALFORMED, str(exc), frame_id) from None
    return Request(model=model, frame_id=frame_id, audio=audio)


_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def make_zip(files: dict[str, bytes]) -> bytes:
    """A stored (uncompressed: JPEG does not compress) ZIP with fixed timestamps."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as z:
        for name, data in files.items():
            z.writestr(zipfile.ZipInfo(name, date_time=_ZIP_DATE), data)
    return buf.getvalue()


def frame_zip(jpeg: bytes, box, extra: dict[str, bytes] | None = None) -> bytes:
    """frame.jpg + bbox.bin (x1, y1, x2, y2 as float32 little-endian, x2/y2 exclusive)."""
    files = {FRAME_FILE: jpeg, BOX_FILE: np.asarray(box, dtype="<f4").reshape(4).tobytes()}
    files.update(extra or {})
    return make_zip(files)


def encode_response(status: int, frame_id: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(int(status), frame_id, len(payload), 0) + payload


def error_response(status: int, frame_id: int, reason: str | None = None) -> bytes:
    """An error answer: a ZIP with error.txt (reason, at most 200 bytes of UTF-8) or no payload."""
    payload = b"" if not reason else make_zip({ERROR_FILE: reason.encode("utf-8")[:200]})
    return encode_response(status, frame_id, payload)


@dataclass
class Response:
    status: int
    frame_id: int
    files: dict[str, bytes] = field(default_factory=dict)

    @property
    def jpeg(self) -> bytes | None:
        return self.files.get(FRAME_FILE)

    @property
    def box(self) -> tuple[float, float, float, float] | None:
        b = self.files.get(BOX_FILE)
        return None if b is None else tuple(float(v) for v in np.frombuffer(b, dtype="<f4"))

    @property
    def error(self) -> str | None:
        e = self.files.get(ERROR_FILE)
        return None if e is None else e.decode("utf-8", "replace")

    @property
    def reused(self) -> bool:
        return REUSED_FILE in self.files


def decode_response(msg: bytes) -> Response:
    """Parse a response (clients, tests); ValueError when it is not one."""
    if len(msg) < HEADER_BYTES:
        raise ValueError(f"response of {len(msg)} bytes is shorter than the header")
    status, frame_id, zip_len, reserved = HEADER.unpack_from(msg)
    if reserved != 0 or HEADER_BYTES + zip_len != len(msg):
        raise ValueError(f"bad response header: zip length {zip_len}, reserved {reserved}, message {len(msg)} bytes")
    files = {}
    if zip_len:
        with zipfile.ZipFile(io.BytesIO(msg[HEADER_BYTES:])) as z:
            files = {name: z.read(name) for name in z.namelist()}
    if status == Status.OK and (FRAME_FILE not in files or len(files.get(BOX_FILE, b"")) != BOX_BYTES):
        raise ValueError("status 0 response without frame.jpg and a 16-byte bbox.bin")
    return Response(status=status, frame_id=frame_id, files=files)
