"""The review station: server-rendered pages where a quality engineer looks at the parts the
model flagged and confirms or corrects each decision.

- `GET /review`: the queue (NG decisions, decisions near the threshold, shadow
  disagreements; not yet reviewed unless `reviewed=true`), filtered by station, category,
  model version and time, each with its overlay thumbnail.
- `GET /review/parts/{record_id}`: one part: the image with its heat map laid over it (an
  opacity slider), the defect region outlined at the threshold, the decision, where its
  threshold came from, the version, station and timings, and OK / NG buttons.
- `POST /review/parts/{record_id}/verdict`: records the verdict as the `Feedback` RPC does (the
  reviewer's name as `operator`, the key's name as the sender), then shows the next part.
- `GET /review/parts/{record_id}/overlay.png`: the part's overlay (the queue's thumbnails).
- `GET /review/quality?days=14&station=`: per model version and category, day by day, the
  parts decided and reviewed, false calls and escapes (charts), and the thresholds the reviewed
  parts support with the commands that apply them (`anomaly quality-report`'s proposal).
- `GET /review/promotion?days=7`: what each watched alias serves, the promotion gate's recent
  verdicts with the known parts that decided them (thumbnails) and the registry's record of
  each version's last verdict, and the shadow challenger's agreement per category.

The browser signs in with HTTP Basic: any user name (recorded as the reviewer) and an API key
of the role `operate` as the password; without keys configured the pages are open, as the API
is. HTTP Basic is a key on these pages only (elsewhere a browser's cached sign-in would let
another site make calls). A verdict form posted from another site is refused (its `Origin` is
not this page's scheme and host: behind a proxy, the proxy must pass the original `Host`), and
no page may be framed by another site (`X-Frame-Options`, CSP `frame-ancestors`). Pages
use no external font, script or style (the line network has no internet), work from
1280×800 panel PCs to tablets, and every action has a key: `j`/`k` move in the queue, `Enter`
opens a part, `o` records OK, `n` records NG (with the defect type typed first), `Esc` goes back.
"""

from __future__ import annotations

import base64
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated
from urllib.parse import parse_qsl, urlencode

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from anomaly.v1 import anomaly_pb2 as pb
from service.protocol.rest.forwarding import Problem, basic_sign_in, forward

# Pages are never framed by another site (a verdict is one key press) and load nothing from elsewhere.
PAGE_HEADERS = {"X-Frame-Options": "DENY", "Cache-Control": "no-store", "Referrer-Policy": "same-origin",
                "X-Content-Type-Options": "nosniff",
                "Content-Security-Policy": "default-src 'none'; img-src 'self' data:; "
                                           "style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
                                           "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"}


def render(request: Request, template: str, context: dict, status: int = 200,
           headers: dict[str, str] | None = None) -> Response:
    """A page, with `PAGE_HEADERS`."""
    return templates.TemplateResponse(request, template, context, status_code=status,
                                      headers={**PAGE_HEADERS, **(headers or {})})


router = APIRouter(prefix="/review", include_in_schema=False)
templates = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))
REALM = 'Basic realm="anomaly review", charset="UTF-8"'
DEFECT_TYPES = ("scratch", "dent", "crack", "contamination", "missing part", "discoloration", "other")


def reviewer(request: Request) -> str:
    """The name the browser signed in with (HTTP Basic), or ""."""
    signed_in = basic_sign_in(request)
    return signed_in[0].strip()[:128] if signed_in else ""


def page_problem(request: Request, exc: Problem) -> Response:
    """A failed call as a page: 401 asks the browser to sign in (HTTP Basic)."""
    headers = {"WWW-Authenticate": REALM} if exc.status == 401 else None
    return render(request, "problem.html", {"problem": exc}, exc.status, headers)


async def _call(request: Request, method: str, message: object) -> object:
    return await forward(request, request.app.state.v1, method, message)


@router.get("", response_class=HTMLResponse)
async def queue(request: Request, station: str = "", category: str = "", version: str = "",
                since: str = "", until: str = "", reviewed: bool = False,
                recorded: Annotated[str, Query(max_length=128)] = "") -> Response:
    """The review queue."""
    message = pb.ListReviewsRequest(station=station, category=category, model_version=version, since=since,
                                    until=until, limit=200, include_reviewed=reviewed)
    try:
        answer = await _call(request, "ListReviews", message)
    except Problem as exc:
        return page_problem(request, exc)
    filters = {"station": station, "category": category, "version": version, "since": since,
               "until": until, "reviewed": reviewed}
    return render(request, "queue.html", {
        "items": list(answer.items), "filters": filters, "recorded": recorded,  # type: ignore[attr-defined]
        "reviewer": reviewer(request)})


CHART_W, CHART_H, LEFT, BOTTOM = 720, 170, 44, 26  # one chart's SVG box and its axes' margins


def _charts(days: list, first: str, count: int) -> list[dict]:
    """One bar chart per (version, category): per day, parts decided (grey), reviewed (blue),
    false calls (orange) and escapes (red) from the reviewed ones, on one count scale."""
    dates = [(datetime.fromisoformat(first) + timedelta(days=i)).strftime("%Y-%m-%d") for i in range(count)]
    groups: dict[tuple[str, str, str], dict[str, object]] = {}
    for d in days:
        groups.setdefault((d.model_name, d.model_version, d.category), {})[d.day] = d
    step = (CHART_W - LEFT - 8) / max(count, 1)
    charts = []
    for (name, version, category), by_day in sorted(groups.items()):
        top = max(max(d.decided for d in by_day.values()), 1)  # type: ignore[attr-defined]
        scale = (CHART_H - BOTTOM - 10) / top
        bars = []
        for i, day in enumerate(dates):
            d = by_day.get(day)
            x = LEFT + i * step
            if d is None:
                continue
            bar = {"x": round(x + 1, 1), "w": round(max(step - 2, 1), 1), "day": day, "d": d}
            for key in ("decided", "reviewed", "false_calls", "escapes"):
                bar[key + "_h"] = round(getattr(d, key) * scale, 1)
            bars.append(bar)
        totals = {k: sum(getattr(d, k) for d in by_day.values())  # type: ignore[attr-defined]
                  for k in ("decided", "reviewed", "false_calls", "escapes")}
        ticks = [{"x": round(LEFT + i * step + step / 2, 1), "label": day[5:]}
                 for i, day in enumerate(dates) if i % max(1, count // 7) == 0]
        charts.append({"name": name, "version": version, "category": category, "bars": bars, "top": top,
                       "ticks": ticks, "totals": totals, "w": CHART_W, "h": CHART_H, "left": LEFT,
                       "base": CHART_H - BOTTOM})
    return charts


def _days(text: str, default: int) -> int:
    """A page's `days` (1–366); a bad one is a page that says so, not a JSON error.

    Raises:
        Problem: 400, naming what is wrong.
    """
    if not text.strip():
        return default
    try:
        days = int(text)
    except ValueError:
        raise Problem(400, "Bad Request", f"days must be a whole number of days, got {text[:20]!r}",
                      "INVALID_ARGUMENT") from None
    if not 1 <= days <= 366:
        raise Problem(400, "Bad Request", f"days must be 1 to 366, got {days}", "INVALID_ARGUMENT")
    return days


@router.get("/quality", response_class=HTMLResponse)
async def quality(request: Request, days: Annotated[str, Query(max_length=20)] = "14",
                  station: Annotated[str, Query(max_length=128)] = "") -> Response:
    """The quality view: per version and category over time, and the threshold proposals."""
    try:
        n = _days(days, 14)
        report = await _call(request, "GetQuality", pb.GetQualityRequest(days=n, station=station))
    except Problem as exc:
        return page_problem(request, exc)
    r = report
    return render(request, "quality.html", {
        "charts": _charts(list(r.days), r.since[:10], n), "proposals": list(r.proposals),  # type: ignore
        "since": r.since[:10], "days": n, "station": station,  # type: ignore
        "last": (datetime.fromisoformat(r.until) - timedelta(days=1)).strftime("%Y-%m-%d"),  # type: ignore
        "reviewer": reviewer(request)})


def data_uri(kind: str, data: bytes) -> str:
    """`data` inline in the page (the pages load nothing from elsewhere), or "" when empty."""
    return f"data:{kind};base64,{base64.b64encode(data).decode()}" if data else ""


@router.get("/promotion", response_class=HTMLResponse)
async def promotion(request: Request, days: Annotated[str, Query(max_length=20)] = "7") -> Response:
    """The promotion view: what each alias serves, the gate's verdicts with the parts that
    decided them, the shadow challenger's agreement."""
    try:
        view = await _call(request, "GetPromotion", pb.GetPromotionRequest(days=_days(days, 7)))
    except Problem as exc:
        return page_problem(request, exc)
    v = view
    server = [(g, [(p, data_uri("image/jpeg", p.thumbnail_jpeg)) for p in g.parts])
              for g in v.verdicts if g.origin == "server"]  # type: ignore[attr-defined]
    return render(request, "promotion.html", {
        "aliases": list(v.aliases), "server": server,  # type: ignore[attr-defined]
        "registry": [g for g in v.verdicts if g.origin == "registry"],  # type: ignore[attr-defined]
        "shadow": list(v.shadow), "since": v.since, "notes": list(v.notes),  # type: ignore[attr-defined]
        "reviewer": reviewer(request)})


@router.get("/parts/{record_id}", response_class=HTMLResponse)
async def part(request: Request, record_id: str, back: str = "") -> Response:
    """One part: image, heat map, decision, verdict buttons."""
    try:
        evidence = await _call(request, "GetEvidence", pb.GetEvidenceRequest(record_id=record_id,
                                                                              drawings="layers"))
    except Problem as exc:
        return page_problem(request, exc)

    e = evidence
    return render(request, "part.html", {
        "item": e.item, "image": data_uri(e.image_type, e.image),  # type: ignore[attr-defined]
        "heat": data_uri("image/png", e.heat_png), "reviewer": reviewer(request),  # type: ignore[attr-defined]
        "defect_types": DEFECT_TYPES, "back": back if back.startswith("/review") else "/review"})


@router.get("/parts/{record_id}/overlay.png")
async def overlay(request: Request, record_id: str) -> Response:
    """The part's overlay PNG (404 when no evidence was kept)."""
    evidence = await _call(request, "GetEvidence", pb.GetEvidenceRequest(record_id=record_id,
                                                                          drawings="overlay"))
    if not evidence.overlay_png:  # type: ignore[attr-defined]
        raise Problem(404, "Not Found", f"no overlay kept for record_id {record_id!r}", "NOT_FOUND")
    return Response(evidence.overlay_png, media_type="image/png",  # type: ignore[attr-defined]
                    headers={"Cache-Control": "private, max-age=3600", "X-Content-Type-Options": "nosniff"})


def _same_origin(request: Request) -> bool:
    """Whether a form post comes from this host's own pages (no Origin header: not a browser's
    cross-site post)."""
    origin = request.headers.get("origin")
    if origin is None:
        return True
    return origin == f"{request.url.scheme}://{request.headers.get('host', '')}"


@router.post("/parts/{record_id}/verdict")
async def verdict(request: Request, record_id: str,
                  request_id: Annotated[str, Form(max_length=128)],
                  verdict: Annotated[str, Form(pattern="^(OK|NG)$")],
                  defect_type: Annotated[str, Form(max_length=128)] = "",
                  comment: Annotated[str, Form(max_length=2000)] = "",
                  station: Annotated[str, Form(max_length=128)] = "",
                  back: Annotated[str, Form(max_length=2000)] = "/review") -> Response:
    """Record the reviewer's verdict (as the `Feedback` RPC), then back to the queue."""
    if not _same_origin(request):
        return page_problem(request, Problem(403, "Forbidden", "a verdict must be posted from this review "
                                             "station's own page", "PERMISSION_DENIED"))
    message = pb.FeedbackRequest(request_id=request_id, verdict=verdict,
                                 defect_type=defect_type.strip() if verdict == "NG" else "",
                                 operator=reviewer(request), comment=comment.strip(), station=station)
    try:
        await _call(request, "Feedback", message)
    except Problem as exc:
        return page_problem(request, exc)
    path, _, query = (back if back.startswith("/review") else "/review").partition("?")
    kept = [(k, v) for k, v in parse_qsl(query) if k != "recorded"] + [("recorded", request_id)]
    return RedirectResponse(f"{path}?{urlencode(kept)}", status_code=303)
