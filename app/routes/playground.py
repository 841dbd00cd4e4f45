"""``GET /``: the steering playground, plain HTML/CSS/JS from ``app/static`` (no build step, no CDN)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

router = APIRouter()
STATIC_DIR = Path(__file__).resolve().parents[1] / "static"


@router.get("/", include_in_schema=False)
async def playground() -> FileResponse:
    # The page holds no data of its own: every call it makes goes through the API and its keys.
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html")
