"""``/v1/vectors``: list, read, upload (safetensors or JSON) and delete persona vectors."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

import torch
from fastapi import APIRouter, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from app.auth import Admin, User
from app.deps import State
from app.errors import APIError
from app.schemas import VectorUpload
from steering.formats import export_gguf, import_gguf, import_pt
from steering.vector import ModelRef, PersonaVector, VectorFormatError, validate_name

router = APIRouter()


def summary(v: PersonaVector) -> dict:
    return {
        "id": v.name,
        "object": "vector",
        **{k: val for k, val in v.metadata().items() if k not in ("name", "extra")},
        "layer_norms": [round(float(x), 4) for x in v.directions.norm(dim=-1)],
    }


def _name(name: str) -> str:
    try:
        return validate_name(name)
    except VectorFormatError as exc:
        raise APIError(400, str(exc), param="name", code="invalid_name") from exc


@router.get("/v1/vectors")
async def list_vectors(state: State, _user: User):
    state.registry.store.sync()
    return {"object": "list", "data": [summary(v) for v in state.registry.list()]}


IfMatch = Annotated[str | None, Header(description="write only if the stored vector has this ETag (412 otherwise)")]
IfNoneMatch = Annotated[str | None, Header(description="'*': create only, 412 if the vector exists")]


@router.get("/v1/vectors/{name}")
async def get_vector(name: str, state: State, _user: User, format: str = "json"):
    """One vector; its ``ETag`` (the same on every replica, whatever the format) is what a
    conditional ``PUT`` / ``DELETE`` names in ``If-Match``."""
    name = _name(name)
    state.registry.store.sync()  # reads of the registry see every completed write, on any replica
    vector, etag = state.registry.get(name), state.registry.etag(name)
    tag = {"ETag": f'"{etag}"'}
    if format == "safetensors":
        return Response(
            vector.to_bytes(),
            media_type="application/octet-stream",
            headers={"Content-Disposition": f'attachment; filename="{vector.name}.safetensors"', **tag},
        )
    if format == "gguf":
        with tempfile.TemporaryDirectory() as tmp:
            export_gguf(vector, Path(tmp) / "v.gguf")
            data = (Path(tmp) / "v.gguf").read_bytes()
        return Response(data, media_type="application/octet-stream",
                        headers={"Content-Disposition": f'attachment; filename="{vector.name}.gguf"', **tag})
    if format != "json":
        raise APIError(400, "format must be 'json', 'safetensors' or 'gguf'", param="format")
    return JSONResponse(summary(vector), headers=tag)


async def _read_limited(http: Request, limit: int) -> bytes:
    declared = http.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"upload is larger than {limit} bytes", code="payload_too_large")
    chunks, size = [], 0
    async for chunk in http.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"upload is larger than {limit} bytes", code="payload_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _is_json(content_type: str, data: bytes) -> bool:
    """Whether an upload is the JSON form: declared so, or sent without a binary type (``curl -d``)
    and shaped like JSON. A safetensors file starts with an 8-byte little-endian header length,
    which always holds a zero byte; JSON text never does."""
    declared = content_type.split(";")[0].strip().lower()
    if declared == "application/json":
        return True
    return declared != "application/octet-stream" and data.lstrip()[:1] == b"{" and b"\x00" not in data[:8]


@router.put(
    "/v1/vectors/{name}",
    openapi_extra={
        "requestBody": {
            "content": {
                "application/json": {"schema": VectorUpload.model_json_schema()},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            }
        }
    },
)
async def put_vector(name: str, state: State, http: Request, _admin: Admin, format: str = "safetensors",
                     if_match: IfMatch = None, if_none_match: IfNoneMatch = None):
    """Upload a vector as a safetensors file (``application/octet-stream``, metadata in the
    header as written by this server), as JSON (``directions`` for the loaded model), or
    import a llama.cpp / repeng control vector (``?format=gguf``) or a persona-vectors tensor
    (``?format=pt``, loaded without pickle code). ``If-Match`` / ``If-None-Match: *`` make the
    write conditional (412 when the stored vector changed since it was read)."""
    name = _name(name)
    data = await _read_limited(http, state.settings.max_upload_bytes)
    lm = state.lm
    ref = ModelRef(lm.name, lm.fingerprint, lm.num_layers, lm.hidden_size)
    if format in ("gguf", "pt"):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"upload.{format}"
            path.write_bytes(data)
            vector = (import_gguf if format == "gguf" else import_pt)(path, name=name, model=ref)
    elif format != "safetensors":
        raise APIError(400, "format must be 'safetensors', 'gguf' or 'pt'", param="format")
    elif _is_json(http.headers.get("content-type", ""), data):
        try:
            upload = VectorUpload.model_validate_json(data)
        except ValidationError as exc:
            raise RequestValidationError(exc.errors()) from exc
        vector = PersonaVector(
            name=name,
            directions=torch.tensor(upload.directions, dtype=torch.float32),
            model=ref,
            description=upload.description,
            method=upload.method,
            recommended_layer=upload.recommended_layer,
            coefficient_range=upload.coefficient_range,
        )
    else:
        vector = PersonaVector.from_bytes(data, name=name)
    stored = state.registry.put(vector, if_match=if_match, if_none_match=if_none_match)
    return JSONResponse(summary(vector), status_code=201 if stored.created else 200,
                        headers={"ETag": f'"{stored.etag}"'})


@router.delete("/v1/vectors/{name}")
async def delete_vector(name: str, state: State, _admin: Admin, if_match: IfMatch = None):
    state.registry.delete(_name(name), if_match=if_match)
    return {"id": name, "object": "vector", "deleted": True}
