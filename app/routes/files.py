"""``POST /v1/files`` (purpose ``fine-tune``) and ``GET /v1/files/{id}``, in OpenAI's shapes.

A training file is chat-format JSONL, checked line by line on upload: a malformed line is a 400
naming its number, before any job can use the file. Size and row limits are
``PERSONA_MAX_UPLOAD_BYTES`` and ``PERSONA_MAX_TRAINING_ROWS``."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from starlette.datastructures import UploadFile

from app.auth import Admin, User
from app.deps import State
from app.errors import APIError
from app.training import FineTuning
from steering.finetune import TrainingFileError, check_chat_file

router = APIRouter()
_COPY_CHUNK = 1 << 20


def get_fine_tuning(request: Request) -> FineTuning:
    return request.app.state.fine_tuning


FT = Annotated[FineTuning, Depends(get_fine_tuning)]


@router.post("/v1/files", openapi_extra={"requestBody": {"content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file", "purpose"],
    "properties": {"file": {"type": "string", "format": "binary"}, "purpose": {"type": "string"}}}}}}})
async def upload_file(request: Request, state: State, ft: FT, _who: Admin):
    limit = state.settings.max_upload_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit + 64 * 1024:
        raise APIError(413, f"the file is larger than {limit} bytes", param="file", code="payload_too_large")
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise APIError(400, "send the file as multipart/form-data with fields 'file' and 'purpose'", param="file")
    async with request.form(max_files=1, max_fields=4) as form:
        purpose, upload = form.get("purpose"), form.get("file")
        if purpose != "fine-tune":
            raise APIError(400, "purpose must be 'fine-tune' (the only purpose this server keeps files for)", param="purpose")
        if not isinstance(upload, UploadFile):
            raise APIError(400, "the form needs a 'file' part with the JSONL training data", param="file")
        spool = ft.files.spool()
        size = 0
        try:
            with open(spool, "wb") as out:
                while chunk := await upload.read(_COPY_CHUNK):
                    size += len(chunk)
                    if size > limit:
                        raise APIError(413, f"the file is larger than {limit} bytes", param="file", code="payload_too_large")
                    out.write(chunk)
            try:
                await asyncio.to_thread(check_chat_file, spool, max_rows=state.settings.max_training_rows)
            except TrainingFileError as exc:
                raise APIError(400, f"invalid training file: {exc}", param="file", code="invalid_training_file",
                               extra={"line": exc.line}) from None
            return ft.files.add(spool, filename=upload.filename or "upload.jsonl", purpose=purpose)
        finally:
            spool.unlink(missing_ok=True)


@router.get("/v1/files/{file_id}")
async def get_file(file_id: str, ft: FT, _user: User):
    obj = ft.files.get(file_id)
    if obj is None:
        raise APIError(404, f"no file '{file_id}'", type="not_found_error", param="file_id", code="file_not_found")
    return obj
