"""``wsi view``: a small FastAPI app over one RUN folder.

It lists the run's slides with their predictions and serves, per slide, a deep-zoom pyramid (DZI tiles
from OpenSlide's :class:`~openslide.deepzoom.DeepZoomGenerator`), the score overlays as level-0-aligned PNG
rasters, the per-tile scores as JSON (tooltip) and tile thumbnails (top-k galleries). It serves only the
run's slides (ids known to the RUN folder) and the packaged front end (a fixed list of files); anything
else is 404. Slide handles, DZI tiles and score rasters are kept in small LRU caches.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from wsi_pipeline.errors import ConfigError, WSIPipelineError
from wsi_pipeline.review import raster as R
from wsi_pipeline.review.config import SCALES, ViewerConfig
from wsi_pipeline.review.scores import (
    SlideScores,
    load_slide_scores,
    read_predictions,
    resolve_model_name,
    slide_paths_from_status,
)
from wsi_pipeline.runfolder.layout import RunLayout

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).with_name("static")
STATIC_TYPES = MappingProxyType({".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                                 ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png"})
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
DZ_TILE = 254
DZ_OVERLAP = 1
DZ_FORMAT = "jpeg"
TOP_K = 8


class LRUCache:
    """A thread-safe LRU mapping; ``on_evict(value)`` runs for values pushed out."""

    def __init__(self, maxsize: int, on_evict: Callable[[Any], None] | None = None) -> None:
        self.maxsize = max(1, int(maxsize))
        self._data: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._on_evict = on_evict
        self.hits = 0
        self.misses = 0

    def get_or_create(self, key: Hashable, factory: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                self.hits += 1
                return self._data[key]
            self.misses += 1
        value = factory()  # outside the lock: slow reads do not serialise the server
        evicted = []
        with self._lock:
            if key in self._data:  # another thread made it meanwhile
                self._data.move_to_end(key)
                return self._data[key]
            self._data[key] = value
            while len(self._data) > self.maxsize:
                evicted.append(self._data.popitem(last=False)[1])
        if self._on_evict:
            for v in evicted:
                self._on_evict(v)
        return value

    def __len__(self) -> int:
        return len(self._data)

    def clear(self) -> None:
        with self._lock:
            values = list(self._data.values())
            self._data.clear()
        if self._on_evict:
            for v in values:
                self._on_evict(v)


# ---------------------------------------------------------------- slides as OpenSlide objects
def _openslide_adapter(slide: Any) -> Any:
    """Wrap a non-OpenSlide :class:`~wsi_pipeline.slide.Slide` (tifffile/Pillow backends) so that
    DeepZoomGenerator can read it."""
    import openslide
    from PIL import Image

    class SlideAsOpenSlide(openslide.AbstractSlide):
        def __init__(self, s: Any) -> None:
            super().__init__()
            self._s = s
            self._lock = threading.Lock()  # our tifffile/Pillow readers are not known to be thread-safe

        @classmethod
        def detect_format(cls, filename: Any) -> str | None:
            return None

        def close(self) -> None:
            self._s.close()

        @property
        def level_count(self) -> int:
            return self._s.level_count

        @property
        def level_dimensions(self) -> tuple[tuple[int, int], ...]:
            return tuple(tuple(d) for d in self._s.level_dimensions)

        @property
        def level_downsamples(self) -> tuple[float, ...]:
            return tuple(self._s.level_downsamples)

        @property
        def properties(self) -> dict[str, str]:
            return {}

        @property
        def associated_images(self) -> dict[str, Any]:
            return {}

        def get_best_level_for_downsample(self, downsample: float) -> int:
            return self._s.best_level_for_downsample(downsample)

        def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Any:
            with self._lock:
                rgb = self._s.read_region(location, level, size)
            return Image.fromarray(rgb).convert("RGBA")

    return SlideAsOpenSlide(slide)


@dataclass
class DeepZoomHandle:
    osr: Any  # openslide.AbstractSlide
    dz: Any  # DeepZoomGenerator
    owner: Any  # our Slide, closed with the handle

    def close(self) -> None:
        self.owner.close()


@dataclass
class ViewData:
    """Everything the viewer needs about one slide's scores (computed once, cached)."""

    scores: SlideScores
    grid: R.GridSpec
    raw: dict[tuple[str, bool], np.ndarray]  # (channel, smooth) → raster
    norms: dict[tuple[str, str], R.Normalizer]  # (channel, scale) → normaliser


class ViewerState:
    """The RUN folder, its slides and the caches behind the app."""

    def __init__(self, run_root: str | Path, cfg: ViewerConfig) -> None:
        self.layout = RunLayout(run_root)
        if not self.layout.root.is_dir():
            raise ConfigError(f"{self.layout.root}: no such RUN folder")
        self.cfg = cfg
        try:
            self.model: str | None = resolve_model_name(self.layout, cfg.model or None)
        except ConfigError as e:
            if cfg.model:
                raise
            log.warning("%s; the viewer shows slides without heatmaps", e)
            self.model = None
        self.paths = slide_paths_from_status(self.layout)
        self.predictions = read_predictions(self.layout)
        self.slide_ids = self.layout.slide_ids_with_tiles()
        self._known = set(self.slide_ids)
        self.lut = R.colormap_lut(cfg.cmap)
        self.handles = LRUCache(cfg.slide_cache, on_evict=lambda h: h.close())
        self.dz_tiles = LRUCache(cfg.tile_cache)
        self.views = LRUCache(16)
        self.overlays = LRUCache(64)
        self.thumbs = LRUCache(512)
        self.tme_overlays = LRUCache(16)
        self._static = {p.name: p for p in STATIC_DIR.iterdir() if p.is_file() and p.suffix in STATIC_TYPES}

    # ---- lookups (None → the caller answers 404)
    def known(self, slide_id: str) -> bool:
        return slide_id in self._known

    def static_file(self, name: str) -> Path | None:
        return self._static.get(name)

    def slide_path(self, slide_id: str) -> str:
        if slide_id in self.paths:
            return self.paths[slide_id]
        from wsi_pipeline.formats.h5 import A_SLIDE_PATH, read_h5_attrs

        return str(read_h5_attrs(self.layout.tiles_h5(slide_id)).get(A_SLIDE_PATH, "") or "")

    def handle(self, slide_id: str) -> DeepZoomHandle:
        def make() -> DeepZoomHandle:
            from openslide.deepzoom import DeepZoomGenerator

            from wsi_pipeline.formats.h5 import A_SLIDE_MPP, read_h5_attrs
            from wsi_pipeline.slide.open import open_recorded_slide

            mpp = read_h5_attrs(self.layout.tiles_h5(slide_id)).get(A_SLIDE_MPP)
            slide = open_recorded_slide(self.slide_path(slide_id), float(mpp) if mpp else None, self.cfg.slide_dirs)
            osr = getattr(slide, "osr", None) or _openslide_adapter(slide)
            return DeepZoomHandle(osr, DeepZoomGenerator(osr, DZ_TILE, DZ_OVERLAP, limit_bounds=False), slide)

        return self.handles.get_or_create(slide_id, make)

    def view(self, slide_id: str) -> ViewData | None:
        if self.model is None or not self.layout.scores_h5(self.model, slide_id).exists():
            return None

        def make() -> ViewData:
            sc = load_slide_scores(self.layout, slide_id, self.model, None, attention=True, slide_paths=self.paths)
            grid = R.grid_for_tiles(sc.l0_xy, sc.tile_size_l0, sc.level0_size)
            return ViewData(sc, grid, {}, {})

        return self.views.get_or_create(slide_id, make)

    def tme(self, slide_id: str) -> Any:
        """The slide's TME class raster (:mod:`wsi_pipeline.review.tme`), None without a TME read-out."""
        from wsi_pipeline.review.tme import load_tme_overlay

        return self.tme_overlays.get_or_create(slide_id, lambda: load_tme_overlay(self.layout, slide_id))

    def raster(self, vd: ViewData, key: str, smooth: bool) -> np.ndarray:
        k = (key, smooth)
        if k not in vd.raw:
            vd.raw[k] = R.rasterize(vd.scores.l0_xy, vd.scores.tile_size_l0, vd.scores.values[key], vd.grid, smooth)
        return vd.raw[k]

    def normalizer(self, vd: ViewData, key: str, scale: str) -> R.Normalizer:
        k = (key, scale)
        if k not in vd.norms:
            vd.norms[k] = R.make_normalizer(vd.scores.values[key], scale,
                                            probability=vd.scores.channel(key).is_probability)
        return vd.norms[k]

    def close(self) -> None:
        self.handles.clear()


# ---------------------------------------------------------------- JSON payloads
def _num(v: str) -> Any:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return v
    return f if math.isfinite(f) else None


def _round_list(a: np.ndarray, nd: int = 5) -> list[float | None]:
    a = np.asarray(a, dtype=np.float64)
    return [None if not math.isfinite(x) else round(x, nd) for x in a.tolist()]


def slide_list_payload(state: ViewerState) -> dict[str, Any]:
    rows = []
    for sid in state.slide_ids:
        pred = {k: _num(v) for k, v in state.predictions.get(sid, {}).items() if k != "slide_id"}
        rows.append({"slide_id": sid, "url": f"/slide/{sid}", "thumbnail": f"/api/slides/{sid}/thumbnail.jpg",
                     "has_scores": bool(state.model and state.layout.scores_h5(state.model, sid).exists()),
                     "prediction": pred})
    columns = sorted({k for r in rows for k in r["prediction"]})
    return {"run": state.layout.root.name, "model": state.model, "columns": columns, "slides": rows}


def slide_payload(state: ViewerState, slide_id: str) -> dict[str, Any]:
    h = state.handle(slide_id)
    w, hgt = h.osr.dimensions
    vd = state.view(slide_id)
    pred = {k: _num(v) for k, v in state.predictions.get(slide_id, {}).items() if k != "slide_id"}
    out: dict[str, Any] = {
        "slide_id": slide_id, "width": int(w), "height": int(hgt), "model": state.model,
        "dzi": f"/dzi/{slide_id}.dzi", "prediction": pred, "channels": [],
        "lut": ["#" + "".join(f"{int(c):02x}" for c in rgb) for rgb in state.lut],
        "scales": list(SCALES),
    }
    try:
        out["mpp"] = h.owner.mpp_or_none
    except AttributeError:
        out["mpp"] = None
    tme = state.tme(slide_id)
    if tme is not None:
        out["tme"] = tme.payload(f"/api/slides/{slide_id}/tme.png")
    if vd is None:
        return out
    sc = vd.scores
    out.update({
        "tiles": f"/api/slides/{slide_id}/tiles", "n_tiles": len(sc), "tile_size_l0": sc.tile_size_l0,
        "tile_px": sc.tile_size, "target_mpp": sc.target_mpp,
        "grid": {"cell_l0": vd.grid.cell_l0, "width": vd.grid.width, "height": vd.grid.height},
    })
    kind_order = {"score": 0, "class": 1, "attention": 2}
    for ch in sorted(sc.channels, key=lambda c: kind_order.get(c.kind, 3)):
        vals = sc.values[ch.key]
        top, bottom = R.top_bottom_indices(vals, TOP_K)
        norms = {s: state.normalizer(vd, ch.key, s) for s in SCALES}
        out["channels"].append({
            "key": ch.key, "label": ch.label, "target": ch.target, "kind": ch.kind,
            "overlay": f"/api/slides/{slide_id}/overlay/{ch.key}.png",
            "legend": {s: {"label": n.label, "ticks": n.ticks(), "vmin": n.vmin, "vmax": n.vmax}
                       for s, n in norms.items()},
            "top": [_tile_ref(slide_id, sc, vals, i) for i in top],
            "bottom": [_tile_ref(slide_id, sc, vals, i) for i in bottom],
        })
    return out


def _tile_ref(slide_id: str, sc: SlideScores, vals: np.ndarray, i: int) -> dict[str, Any]:
    return {"index": int(i), "x": int(sc.l0_xy[i, 0]), "y": int(sc.l0_xy[i, 1]), "score": round(float(vals[i]), 5),
            "image": f"/api/slides/{slide_id}/tile/{int(i)}.jpg"}


def tiles_payload(state: ViewerState, vd: ViewData) -> dict[str, Any]:
    sc = vd.scores
    return {
        "tile_size_l0": sc.tile_size_l0,
        "x": sc.l0_xy[:, 0].tolist(), "y": sc.l0_xy[:, 1].tolist(),
        "values": {c.key: _round_list(sc.values[c.key]) for c in sc.channels},
        "percentiles": {c.key: _round_list(state.normalizer(vd, c.key, "percentile")(sc.values[c.key]), 4)
                        for c in sc.channels},
    }


# ---------------------------------------------------------------- images
def _png(rgba: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgba).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(img: Any, quality: int = 80) -> bytes:
    from PIL import Image

    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


# ---------------------------------------------------------------- Host check (DNS rebinding)
def host_name(header: str) -> str:
    """The host of a ``Host`` header: lower case, without the port, the IPv6 brackets or a trailing dot."""
    h = header.strip().lower()
    if h.startswith("["):
        h = h[1:h.find("]")] if "]" in h else h[1:]
    elif h.count(":") == 1:
        h = h.partition(":")[0]
    return h.rstrip(".")


def allowed_hosts(cfg: ViewerConfig) -> frozenset[str]:
    """Host names the viewer answers to: the loopback names, the ``--host`` it listens on and ``--allow-host``
    names; listening on every interface (``0.0.0.0``, ``::``) adds this machine's names and addresses."""
    names = {*LOOPBACK_HOSTS, *cfg.allow_hosts}
    if cfg.host in WILDCARD_HOSTS:
        names |= _machine_names()
    else:
        names.add(cfg.host)
    return frozenset(host_name(n) for n in names if n)


def _machine_names() -> set[str]:
    import socket

    names = {socket.gethostname(), socket.getfqdn()}
    with contextlib.suppress(OSError):
        names |= {str(info[4][0]) for info in socket.getaddrinfo(socket.gethostname(), None)}
    return names


class HostGuard:
    """ASGI middleware refusing requests whose ``Host`` header is not an allowed name (400). A web page on
    another site cannot then reach the viewer by pointing its own DNS name at 127.0.0.1 (DNS rebinding)."""

    def __init__(self, app: Any, allowed: frozenset[str]) -> None:
        self.app = app
        self.allowed = allowed

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            header = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
            if host_name(header) not in self.allowed:
                await self._refuse(header, scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _refuse(self, header: str, scope: dict[str, Any], receive: Any, send: Any) -> None:
        from starlette.responses import PlainTextResponse

        names = ", ".join(sorted(self.allowed))
        shown = host_name(header) or "(none)"
        log.warning("refused a request for Host %r (allowed: %s)", header, names)
        msg = (f"400 Bad Request: Host {shown!r} is not allowed. This wsi-pipeline viewer answers only to {names}"
               f" (protection against DNS rebinding). Open it by one of those names, or start it with "
               f"`wsi view RUN --allow-host {shown}`.\n")
        if scope["type"] == "http":
            await PlainTextResponse(msg, status_code=400)(scope, receive, send)
        else:
            await send({"type": "websocket.close", "code": 1008})


# ---------------------------------------------------------------- the app
def create_app(run_root: str | Path, cfg: ViewerConfig | None = None) -> Any:
    """The FastAPI application for one RUN folder."""
    from fastapi import FastAPI, HTTPException, Query
    from fastapi.responses import JSONResponse, Response

    cfg = (cfg or ViewerConfig()).validate()
    state = ViewerState(run_root, cfg)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        yield
        state.close()

    app = FastAPI(title="wsi-pipeline viewer", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.add_middleware(HostGuard, allowed=allowed_hosts(cfg))
    app.state.viewer = state

    def need_slide(slide_id: str) -> None:
        if not state.known(slide_id):
            raise HTTPException(404, f"unknown slide {slide_id!r}")

    def need_view(slide_id: str) -> ViewData:
        need_slide(slide_id)
        vd = state.view(slide_id)
        if vd is None:
            raise HTTPException(404, f"no scores for slide {slide_id!r}")
        return vd

    def handle_or_404(slide_id: str) -> DeepZoomHandle:
        need_slide(slide_id)
        try:
            return state.handle(slide_id)
        except WSIPipelineError as e:
            raise HTTPException(404, f"slide {slide_id!r} cannot be opened: {e}") from e

    def static_response(name: str) -> Response:
        p = state.static_file(name)
        if p is None:
            raise HTTPException(404, "not found")
        return Response(p.read_bytes(), media_type=STATIC_TYPES[p.suffix],
                        headers={"Cache-Control": "no-cache"})

    @app.get("/")
    def index() -> Response:
        return static_response("index.html")

    @app.get("/slide/{slide_id}")
    def slide_page(slide_id: str) -> Response:
        need_slide(slide_id)
        return static_response("viewer.html")

    @app.get("/static/{name}")
    def static(name: str) -> Response:
        return static_response(name)

    @app.get("/api/slides")
    def api_slides() -> JSONResponse:
        return JSONResponse(slide_list_payload(state))

    @app.get("/api/slides/{slide_id}")
    def api_slide(slide_id: str) -> JSONResponse:
        handle_or_404(slide_id)
        return JSONResponse(slide_payload(state, slide_id))

    @app.get("/api/slides/{slide_id}/tiles")
    def api_tiles(slide_id: str) -> JSONResponse:
        return JSONResponse(tiles_payload(state, need_view(slide_id)))

    @app.get("/api/slides/{slide_id}/overlay/{name}")
    def api_overlay(slide_id: str, name: str, scale: str = Query("percentile"), smooth: bool = Query(False)
                    ) -> Response:
        vd = need_view(slide_id)
        key = name.removesuffix(".png")
        if not name.endswith(".png") or key not in vd.scores.values or scale not in SCALES:
            raise HTTPException(404, "unknown overlay")

        def make() -> bytes:
            raw = state.raster(vd, key, smooth)
            return _png(R.colorize(state.normalizer(vd, key, scale)(raw), state.lut))

        data = state.overlays.get_or_create((slide_id, key, scale, smooth), make)
        return Response(data, media_type="image/png", headers={"Cache-Control": "max-age=300"})

    @app.get("/api/slides/{slide_id}/tme.png")
    def api_tme_overlay(slide_id: str) -> Response:
        need_slide(slide_id)
        tme = state.tme(slide_id)
        if tme is None:
            raise HTTPException(404, "no TME read-out for this slide (run `wsi tme`)")
        data = state.overlays.get_or_create((slide_id, "tme"), lambda: _png(tme.rgba))
        return Response(data, media_type="image/png", headers={"Cache-Control": "max-age=300"})

    @app.get("/api/slides/{slide_id}/tile/{name}")
    def api_tile_image(slide_id: str, name: str, size: int = Query(128, ge=16, le=512)) -> Response:
        vd = need_view(slide_id)
        stem = name.removesuffix(".jpg")
        if not name.endswith(".jpg") or not stem.isdigit() or int(stem) >= len(vd.scores):
            raise HTTPException(404, "unknown tile")
        i = int(stem)
        h = handle_or_404(slide_id)

        def make() -> bytes:
            sc = vd.scores
            img = h.owner.read_region_at_mpp(tuple(int(v) for v in sc.l0_xy[i]), sc.target_mpp, sc.tile_size)
            from wsi_pipeline.slide.base import resize_rgb

            return _jpeg(resize_rgb(img, (size, size)))

        return Response(state.thumbs.get_or_create((slide_id, i, size), make), media_type="image/jpeg")

    @app.get("/api/slides/{slide_id}/thumbnail.jpg")
    def api_thumbnail(slide_id: str) -> Response:
        h = handle_or_404(slide_id)

        def make() -> bytes:
            rgb, _ = h.owner.thumbnail(256)
            return _jpeg(rgb)

        return Response(state.thumbs.get_or_create((slide_id, "thumb"), make), media_type="image/jpeg")

    @app.get("/dzi/{name}")
    def dzi(name: str) -> Response:
        if not name.endswith(".dzi"):
            raise HTTPException(404, "not found")
        h = handle_or_404(name.removesuffix(".dzi"))
        return Response(h.dz.get_dzi(DZ_FORMAT), media_type="application/xml")

    @app.get("/dzi/{name}/{level}/{tile}")
    def dzi_tile(name: str, level: int, tile: str) -> Response:
        if not name.endswith("_files"):
            raise HTTPException(404, "not found")
        slide_id = name.removesuffix("_files")
        h = handle_or_404(slide_id)
        parts = tile.removesuffix(f".{DZ_FORMAT}").split("_")
        if not tile.endswith(f".{DZ_FORMAT}") or len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise HTTPException(404, "not found")
        col, row = int(parts[0]), int(parts[1])
        if not 0 <= level < h.dz.level_count:
            raise HTTPException(404, "no such level")
        cols, rows = h.dz.level_tiles[level]
        if not (col < cols and row < rows):
            raise HTTPException(404, "no such tile")

        def make() -> bytes:
            return _jpeg(h.dz.get_tile(level, (col, row)), quality=85)

        data = state.dz_tiles.get_or_create((slide_id, level, col, row), make)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    return app


def serve(run_root: str | Path, cfg: ViewerConfig, on_ready: Callable[[str], None] | None = None) -> None:
    """Run the viewer with uvicorn until interrupted; ``on_ready(url)`` is called once the port is bound."""
    import uvicorn

    app = create_app(run_root, cfg)
    sock = bind_socket(cfg.host, cfg.port)
    if cfg.host not in LOOPBACK_HOSTS:
        log.warning("the viewer listens on %s: anyone who can reach this address can see the slides", cfg.host)
    url = viewer_url(cfg.host, int(sock.getsockname()[1]))
    log.info("viewer at %s", url)
    if on_ready is not None:
        on_ready(url)
    try:
        uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    finally:
        sock.close()


def bind_socket(host: str, port: int) -> Any:
    """A listening TCP socket on ``host:port``; :class:`ConfigError` naming the fix when that fails."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror or e}) — pass another --port or --host") from e
    sock.set_inheritable(True)
    return sock


def viewer_url(host: str, port: int) -> str:
    """The URL to open: this machine's name when listening on every interface, brackets around IPv6."""
    if host in WILDCARD_HOSTS:
        import socket

        host = socket.gethostname()
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"
