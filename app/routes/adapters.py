"""LoRA adapters: vLLM's ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` (the adapter
is a PEFT directory on the server's disk) and ``/v1/adapters`` (list, upload, delete) for clients
that cannot reach that disk. All writes are admin calls; requests pick an adapter by ``model``."""

from __future__ import annotations

import asyncio
import io
import tarfile
import zlib
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from app.auth import Admin, User
from app.deps import ServerState, State
from app.errors import APIError
from app.generation import check_adapter_served, check_model, require_lora
from app.routes.vectors import _read_limited
from app.schemas import LoadLoraAdapterRequest, UnloadLoraAdapterRequest
from steering.adapters import (CONFIG_FILE, PICKLED_WEIGHTS_FILE, WEIGHTS_FILE, Adapter, AdapterError,
                               validate_adapter_name)

router = APIRouter()


def requested_adapter(state: ServerState, model: str | None) -> Adapter | None:
    """The adapter that the ``model`` field of a tool route (assessment, screening, extraction)
    names, so an adapter is measured with the same tools as the base model. None (field absent,
    ``default`` or the served model's name) is the base model; anything else not loaded is 404
    naming ``model``, as on the generation routes."""
    if model is None:
        return None
    return check_adapter_served(state, check_model(state, model))


@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(body: LoadLoraAdapterRequest, state: State, _admin: Admin):
    """Serve the PEFT directory ``lora_path`` (on the server's disk) as ``lora_name``; it is copied
    into the data directory, so it is served again after a restart."""
    name = validate_adapter_name(body.lora_name)
    require_lora(state, param=None)
    adapter = await asyncio.to_thread(state.adapters.add, name, Path(body.lora_path))
    return adapter.summary()


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(body: UnloadLoraAdapterRequest, state: State, _admin: Admin):
    """Stop serving ``lora_name``; requests already running with it finish with it."""
    await asyncio.to_thread(state.adapters.remove, body.lora_name)
    return {"id": body.lora_name, "object": "adapter", "deleted": True}


@router.get("/v1/adapters")
async def list_adapters(state: State, _user: User):
    return {"object": "list", "data": [a.summary() for a in state.adapters.list()]}


@router.get("/v1/adapters/{name}")
async def get_adapter(name: str, state: State, _user: User):
    return state.adapters.get(name, param="name").summary()


def _untar(data: bytes, limit: int) -> tuple[bytes, bytes]:
    """PEFT's two files from a tar archive (plain or compressed), read by name, never extracted
    to disk; other members (a README, the directory entry) are ignored, a pickled .bin refused.
    A member over ``limit`` bytes unpacked is refused before it is read (a compression bomb)."""
    files: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as archive:
            for member in archive.getmembers():
                base = member.name.rsplit("/", 1)[-1]
                if base == PICKLED_WEIGHTS_FILE:
                    raise AdapterError(f"the archive holds {PICKLED_WEIGHTS_FILE}, a pickle, which this server never "
                                       "loads; save the adapter with safe_serialization=True", param=PICKLED_WEIGHTS_FILE)
                if base in (CONFIG_FILE, WEIGHTS_FILE) and member.isfile():
                    if base in files:
                        raise AdapterError(f"the archive holds {base} twice", param=base)
                    if member.size > limit:
                        raise APIError(413, f"{base} unpacks to {member.size} bytes, over {limit}",
                                       code="payload_too_large")
                    files[base] = archive.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise AdapterError(f"the upload is not a readable tar archive ({exc}); send `tar -cf - -C DIR "
                           f"{CONFIG_FILE} {WEIGHTS_FILE}`", param="body") from exc
    for needed in (CONFIG_FILE, WEIGHTS_FILE):
        if needed not in files:
            raise AdapterError(f"the archive has no {needed}", param=needed)
    return files[CONFIG_FILE], files[WEIGHTS_FILE]


@router.put(
    "/v1/adapters/{name}",
    openapi_extra={"requestBody": {"content": {"application/x-tar": {"schema": {"type": "string", "format": "binary"}}}}},
)
async def put_adapter(name: str, state: State, http: Request, _admin: Admin):
    """Upload a PEFT adapter as a tar archive of its directory (``adapter_config.json`` and
    ``adapter_model.safetensors``; gzip allowed). Replaces an adapter of the same name (201 when
    new, 200 when replaced); requests already running keep the one they started with."""
    name = validate_adapter_name(name, param="name")
    require_lora(state, param=None)
    data = await _read_limited(http, state.settings.max_upload_bytes)
    if not data:
        raise APIError(400, "the body is empty; send a tar archive of the adapter directory", param="body")
    config, weights = _untar(data, state.settings.max_upload_bytes)
    existed = name in state.adapters
    adapter = await asyncio.to_thread(state.adapters.add_bytes, name, config, weights, replace=True)
    return JSONResponse(adapter.summary(), status_code=200 if existed else 201)


@router.delete("/v1/adapters/{name}")
async def delete_adapter(name: str, state: State, _admin: Admin):
    await asyncio.to_thread(state.adapters.remove, name)
    return {"id": name, "object": "adapter", "deleted": True}
