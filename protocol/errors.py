"""The one exception type that leaves protocol decoding and validation."""

from __future__ import annotations

#: Every code the protocol package raises, with what it means.
ERROR_CODES: dict[str, str] = {
    "bad_frame_count": "the multipart message has too few or too many frames",
    "bad_tag": "the protocol tag frame is missing or names another protocol/major version",
    "bad_signature": "the HMAC signature is missing, malformed or wrong",
    "replayed": "this signature was already seen (replayed message)",
    "expired": "the header time is outside the accepted time window",
    "bad_json": "a JSON frame is not valid UTF-8 JSON, or is nested too deeply",
    "bad_header": "the header has missing fields or fields of the wrong type",
    "bad_content": "the content does not match the schema of its message type",
    "bad_buffer": "a binary buffer does not match its descriptor (dtype, shape, byte length)",
    "bad_mesh": "a mesh payload is malformed (indices out of range, non-finite floats, ...)",
    "too_large": "a frame, message, count or size exceeds a hard limit",
    "invalid_params": "generation parameters are invalid (the error names the field)",
    "bad_params": "an override is unknown, of the wrong type or out of its documented range (local parsing; "
                  "the server answers such a submit with invalid_params)",
    "unknown_msg_type": "the message type is not one of MSG_TYPES",
    "version_mismatch": "the peer speaks another major protocol version",
    "bad_connection_file": "the connection file is missing, unreadable or malformed",
    "bad_key": "the signing key is empty or of the wrong type",
}


class ProtocolError(Exception):
    """Something is wrong with a message, a payload or parameters.

    Attributes:
        code: short snake_case error code (see ``ERROR_CODES``), e.g. ``"bad_signature"``.
        message: human-readable explanation.
        field: for validation errors, the dotted name of the offending field
            (``"prompt"``, ``"overrides.coarse.steps"``, ``"mesh.faces"``); else None.
        request: set by ``Session.deserialize`` when the message was correctly signed and its
            header is valid but its content is not: a content-less ``Message`` with the sender's
            ids, so a server can answer it; else None.
    """

    request = None

    def __init__(self, code: str, message: str, field: str | None = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.field = field

    def to_content(self, retriable: bool = False) -> dict:
        """Content dict for an ``error`` message describing this error."""
        content = {"code": self.code, "message": self.message, "retriable": retriable}
        if self.field is not None:
            content["field"] = self.field
        return content
