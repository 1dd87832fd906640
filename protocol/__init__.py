"""Conjure's wire protocol: signed multipart ZeroMQ messages, mesh payloads, parameters.

Pure Python (standard library, numpy, pyzmq); also vendored into the Blender add-on, so
every import inside this package is relative.
"""

from .connection import ConnectionInfo, default_connection_path, read_connection_file, write_connection_file
from .errors import ERROR_CODES, ProtocolError
from .mesh import MAX_FACES, MAX_TEXTURE_SIDE, MAX_VERTICES, MeshPayload, decode_mesh, encode_mesh
from .messages import (
    BUFFER_DTYPES,
    JOB_STATES,
    MAX_CHUNK_BYTES,
    MAX_MESSAGE_BYTES,
    MSG_TYPES,
    PROTOCOL_MAJOR,
    PROTOCOL_TAG,
    PROTOCOL_VERSION,
    Message,
    Session,
    default_limits,
    is_job_id,
    new_job_id,
    validate_content,
    version_compatible,
)
from .params import GenerationParams, validate_params
from .signing import ReplayGuard, Signer, new_key

__all__ = [
    "BUFFER_DTYPES", "ConnectionInfo", "ERROR_CODES", "GenerationParams", "JOB_STATES", "MAX_CHUNK_BYTES",
    "MAX_FACES", "MAX_MESSAGE_BYTES", "MAX_TEXTURE_SIDE", "MAX_VERTICES", "MSG_TYPES", "MeshPayload",
    "Message", "PROTOCOL_MAJOR", "PROTOCOL_TAG", "PROTOCOL_VERSION", "ProtocolError", "ReplayGuard",
    "Session", "Signer", "decode_mesh", "default_connection_path", "default_limits", "encode_mesh", "is_job_id",
    "new_job_id", "new_key", "read_connection_file", "validate_content", "validate_params",
    "version_compatible", "write_connection_file",
]
