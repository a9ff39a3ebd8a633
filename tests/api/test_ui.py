"""The /ui page's static files: served without a key, with a strict CSP, and nothing else."""

from __future__ import annotations

from fastapi.testclient import TestClient


def test_ui_files_are_served_with_csp(client: TestClient) -> None:
    r = client.get("/ui", follow_redirects=False)
    assert r.status_code == 308 and r.headers["location"] == "/ui/"
    page = client.get("/ui/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-eval" not in csp
    assert 'src="app.js"' in page.text and "http" not in page.text.split("<body>")[0]  # nothing from a CDN
    js = client.get("/ui/app.js")
    assert js.headers["content-type"].startswith("text/javascript") and "sessionStorage" in js.text
    assert "localStorage" not in js.text  # the key never outlives the tab
    assert client.get("/ui/style.css").headers["content-type"].startswith("text/css")


def test_ui_serves_only_its_files(client: TestClient) -> None:
    for name in ("../app.py", "ui.py", "secret", "%2e%2e%2fapp.py"):
        assert client.get(f"/ui/{name}").status_code == 404
