"""The double's HTTP routes: ComfyUI's API (also under ``/api``), quirks included, plus ``/gpubridge/*``."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import ipaddress
import json
import os
import socket
import sys
import urllib.parse
from collections.abc import Awaitable, Callable
from io import BytesIO
from typing import TYPE_CHECKING, Any

from aiohttp import web

from ._media import CONTENT_TYPES
from ._objectinfo import MODEL_FOLDERS

if TYPE_CHECKING:
    from ._double import ComfyDouble

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

EXTENSIONS = [
    "/extensions/core/groupNode.js",
    "/extensions/core/maskEditorOld.js",
    "/extensions/core/clipspace.js",
    "/extensions/core/maskEditorLayerFilenames.js",
    "/extensions/core/widgetInputs.js",
]
INDEX_HTML = (
    '<!doctype html><html lang="en"><head><meta charset="UTF-8"><title>ComfyUI</title></head>'
    "<body><p>gpubridge ComfyUI test double (ComfyUI 0.3.64 API)</p></body></html>"
)


def trouble(request: web.BaseRequest) -> web.Response:
    """What aiohttp answers when a handler raises: ComfyUI's "Server got itself in trouble" 500."""
    title = "500 Internal Server Error"
    message = "Server got itself in trouble"
    if "text/html" in request.headers.get("Accept", ""):
        body = (
            f"<html><head><title>{title}</title></head><body>\n<h1>{title}</h1>\n{message}\n</body></html>\n"
        )
        response = web.Response(status=500, text=body, content_type="text/html")
    else:
        response = web.Response(status=500, text=f"{title}\n\n{message}", content_type="text/plain")
    response.force_close()
    return response


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status)


def _comfy(handler: Handler) -> Handler:
    """Turn any exception into aiohttp's plain 500, as ComfyUI's handlers do (without the log noise)."""

    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception:
            return trouble(request)

    return wrapped


@functools.lru_cache(maxsize=256)
def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(host).is_loopback
    if host == "localhost" or host.endswith(".localhost"):
        return True
    loopback = False
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            for *_, sockaddr in socket.getaddrinfo(host, None, family, socket.SOCK_STREAM):
                if not ipaddress.ip_address(sockaddr[0]).is_loopback:
                    return False
                loopback = True
        except socket.gaierror:
            pass
    return loopback


@web.middleware
async def origin_only(request: web.Request, handler: Handler) -> web.StreamResponse:
    """ComfyUI's guard: a foreign ``Origin`` on a loopback ``Host`` gets an empty 403; OPTIONS gets 200."""
    host = request.headers.get("Host")
    origin = request.headers.get("Origin")
    if host is not None and origin is not None:
        host_domain = host.lower()
        parsed = urllib.parse.urlparse(origin)
        origin_domain = parsed.netloc.lower()
        host_parsed = urllib.parse.urlsplit("//" + host_domain)
        loopback = _is_loopback(host_parsed.hostname)
        if parsed.port is None:
            host_domain = host_parsed.hostname
        if host_parsed.port is None:
            origin_domain = parsed.hostname
        if loopback and host_domain and origin_domain and host_domain != origin_domain:
            return web.Response(status=403)
    if request.method == "OPTIONS":
        return web.Response()
    return await handler(request)


def build_app(double: ComfyDouble) -> web.Application:
    app = web.Application(client_max_size=104857600, middlewares=[origin_only])
    api = web.RouteTableDef()

    # ------------------------------------------------------------------------------ basics

    @api.get("/")
    async def index(request: web.Request) -> web.StreamResponse:
        response = web.Response(body=INDEX_HTML.encode(), content_type="text/html")
        response.headers["Cache-Control"] = "no-cache"
        response.headers["Pragma"] = "no-cache"
        response.headers["Expires"] = "0"
        return response

    @api.get("/system_stats")
    @_comfy
    async def system_stats(request: web.Request) -> web.StreamResponse:
        if double.system_stats is not None:
            return _json(double.system_stats)
        try:
            page = os.sysconf("SC_PAGE_SIZE")
            total, free = os.sysconf("SC_PHYS_PAGES") * page, os.sysconf("SC_AVPHYS_PAGES") * page
        except (ValueError, OSError, AttributeError):
            total = free = 0
        return _json(
            {
                "system": {
                    "os": os.name,
                    "ram_total": total,
                    "ram_free": free,
                    "comfyui_version": "0.3.64",
                    "required_frontend_version": "1.27.10",
                    "installed_templates_version": "0.1.95",
                    "required_templates_version": "0.1.95",
                    "python_version": sys.version,
                    "pytorch_version": "2.13.0+cpu",
                    "embedded_python": False,
                    "argv": list(sys.argv),
                },
                "devices": [
                    {
                        "name": "cpu",
                        "type": "cpu",
                        "index": None,
                        "vram_total": total,
                        "vram_free": free,
                        "torch_vram_total": total,
                        "torch_vram_free": free,
                    }
                ],
            }
        )

    @api.get("/features")
    async def features(request: web.Request) -> web.StreamResponse:
        from ._double import FEATURE_FLAGS

        return _json(dict(FEATURE_FLAGS))

    @api.get("/embeddings")
    async def embeddings(request: web.Request) -> web.StreamResponse:
        return _json([os.path.splitext(name)[0] for name in double.model_files.get("embeddings", [])])

    @api.get("/extensions")
    async def extensions(request: web.Request) -> web.StreamResponse:
        return _json(EXTENSIONS)

    @api.get("/models")
    async def models(request: web.Request) -> web.StreamResponse:
        return _json(list(MODEL_FOLDERS))

    @api.get("/models/{folder}")
    async def models_folder(request: web.Request) -> web.StreamResponse:
        folder = request.match_info["folder"]
        if folder not in MODEL_FOLDERS:
            return web.Response(status=404)
        return _json(list(double.model_files.get(folder, [])))

    @api.get("/users")
    async def users(request: web.Request) -> web.StreamResponse:
        return _json({"storage": "server", "migrated": False})

    @api.get("/object_info")
    @_comfy
    async def object_info(request: web.Request) -> web.StreamResponse:
        _, body = double.served_object_info()
        return web.Response(body=body, content_type="application/json", charset="utf-8")

    @api.get("/object_info/{node_class}")
    @_comfy
    async def object_info_node(request: web.Request) -> web.StreamResponse:
        node_class = request.match_info["node_class"]
        info, _ = double.served_object_info()
        return _json({node_class: info[node_class]} if node_class in info else {})

    # ------------------------------------------------------------------------------ queue

    @api.get("/prompt")
    async def get_prompt(request: web.Request) -> web.StreamResponse:
        return _json({"exec_info": {"queue_remaining": double.queue_remaining}})

    @api.post("/prompt")
    async def post_prompt(request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except Exception:  # malformed JSON, an empty or form-encoded body: the handler raises
            double.note_unreadable_prompt()
            return trouble(request)
        double.stats.prompts_arrived += 1
        from ._double import DoubleEvent

        double._publish(DoubleEvent("prompt_arrived"))
        if double.faults.hold_prompts:  # ComfyUI validates before queueing: a slow validation
            await double.wait_until(lambda: not double.faults.hold_prompts, timeout=None)
        try:
            status, answer = double.submit(body)
        except Exception:  # counted by submit()
            return trouble(request)
        return _json(answer, status)

    @api.get("/queue")
    async def get_queue(request: web.Request) -> web.StreamResponse:
        running = [job.wire() for job in double._running.values()]
        pending = [entry[3].wire() for entry in double._queue]  # heap order, as ComfyUI sends it
        double.stats.queue_reads += 1
        double._notify()
        return _json({"queue_running": running, "queue_pending": pending})

    @api.post("/queue")
    @_comfy
    async def post_queue(request: web.Request) -> web.StreamResponse:
        data = await request.json()
        if "clear" in data and data["clear"]:
            double.clear_pending()
        if "delete" in data:
            for prompt_id in data["delete"]:
                double.delete_pending(prompt_id)
        return web.Response(status=200)

    @api.post("/interrupt")
    @_comfy
    async def post_interrupt(request: web.Request) -> web.StreamResponse:
        double.stats.interrupts += 1
        try:
            data = await request.json()
        except json.JSONDecodeError:
            data = {}
        double.request_interrupt(data.get("prompt_id"))
        return web.Response(status=200)

    @api.post("/jobs/{prompt_id}/cancel")
    @_comfy
    async def post_job_cancel(request: web.Request) -> web.StreamResponse:
        """Newer ComfyUI's atomic per-job cancel (after 0.3.64; comfy-api-proxy uses it): dequeue the
        job if it is pending, interrupt it if it runs, else nothing. The double serves it so that the proxy's
        cancel can be tested; a 0.3.64 ComfyUI answers 404 and the proxy's cancel then does nothing."""
        prompt_id = request.match_info["prompt_id"]
        if not double.delete_pending(prompt_id):
            double.stats.interrupts += 1
            double.request_interrupt(prompt_id)
        return web.Response(status=200)

    @api.post("/free")
    @_comfy
    async def post_free(request: web.Request) -> web.StreamResponse:
        data = await request.json()
        double.stats.frees += 1
        unload_models = data.get("unload_models", False)
        free_memory = data.get("free_memory", False)
        if unload_models:
            double.set_flag("unload_models", unload_models)
        if free_memory:
            double.set_flag("free_memory", free_memory)
        return web.Response(status=200)

    # ------------------------------------------------------------------------------ history

    @api.get("/history")
    @_comfy
    async def get_history(request: web.Request) -> web.StreamResponse:
        max_items = request.rel_url.query.get("max_items")
        max_items = int(max_items) if max_items is not None else None
        offset = request.rel_url.query.get("offset")
        start = int(offset) if offset is not None else -1
        history = double.history
        if start < 0 and max_items is not None:
            start = len(history) - max_items
        out = {}
        for index, (key, entry) in enumerate(history.items()):
            if index >= start:
                out[key] = entry
                if max_items is not None and len(out) >= max_items:
                    break
        return _json(out)

    @api.get("/history/{prompt_id}")
    async def get_history_item(request: web.Request) -> web.StreamResponse:
        prompt_id = request.match_info["prompt_id"]
        entry = double.history.get(prompt_id)
        return _json({prompt_id: entry} if entry is not None else {})

    @api.post("/history")
    @_comfy
    async def post_history(request: web.Request) -> web.StreamResponse:
        data = await request.json()
        double.stats.history_posts += 1
        if "clear" in data and data["clear"]:
            double.history.clear()
        if "delete" in data:
            for prompt_id in data["delete"]:
                double.history.pop(prompt_id, None)
        return web.Response(status=200)

    # ------------------------------------------------------------------------------ files

    @api.get("/view")
    @_comfy
    async def view(request: web.Request) -> web.StreamResponse:
        query = request.rel_url.query
        store = double.store
        assert store is not None
        if "filename" not in query:
            return web.Response(status=404)
        from ...comfy.validate import split_annotated_name

        filename, folder = split_annotated_name(query["filename"])
        if not filename:
            return web.Response(status=400)
        if filename[0] == "/" or ".." in filename:
            return web.Response(status=400)
        output_dir = store.directory(folder if folder is not None else query.get("type", "output"))
        if output_dir is None:
            return web.Response(status=400)
        if "subfolder" in query:
            full = os.path.join(output_dir, query["subfolder"])
            if os.path.commonpath((os.path.abspath(full), output_dir)) != output_dir:
                return web.Response(status=403)
            output_dir = full
        filename = os.path.basename(filename)
        path = os.path.join(output_dir, filename)
        if not os.path.isfile(path):
            return web.Response(status=404)
        disposition = {"Content-Disposition": f'filename="{filename}"'}
        double.stats.views += 1
        if "preview" in query:
            return _preview(path, query, disposition)
        channel = query.get("channel", "rgba")
        if channel in ("rgb", "a"):
            return _channel(path, channel, disposition)
        ext = os.path.splitext(filename)[1].lower()
        content_type = CONTENT_TYPES.get(ext)
        if content_type is None:
            import mimetypes

            content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        if content_type in {
            "text/html",
            "text/html-sandboxed",
            "application/xhtml+xml",
            "text/javascript",
            "text/css",
        }:
            content_type = "application/octet-stream"
        return web.FileResponse(path, headers={**disposition, "Content-Type": content_type})

    @api.post("/upload/image")
    @_comfy
    async def upload_image(request: web.Request) -> web.StreamResponse:
        store = double.store
        assert store is not None
        post = await request.post()
        image = post.get("image")
        overwrite = post.get("overwrite")
        kind = post.get("type")
        kind = "input" if kind is None else kind
        upload_dir = store.directory(kind) if isinstance(kind, str) else None
        if upload_dir is None:  # ComfyUI fails with an unbound local here: 500
            raise ValueError(f"unknown upload type {kind!r}")
        if not image or not image.file:  # a str field has no .file: AttributeError -> 500, like ComfyUI
            return web.Response(status=400)
        filename = image.filename
        if not filename:
            return web.Response(status=400)
        subfolder = post.get("subfolder", "")
        full_folder = os.path.join(upload_dir, os.path.normpath(subfolder))
        path = os.path.abspath(os.path.join(full_folder, filename))
        if os.path.commonpath((upload_dir, path)) != upload_dir:
            return web.Response(status=400)
        os.makedirs(full_folder, exist_ok=True)
        data = image.file.read()
        duplicate = False
        if not (overwrite is not None and overwrite in ("true", "1")):
            stem, ext = os.path.splitext(filename)
            index = 1
            while os.path.exists(path):
                with open(path, "rb") as fh:
                    if hashlib.sha256(fh.read()).digest() == hashlib.sha256(data).digest():
                        duplicate = True
                        break
                filename = f"{stem} ({index}){ext}"
                path = os.path.join(full_folder, filename)
                index += 1
        if not duplicate:
            store.write(path, data)
        double.stats.uploads += 1
        from ._double import DoubleEvent

        double._publish(DoubleEvent("upload", data={"name": filename, "subfolder": subfolder, "type": kind}))
        return _json({"name": filename, "subfolder": subfolder, "type": kind})

    # ------------------------------------------------------------------------------ websocket

    @api.get("/ws")
    async def websocket(request: web.Request) -> web.StreamResponse:
        return await double.handle_ws(request)

    routes = [
        web.RouteDef(r.method, "/api" + r.path, r.handler, r.kwargs)
        for r in api
        if isinstance(r, web.RouteDef)
    ]
    app.add_routes(routes)
    app.add_routes(api)

    # ------------------------------------------------------------------------------ internal + gpubridge

    async def folder_paths(request: web.Request) -> web.StreamResponse:
        root = double.root
        return _json({folder: [os.path.join(root, "models", folder)] for folder in MODEL_FOLDERS})

    app.router.add_get("/internal/folder_paths", folder_paths)
    for route in gpubridge_routes(double):
        app.router.add_route(route.method, route.path, route.handler)

    async def not_found(request: web.Request) -> web.StreamResponse:
        # ComfyUI's static file route answers unknown GETs: 404, empty, application/octet-stream
        response = web.StreamResponse(status=404)
        response.content_type = "application/octet-stream"
        await response.prepare(request)
        await response.write_eof()
        return response

    app.router.add_get("/{tail:.*}", not_found)
    return app


def _preview(path: str, query: Any, headers: dict[str, str]) -> web.Response:
    from PIL import Image

    with Image.open(path) as img:
        info = query["preview"].split(";")
        fmt = info[0]
        if fmt not in ("webp", "jpeg") or "a" in query.get("channel", ""):
            fmt = "webp"
        quality = int(info[-1]) if info[-1].isdigit() else 90
        buffer = BytesIO()
        if fmt == "jpeg" or query.get("channel", "") == "rgb":
            img = img.convert("RGB")
        img.save(buffer, format=fmt, quality=quality)
    return web.Response(body=buffer.getvalue(), content_type=f"image/{fmt}", headers=headers)


def _channel(path: str, channel: str, headers: dict[str, str]) -> web.Response:
    from PIL import Image

    buffer = BytesIO()
    with Image.open(path) as img:
        if channel == "rgb":
            out = Image.merge("RGB", img.split()[:3]) if img.mode == "RGBA" else img.convert("RGB")
            out.save(buffer, format="PNG")
        else:
            alpha = img.split()[3] if img.mode == "RGBA" else Image.new("L", img.size, 255)
            out = Image.new("RGBA", img.size)
            out.putalpha(alpha)
            out.save(buffer, format="PNG")
    return web.Response(body=buffer.getvalue(), content_type="image/png", headers=headers)


# ------------------------------------------------------------------------------------------ /gpubridge


def gpubridge_routes(double: ComfyDouble) -> list[web.RouteDef]:
    """Test-only routes, to steer a double that runs in another process.

    - ``GET /gpubridge/faults`` / ``POST /gpubridge/faults`` (a JSON patch of :class:`Faults` fields;
      ``null`` clears one) / ``POST /gpubridge/faults/reset``
    - ``POST /gpubridge/crash``: answer, then die (a process exits with status 70)
    - ``POST /gpubridge/drop_ws`` ``{"client_id"?}``: abort websocket connections
    - ``POST /gpubridge/pause``, ``POST /gpubridge/resume``: stuck queue on/off
    - ``GET /gpubridge/stats``: counters, queue, job states
    - ``GET /gpubridge/jobs/{prompt_id}``: one job's state
    - ``GET /gpubridge/wait?prompt_id=&state=&timeout=`` (or ``?prompts=N``, ``?idle=1``): long-poll
      until true; 408 on timeout
    """

    def job_view(job: Any) -> dict[str, Any]:
        return {
            "prompt_id": job.prompt_id,
            "state": job.state,
            "node": job.node,
            "number": job.number,
            "client_id": job.client_id,
            "error": job.error,
        }

    async def get_faults(request: web.Request) -> web.StreamResponse:
        return _json(double.faults.to_dict())

    async def post_faults(request: web.Request) -> web.StreamResponse:
        try:
            changes = await request.json()
            if not isinstance(changes, dict):
                raise ValueError("expected a JSON object")
            double.faults.update(changes)
        except (ValueError, TypeError) as exc:
            return _json({"error": str(exc)}, 400)
        return _json(double.faults.to_dict())

    async def reset_faults(request: web.Request) -> web.StreamResponse:
        double.faults.reset()
        return _json(double.faults.to_dict())

    async def crash(request: web.Request) -> web.StreamResponse:
        response = web.json_response({"crashing": True})
        await response.prepare(request)
        await response.write_eof()
        await double.crash()
        return response

    async def drop_ws(request: web.Request) -> web.StreamResponse:
        client_id = None
        if request.can_read_body:
            with contextlib.suppress(ValueError):
                data = await request.json()
                client_id = data.get("client_id") if isinstance(data, dict) else None
        return _json({"dropped": await double.drop_sockets(client_id)})

    async def pause(request: web.Request) -> web.StreamResponse:
        double.pause()
        return _json({"paused": True})

    async def resume(request: web.Request) -> web.StreamResponse:
        double.resume()
        return _json({"paused": False})

    async def stats(request: web.Request) -> web.StreamResponse:
        return _json(
            {
                "stats": dataclasses.asdict(double.stats),
                "queue_pending": double.queue_pending,
                "queue_running": double.queue_running,
                "jobs": {pid: job.state for pid, job in double.jobs.items()},
            }
        )

    async def job(request: web.Request) -> web.StreamResponse:
        found = double.jobs.get(request.match_info["prompt_id"])
        return _json(job_view(found)) if found is not None else _json({"error": "unknown prompt_id"}, 404)

    async def wait(request: web.Request) -> web.StreamResponse:
        query = request.rel_url.query
        timeout = float(query.get("timeout", "30"))
        try:
            if "prompt_id" in query:
                states = [s for s in query.get("state", "done").split(",") if s]
                found = await double.wait_for_state(query["prompt_id"], *states, timeout=timeout)
                return _json(job_view(found))
            if "prompts" in query:
                await double.wait_for_prompts(int(query["prompts"]), timeout)
            elif "idle" in query:
                await double.wait_for_idle(timeout)
            else:
                return _json({"error": "give prompt_id, prompts or idle"}, 400)
        except TimeoutError:
            return _json({"error": "timeout"}, 408)
        return _json({"ok": True})

    return [
        web.get("/gpubridge/faults", get_faults, allow_head=False),
        web.post("/gpubridge/faults", post_faults),
        web.post("/gpubridge/faults/reset", reset_faults),
        web.post("/gpubridge/crash", crash),
        web.post("/gpubridge/drop_ws", drop_ws),
        web.post("/gpubridge/pause", pause),
        web.post("/gpubridge/resume", resume),
        web.get("/gpubridge/stats", stats, allow_head=False),
        web.get("/gpubridge/jobs/{prompt_id}", job, allow_head=False),
        web.get("/gpubridge/wait", wait, allow_head=False),
    ]
