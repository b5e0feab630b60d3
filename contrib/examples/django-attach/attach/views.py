"""The example's views: log in through boshmux's handoff API (server to server), then give every
page load its own prebound BOSH session for Strophe's attach() or Converse's prebind_url."""
import json
import mimetypes
import urllib.error
import urllib.request
from pathlib import Path

from django.conf import settings
from django.http import FileResponse, Http404, HttpResponseRedirect, JsonResponse
from django.shortcuts import render

NODE_MODULES = Path(settings.BASE_DIR) / "node_modules"
# The browser files the pages load, served from the npm packages (no CDN).
STROPHE = NODE_MODULES / "strophe.js/dist/strophe.umd.min.js"
CONVERSE_DIST = (NODE_MODULES / "converse.js/dist").resolve()


def boshmux(path, body):
    """POSTs JSON to boshmux's handoff API: (status, JSON answer)."""
    req = urllib.request.Request(
        settings.BOSHMUX_URL + path,
        data=json.dumps(body).encode(),
        headers={
            "Authorization": "Bearer " + settings.BOSHMUX_API_KEY,
            "Content-Type": "application/json",
        },
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def login(request):
    """A login form; the password goes to boshmux once and is never stored here."""
    if request.method == "POST":
        user = request.POST["user"]
        jid = f"{user}@{settings.XMPP_DOMAIN}"
        status, answer = boshmux("/api/v1/sessions", {"jid": jid, "password": request.POST["password"]})
        if status in (200, 201):
            request.session["jid"] = jid
            return HttpResponseRedirect("/")
        return render(request, "login.html", {"error": answer.get("error")}, status=403)
    return render(request, "login.html", {})


def logout(request):
    request.session.flush()
    return HttpResponseRedirect("/login")


def fresh_prebind(request):
    """One virtual BOSH session for this page load (jid, sid, rid), or None when logged out."""
    jid = request.session.get("jid")
    if not jid:
        return None
    status, answer = boshmux(f"/api/v1/sessions/{jid}/prebind", {})
    return answer if status == 201 else None


def index(request):
    """The chat page: rendered with its own jid/sid/rid, which Strophe attach()es to."""
    bind = fresh_prebind(request)
    if bind is None:
        return HttpResponseRedirect("/login")
    return render(request, "index.html", {"bind": bind, "bosh_url": settings.BOSHMUX_URL + "/http-bind"})


def prebind(request):
    """Converse's prebind_url: the same, as JSON."""
    bind = fresh_prebind(request)
    if bind is None:
        return JsonResponse({"error": "log in first"}, status=403)
    return JsonResponse(bind)


def converse(request):
    """Unmodified Converse.js with authentication 'prebind'."""
    jid = request.session.get("jid")
    if not jid:
        return HttpResponseRedirect("/login")
    return render(request, "converse.html", {"jid": jid, "bosh_url": settings.BOSHMUX_URL + "/http-bind"})


def strophe(request):
    return FileResponse(open(STROPHE, "rb"), content_type="text/javascript")


def converse_dist(request, name):
    """Converse's dist directory: its script loads chunks, fonts and sounds from there."""
    path = (CONVERSE_DIST / name).resolve()
    if not path.is_relative_to(CONVERSE_DIST) or not path.is_file():
        raise Http404(name)
    kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    if path.suffix == ".js":
        kind = "text/javascript"
    return FileResponse(open(path, "rb"), content_type=kind)
