"""/v1/files: OpenAI's files API for fine-tuning data, stored in the vault.

An upload (multipart, as the openai client sends it) is read into memory, never spooled to a
temporary file, validated line by line and encrypted; only purpose "fine-tune" is stored. A
tenant's key sees only its own files; another tenant's file id is answered exactly like a
missing one. Deleting a file crypto-shreds it (vault.remove_file).
"""

import asyncio
import email.parser
import email.policy
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from loraplex.registry.tenants import Principal
from loraplex.server.protocol import OpenAIError, refuse_unknown_query
from loraplex.server.serving import Serving
from loraplex.server.tenant_data import read_body
from loraplex.vault import DatasetFile, DatasetNotFound, InvalidDataset, Vault, VaultError

PURPOSE = "fine-tune"
MULTIPART_OVERHEAD = 64 * 1024  # the form's boundaries and part headers, beyond the file


def files_router(serving: Serving, vault: Vault) -> APIRouter:
    router = APIRouter(prefix="/v1/files")
    Tenant = Annotated[Principal, Depends(serving.authenticate)]

    @router.post("")
    async def upload(request: Request, principal: Tenant):
        body = await read_body(request, vault.max_dataset_bytes + MULTIPART_OVERHEAD)
        fields, filename, data = _parse_form(request.headers.get("content-type", ""), body)
        purpose = fields.get("purpose")
        if purpose != PURPOSE:
            raise OpenAIError(400, f"purpose must be '{PURPOSE}' (the only files this server "
                              f"keeps are fine-tuning data), got {purpose!r}", param="purpose")
        try:
            stored = await asyncio.to_thread(vault.add_file, principal.tenant_name, filename,
                                             purpose, data, actor=f"key:{principal.key_id}")
        except InvalidDataset as e:
            raise OpenAIError(400, str(e), param="file", code="invalid_file_format") from None
        return _file_json(stored)

    @router.get("")
    async def list_files(request: Request, principal: Tenant, purpose: str | None = None,
                         limit: int = Query(10_000, ge=1, le=10_000),
                         order: Literal["asc", "desc"] = "desc", after: str | None = None):
        refuse_unknown_query(request, ("purpose", "limit", "order", "after"))
        files = await asyncio.to_thread(vault.list_files, principal.tenant_name)
        files = [f for f in files if purpose is None or f.purpose == purpose]
        if order == "asc":
            files.reverse()
        if after is not None:
            ids = [f.id for f in files]
            if after not in ids:
                raise OpenAIError(400, f"after: no file {after!r} in this list", param="after")
            files = files[ids.index(after) + 1:]
        page = [_file_json(f) for f in files[:limit]]
        return {"object": "list", "data": page, "has_more": len(files) > limit,
                "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None}

    @router.get("/{file_id}")
    async def retrieve(file_id: str, principal: Tenant):
        return _file_json(_found(vault.get_file, principal.tenant_name, file_id))

    @router.get("/{file_id}/content")
    async def content(file_id: str, principal: Tenant):
        found = _found(vault.get_file, principal.tenant_name, file_id)
        try:
            data = await asyncio.to_thread(vault.read_bytes, principal.tenant_name, found.id, 1)
        except VaultError as e:  # a file that fails its integrity check: say so, serve nothing
            raise OpenAIError(500, str(e), "server_error") from None
        return Response(data, media_type="application/jsonl")

    @router.delete("/{file_id}")
    async def delete(file_id: str, principal: Tenant):
        await asyncio.to_thread(_found, vault.remove_file, principal.tenant_name, file_id,
                                actor=f"key:{principal.key_id}")
        return {"id": file_id, "object": "file", "deleted": True}

    return router


def _found(function, tenant: str, file_id: str, **kwargs):
    try:
        return function(tenant, file_id, **kwargs)
    except DatasetNotFound:
        raise OpenAIError(404, f"No such File object: {file_id}", param="id") from None


def _parse_form(content_type: str, body: bytes) -> tuple[dict[str, str], str, bytes]:
    """(text fields, the file's name, the file's bytes) of a multipart/form-data body."""
    if not content_type.startswith("multipart/form-data"):
        raise OpenAIError(400, "the upload must be multipart/form-data with a 'file' and a "
                          "'purpose' field")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"content-type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    fields, files = {}, []
    for part in message.iter_parts() if message.is_multipart() else ():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True) or b""
        if name == "file" and part.get_filename() is not None:
            files.append((part.get_filename(), payload))
        elif name is not None:
            fields[name] = payload.decode("utf-8", "replace")
    if len(files) != 1:
        raise OpenAIError(400, f"the upload must hold exactly one file in the 'file' field, "
                          f"found {len(files)}", param="file")
    filename, data = files[0]
    if not 1 <= len(filename) <= 255:
        raise OpenAIError(400, "the file's name must be 1-255 characters", param="file")
    return fields, filename, data


def _file_json(found: DatasetFile) -> dict:
    return {"id": found.id, "object": "file", "bytes": found.dataset.size_bytes,
            "created_at": found.created_at, "filename": found.filename,
            "purpose": found.purpose, "status": "processed", "expires_at": None,
            "status_details": None}
